"""runtime/bulk_channel.py: tasks and results over raw mutual TLS on the bulk port, with a real TLS handshake on
127.0.0.1. The bytes arrive unchanged and the handler sees the identity of the site's certificate; a broken or
unconfirmed transfer reaches the handler as a broken stream (so it offers the task again or lets the site
resend), never as a bad result; refusals reach the site as the same fedkit errors as on the gRPC port; and a
site whose bulk port is closed falls back to the gRPC port."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509

from provision.certs import create_ca, issue_credential
from provision.project import ClientSpec, ServerSpec
from runtime.bulk_channel import MAGIC, BulkClient, BulkRoute, BulkServer, TlsStream
from runtime.errors import CertificateError, SessionExpired, TransferStalled
from runtime.identity import Identity
from runtime.proto import fedkit_pb2 as pb
from runtime.transport import TlsFiles, header_message, parse_task_head, trailer_message

NOW = dt.datetime.now(dt.UTC)


def _write(folder: Path, name: str, cred, ca) -> TlsFiles:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.crt").write_bytes(cred.cert_pem)
    key = folder / f"{name}.key"
    key.write_bytes(cred.key_pem)
    os.chmod(key, 0o600)
    (folder / "rootCA.pem").write_bytes(ca.cert_pem)
    return TlsFiles(folder / f"{name}.crt", key, folder / "rootCA.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    root = tmp_path_factory.mktemp("pki")
    ca, other = create_ca("study", NOW, 30), create_ca("study", NOW, 30)
    server = ServerSpec(type="server", name="localhost", org="lead", fed_learn_port=8002, admin_port=8003,
                        host_names=("127.0.0.1",))
    site = ClientSpec(type="client", name="site-1", org="org-1")
    return {"server": _write(root / "server", "server", issue_credential(ca, server, NOW, 30, "study"), ca),
            "site": _write(root / "site", "client", issue_credential(ca, site, NOW, 30, "study"), ca),
            # the same name from another study's CA: the handshake must refuse it
            "foreign": _write(root / "foreign", "client", issue_credential(other, site, NOW, 30, "study"), ca)}


class _Handler:
    """FederationService's two bulk calls, recording what they saw."""

    def __init__(self, payload: bytes = b"", refuse_upload: str = "", fail_with: Exception | None = None):
        self.payload = payload
        self.refuse_upload = refuse_upload
        self.fail_with = fail_with
        self.peers: list[str] = []
        self.received: list[bytes] = []
        self.task_end = ""  # "sent" when the handler's stream ran to its end, else why it broke off
        self.upload_error: BaseException | None = None
        self.ended = asyncio.Event()

    async def get_task(self, peer: Identity, request: pb.GetTaskRequest) -> AsyncIterator[pb.TaskChunk | bytes]:
        self.peers.append(peer.name)
        if self.fail_with is not None:
            raise self.fail_with
        try:
            yield pb.TaskChunk(header=pb.TaskHeader(task_id="t1", payload_bytes=len(self.payload)))
            view = memoryview(self.payload)
            for start in range(0, len(view), 300_000):
                yield view[start:start + 300_000]
        except BaseException as e:  # FederationService offers the task again here
            self.task_end = type(e).__name__
            self.ended.set()
            raise
        self.task_end = "sent"
        self.ended.set()

    async def submit_result(self, peer: Identity, chunks: AsyncIterator[pb.ResultChunk | bytes]) -> pb.SubmitReply:
        self.peers.append(peer.name)
        try:
            async for chunk in chunks:
                if self.refuse_upload:
                    return pb.SubmitReply(accepted=False, reason=self.refuse_upload)
                self.received.append(chunk.SerializeToString() if isinstance(chunk, pb.ResultChunk) else bytes(chunk))
        except BaseException as e:
            self.upload_error = e
            raise
        finally:
            self.ended.set()
        return pb.SubmitReply(accepted=True)


def _allow(identity, cert) -> None:
    return None


async def _serving(pki, handler: _Handler, check=_allow) -> BulkServer:
    server = BulkServer(pki["server"], "127.0.0.1", 0, handler, check)
    await server.start()
    return server


def _client(pki, server: BulkServer, who: str = "site") -> BulkClient:
    client = BulkClient(pki[who], "localhost", server.port)
    client._host = "127.0.0.1"  # dial the IPv4 loopback; the certificate names both localhost and 127.0.0.1
    return client


async def _upload(messages: list[bytes]) -> AsyncIterator[bytes]:
    for message in messages:
        yield message


PAYLOAD = hashlib.sha256(b"model").digest() * 100_000  # 3.2 MB: several chunks, several TLS records


def test_task_and_result_cross_unchanged_with_the_certificates_identity(pki) -> None:
    handler = _Handler(PAYLOAD)

    async def run() -> tuple[pb.TaskChunk, bytes, pb.SubmitReply]:
        server = await _serving(pki, handler)
        try:
            client = _client(pki, server)
            messages = [bytes(m) async for m in client.GetTask(pb.GetTaskRequest(session_id="s", wait_s=1))]
            await asyncio.wait_for(handler.ended.wait(), 10)
            head, body = parse_task_head(messages[0]), b"".join(messages[1:])
            digest = hashlib.sha256(body).hexdigest()
            reply = await client.SubmitResult(_upload([
                header_message(pb.ResultHeader(task_id="t1", payload_bytes=len(body))),
                body[:1_000_000], body[1_000_000:], trailer_message(digest)]), timeout=30)
            return head, body, reply
        finally:
            await server.stop()

    head, body, reply = asyncio.run(run())

    assert head.header.task_id == "t1" and body == PAYLOAD
    assert handler.task_end == "sent"
    assert reply.accepted
    assert handler.peers == ["site-1", "site-1"]
    assert pb.ResultChunk.FromString(handler.received[0]).header.payload_bytes == len(PAYLOAD)
    assert b"".join(handler.received[1:-1]) == PAYLOAD
    assert pb.ResultChunk.FromString(handler.received[-1]).sha256 == hashlib.sha256(PAYLOAD).hexdigest()


async def _raw_connection(pki, server: BulkServer) -> TlsStream:
    return await _client(pki, server).connect("test")


def _request(call: int, body: bytes) -> bytes:
    return MAGIC + bytes([call]) + len(body).to_bytes(4, "big") + body


def test_a_task_the_site_never_confirms_is_offered_again(pki) -> None:
    handler = _Handler(PAYLOAD)

    async def run() -> None:
        server = await _serving(pki, handler)
        try:
            stream = await _raw_connection(pki, server)
            body = pb.GetTaskRequest(session_id="s").SerializeToString()
            await stream.write(_request(1, body))
            await stream.read_frame()
            await stream.read_exactly(len(PAYLOAD) // 2)
            stream.close()  # hangs up before the whole model and the receipt
            await asyncio.wait_for(handler.ended.wait(), 10)
        finally:
            await server.stop()

    asyncio.run(run())
    assert handler.task_end in ("CancelledError", "GeneratorExit")


def test_an_upload_cut_mid_way_is_a_broken_stream_not_a_bad_result(pki) -> None:
    handler = _Handler()

    async def run() -> None:
        server = await _serving(pki, handler)
        try:
            stream = await _raw_connection(pki, server)
            await stream.write(_request(2, header_message(pb.ResultHeader(task_id="t1", payload_bytes=len(PAYLOAD)))))
            status, _ = await stream.read_frame()
            assert status == 255  # GO
            await stream.write(PAYLOAD[:500_000])
            stream.close()
            await asyncio.wait_for(handler.ended.wait(), 10)
        finally:
            await server.stop()

    asyncio.run(run())
    # TransferStalled (the stream broke: the site may send it again) or the call cancelled as the site hung
    # up; never UpdateRejected, which would count the result as this site's failed answer
    assert isinstance(handler.upload_error, TransferStalled | asyncio.CancelledError)


def test_a_refusal_before_the_payload_reaches_the_site_with_its_reason(pki) -> None:
    handler = _Handler(refuse_upload="declared payload of 3200000 bytes exceeds the limit of 10")

    async def run() -> pb.SubmitReply:
        server = await _serving(pki, handler)
        try:
            return await _client(pki, server).SubmitResult(_upload([
                header_message(pb.ResultHeader(task_id="t1", payload_bytes=len(PAYLOAD))), PAYLOAD,
                trailer_message("x")]), timeout=30)
        finally:
            await server.stop()

    reply = asyncio.run(run())
    assert not reply.accepted and "exceeds the limit of 10" in reply.reason


def test_a_handler_error_reaches_the_site_as_the_same_fedkit_error(pki) -> None:
    handler = _Handler(fail_with=SessionExpired("unknown session for site-1; register again"))

    async def run() -> None:
        server = await _serving(pki, handler)
        try:
            async for _ in _client(pki, server).GetTask(pb.GetTaskRequest(session_id="old")):
                pass
        finally:
            await server.stop()

    with pytest.raises(SessionExpired, match="unknown session for site-1; register again"):
        asyncio.run(run())


def test_a_certificate_the_peer_check_refuses_is_told_so_in_one_line(pki) -> None:
    def revoked(identity: Identity, cert: x509.Certificate) -> None:
        raise CertificateError(f"certificate of {identity.name} is revoked")

    async def run() -> None:
        server = await _serving(pki, _Handler(PAYLOAD), check=revoked)
        try:
            async for _ in _client(pki, server).GetTask(pb.GetTaskRequest(session_id="s")):
                pass
        finally:
            await server.stop()

    with pytest.raises(CertificateError) as caught:
        asyncio.run(run())
    assert "refused our certificate: certificate of site-1 is revoked" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_certificate_of_another_ca_fails_the_handshake(pki) -> None:
    handler = _Handler(PAYLOAD)

    async def run() -> None:
        server = await _serving(pki, handler)
        try:
            async for _ in _client(pki, server, "foreign").GetTask(pb.GetTaskRequest(session_id="s")):
                pass
        finally:
            await server.stop()

    with pytest.raises((CertificateError, TransferStalled)):
        asyncio.run(run())
    assert handler.peers == []  # the handler never ran


def test_a_request_that_is_not_fedkits_is_refused(pki) -> None:
    async def run() -> tuple[int, bytes]:
        server = await _serving(pki, _Handler(PAYLOAD))
        try:
            stream = await _raw_connection(pki, server)
            await stream.write(b"GET / HTTP/1.1\r\n\r\n")
            return await stream.read_frame()
        finally:
            await server.stop()

    status, message = asyncio.run(run())
    assert status != 0 and b"not a fedkit bulk-channel request" in message


class _GrpcStub:
    """The gRPC port's bulk stub, as the route sees it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def GetTask(self, request):  # noqa: N802
        self.calls.append("GetTask")

        async def messages():
            yield pb.TaskChunk(idle=pb.Idle()).SerializeToString()
        return messages()

    async def SubmitResult(self, messages, timeout):  # noqa: N802
        self.calls.append("SubmitResult")
        return pb.SubmitReply(accepted=True)


def test_a_closed_bulk_port_falls_back_to_grpc_and_is_retried_later(pki, caplog) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    grpc_stub, now = _GrpcStub(), [0.0]
    client = BulkClient(pki["site"], "127.0.0.1", closed)
    route = BulkRoute(grpc_stub, client, clock=lambda: now[0])
    attempts = []
    connect = client.connect

    async def counted(what: str):
        attempts.append(what)
        return await connect(what)
    client.connect = counted

    async def run() -> None:
        assert [m async for m in route.GetTask(pb.GetTaskRequest())]  # over gRPC
        assert (await route.SubmitResult(_upload([]), timeout=5)).accepted
        now[0] = BulkRoute.RETRY_S + 1
        async for _ in route.GetTask(pb.GetTaskRequest()):
            pass

    asyncio.run(run())
    assert grpc_stub.calls == ["GetTask", "SubmitResult", "GetTask"]
    assert attempts == ["get task", "get task"]  # not again until RETRY_S had passed
    assert "using the gRPC port" in caplog.text
