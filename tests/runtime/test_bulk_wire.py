"""runtime/transport.py bulk service: the model bytes travel as raw gRPC messages between a protobuf header
and trailer. What arrives is exactly what was sent, bytes past the declared size or a malformed header are
refused with one line, and a site that meets a server without the bulk service is told it is a version
mismatch rather than shown a gRPC status."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import grpc
import pytest

from runtime.errors import FedkitError, UpdateRejected
from runtime.identity import Identity, Kind
from runtime.proto import fedkit_pb2 as pb
from runtime.proto import fedkit_pb2_grpc as pb_grpc
from runtime.transport import (
    _bulk_handler,
    _FederationAdapter,
    bulk_stub,
    call_errors,
    decode_result_stream,
    header_message,
    parse_task_head,
    trailer_message,
)


async def _messages(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def _collect(items: list[bytes]) -> list[pb.ResultChunk | bytes]:
    return [m async for m in decode_result_stream(_messages(items))]


def _header(n: int) -> bytes:
    return header_message(pb.ResultHeader(task_id="t", payload_bytes=n))


def test_an_upload_decodes_to_header_raw_payload_and_trailer() -> None:
    data = bytes(range(256)) * 40
    digest = hashlib.sha256(data).hexdigest()
    out = asyncio.run(_collect([_header(len(data)), data[:1000], data[1000:], trailer_message(digest)]))

    assert out[0].header.payload_bytes == len(data)
    assert b"".join(out[1:-1]) == data
    assert out[-1].sha256 == digest


def test_bytes_past_the_declared_size_are_refused() -> None:
    with pytest.raises(UpdateRejected, match="longer than the declared 10 bytes"):
        asyncio.run(_collect([_header(10), b"x" * 11]))


def test_a_malformed_header_is_refused_with_one_line() -> None:
    with pytest.raises(UpdateRejected, match="malformed header"):
        asyncio.run(_collect([b"\xff\xff\xff not protobuf"]))


def test_a_task_answer_that_is_not_a_header_names_a_version_mismatch() -> None:
    with pytest.raises(FedkitError, match="another fedkit version"):
        parse_task_head(b"\xff\xff\xff not protobuf")


class _Handler:
    """The federation handler as the bulk service sees it: one task of raw chunks, one upload."""

    register = heartbeat = get_job = reserve_upload = presence = None  # not called here

    def __init__(self, payload: bytes):
        self.payload = payload
        self.received: list[bytes] = []

    async def get_task(self, peer: Identity, request: pb.GetTaskRequest) -> AsyncIterator[pb.TaskChunk | bytes]:
        yield pb.TaskChunk(header=pb.TaskHeader(task_id="t1", payload_bytes=len(self.payload)))
        view = memoryview(self.payload)
        for start in range(0, len(view), 300_000):
            yield view[start:start + 300_000]  # a memoryview slice of the one buffer, as a Payload may give

    async def submit_result(self, peer: Identity, chunks: AsyncIterator[pb.ResultChunk | bytes]) -> pb.SubmitReply:
        async for chunk in chunks:
            self.received.append(chunk if isinstance(chunk, bytes) else chunk.SerializeToString())
        return pb.SubmitReply(accepted=True)


async def _loopback(handler: _Handler | None) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    if handler is not None:
        server.add_generic_rpc_handlers((_bulk_handler(handler, lambda identity, cert: None, None),))
    else:  # a server of the release before the bulk service: only the protobuf Federation service
        pb_grpc.add_FederationServicer_to_server(pb_grpc.FederationServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_the_bulk_service_moves_the_bytes_unchanged_over_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    # the peer check reads the TLS certificate; this loopback server has none, so the identity is given
    monkeypatch.setattr("runtime.transport.peer_identity",
                        lambda context: (Identity("site-1", "org-1", Kind.CLIENT), None))
    payload = hashlib.sha256(b"seed").digest() * 40_000  # 1.28 MB: several raw messages
    handler = _Handler(payload)

    async def run() -> tuple[pb.TaskChunk, bytes, pb.SubmitReply]:
        server, port = await _loopback(handler)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = bulk_stub(channel)
                call = stub.GetTask(pb.GetTaskRequest(session_id="s", wait_s=1.0), timeout=30)
                messages = [m async for m in call]
                head, body = parse_task_head(messages[0]), b"".join(messages[1:])
                upload = [header_message(pb.ResultHeader(task_id="t1", payload_bytes=len(body))),
                          body[:500_000], body[500_000:], trailer_message("abc")]
                reply = await stub.SubmitResult(_messages(upload), timeout=30)
                return head, body, reply
        finally:
            await server.stop(None)

    head, body, reply = asyncio.run(run())

    assert head.header.payload_bytes == len(payload)
    assert body == payload
    assert reply.accepted
    assert pb.ResultChunk.FromString(handler.received[0]).header.task_id == "t1"
    assert b"".join(handler.received[1:-1]) == payload
    assert pb.ResultChunk.FromString(handler.received[-1]).sha256 == "abc"


def test_a_server_without_the_bulk_service_is_reported_as_another_version() -> None:
    async def run() -> None:
        server, port = await _loopback(None)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with call_errors("get task", "server:8002"):
                    call = bulk_stub(channel).GetTask(pb.GetTaskRequest(session_id="s"), timeout=30)
                    async for _ in call:
                        pass
        finally:
            await server.stop(None)

    with pytest.raises(FedkitError) as caught:
        asyncio.run(run())
    message = str(caught.value)
    assert "another fedkit version" in message and "\n" not in message


def test_a_site_of_the_previous_release_still_gets_its_task_in_protobuf_chunks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("runtime.transport.peer_identity",
                        lambda context: (Identity("site-1", "org-1", Kind.CLIENT), None))
    payload = hashlib.sha256(b"old").digest() * 40_000
    handler = _Handler(payload)

    async def run() -> list[pb.TaskChunk]:
        server = grpc.aio.server()
        adapter = _FederationAdapter(handler, lambda identity, cert: None, None, None)
        pb_grpc.add_FederationServicer_to_server(adapter, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = pb_grpc.FederationStub(channel).GetTask(pb.GetTaskRequest(session_id="s"), timeout=30)
                return [m async for m in call]
        finally:
            await server.stop(None)

    messages = asyncio.run(run())

    assert messages[0].header.payload_bytes == len(payload)
    assert b"".join(m.data for m in messages[1:]) == payload
