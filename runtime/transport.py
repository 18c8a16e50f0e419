"""The network seam: gRPC (grpc.aio) with mutual TLS. The only runtime module that imports grpc.

Servers: `RpcServer` hosts adapters that turn each RPC into a call on a plain-Python handler, passing the
peer's `Identity` read from its verified certificate, and map fedkit errors to gRPC status codes.
Clients: `open_channel` plus `call_errors`, which turns gRPC failures into fedkit errors.
Every call has a deadline; nothing here waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

import grpc
from cryptography import x509

from .certs import check_private_key_mode
from .errors import (
    CertificateError,
    ConfigError,
    FedkitError,
    JobRejected,
    PermissionDenied,
    ServerUnreachable,
    SessionExpired,
    TransferStalled,
    UpdateRejected,
)
from .identity import Identity, Kind, identity_from_cert
from .proto import fedkit_pb2 as pb
from .proto import fedkit_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# Chunks are 1 MiB; the cap leaves room for headers and refuses anything absurd early.
MAX_MESSAGE_BYTES = 4 * CHUNK_BYTES
STREAM_WINDOW_BYTES = 32 << 20  # a site's, for the model it downloads (one stream at a time)
# The server's, for each update it receives: it holds one per upload slot (4 by default). At 32 MiB an
# 8-site round of a 40 MB model peaked at 8x the model over idle, at 8 MiB 5x, with rounds no slower.
SERVER_WINDOW_BYTES = 8 << 20
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # find a dead link well within a site's heartbeat timeout (30 s by default)
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # let peers ping that often without being told "too many pings"
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    # Each connection's read buffer grows toward this; with one connection per site it is memory per site.
    ("grpc.experimental.tcp_max_read_chunk_size", 256 << 10),
    # A fixed HTTP/2 window per stream: how far a sender may run ahead of a reader that is not reading (a
    # site writing the model to a busy disk, the server spooling an update): the reader holds that much in
    # memory. gRPC's bandwidth-delay probing widened it to 150-510 MiB after a fast start on a 100 ms link
    # (tests/runtime/test_flow_control.py), and a site daemon once grew 489 MiB receiving a 1 GiB model.
    # Fixed, a download still moves up to STREAM_WINDOW_BYTES per round trip (320 MB/s at 100 ms), an upload
    # SERVER_WINDOW_BYTES (80 MB/s; 4 uploads at once, 320). 16 MiB at both ends made an 8-site round on
    # loopback 15-20% slower (more window updates, more wake-ups); 32 MiB for downloads did not.
    ("grpc.http2.bdp_probe", 0),
]
# no SO_REUSEPORT (gRPC sets it by default): a second server on a port in use, this study's or another's, must
# fail to start, not take half of the connections
_SERVER_OPTIONS = [*_OPTIONS, ("grpc.http2.lookahead_bytes", SERVER_WINDOW_BYTES), ("grpc.so_reuseport", 0)]
_CLIENT_OPTIONS = [*_OPTIONS, ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
                   ("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 10_000)]


@dataclass(frozen=True)
class TlsFiles:
    """A participant's certificate, private key and the project's root CA, as read from its kit."""

    cert: Path
    key: Path
    root_ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """cert, key and root CA bytes; raises CertificateError on an unreadable file or a shared key."""
        check_private_key_mode(self.key)
        try:
            return self.cert.read_bytes(), self.key.read_bytes(), self.root_ca.read_bytes()
        except OSError as e:
            raise CertificateError(f"{e.filename}: cannot read ({e.strerror})") from None

    def own_certificate(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.cert.read_bytes())
        except (OSError, ValueError) as e:
            raise CertificateError(f"{self.cert}: not a readable PEM certificate ({e})") from None


def peer_identity(context: grpc.aio.ServicerContext) -> tuple[Identity, x509.Certificate]:
    """Identity of the caller, from the certificate the TLS handshake verified."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        raise CertificateError("peer presented no client certificate")
    cert = x509.load_pem_x509_certificate(pems[0])
    return identity_from_cert(cert), cert


class PeerCheck(Protocol):
    """Decides whether a verified certificate may use a service (kind, revocation)."""

    def __call__(self, identity: Identity, cert: x509.Certificate) -> None: ...


_STATUS_FOR: list[tuple[type[FedkitError], grpc.StatusCode]] = [
    (CertificateError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (UpdateRejected, grpc.StatusCode.INVALID_ARGUMENT),
    (JobRejected, grpc.StatusCode.FAILED_PRECONDITION),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (SessionExpired, grpc.StatusCode.ABORTED),
]


def _status_for(err: FedkitError) -> grpc.StatusCode:
    for cls, code in _STATUS_FOR:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.FAILED_PRECONDITION


RefusalHook = Callable[[str, str, str], None]  # (service, peer, reason), e.g. to write an audit record
CrlSource = Callable[[], bytes]  # the PEM CRL the server enforces now (b"" when none), served by GetCrl


class _Guard:
    """Checks the caller and maps errors, shared by every adapter method."""

    def __init__(self, check: PeerCheck, service: str, on_refused: RefusalHook | None = None):
        self._check = check
        self._service = service
        self._on_refused = on_refused

    async def identify(self, context: grpc.aio.ServicerContext) -> Identity:
        try:
            identity, cert = peer_identity(context)
            self._check(identity, cert)
            return identity
        except FedkitError as e:
            if self._on_refused is not None:  # it logs, rate-limited: a refused peer retries for ever
                self._on_refused(self._service, str(context.peer()), str(e))
            else:
                log.warning("%s refused peer %s: %s", self._service, context.peer(), e)
            await context.abort(_status_for(e), str(e))
            raise  # unreachable: abort raises

    async def fail(self, context: grpc.aio.ServicerContext, err: Exception, identity: Identity | None) -> None:
        who = identity.name if identity else context.peer()
        if isinstance(err, FedkitError):
            log.warning("%s: %s: %s", self._service, who, err)
            await context.abort(_status_for(err), str(err))
        log.exception("%s: internal error serving %s", self._service, who)
        await context.abort(grpc.StatusCode.INTERNAL, "internal server error (see server log)")


class FederationHandler(Protocol):
    async def register(self, peer: Identity, request: pb.RegisterRequest) -> pb.RegisterReply: ...
    async def heartbeat(self, peer: Identity, request: pb.HeartbeatRequest) -> pb.HeartbeatReply: ...
    # header (or idle) as a TaskChunk, then the payload as raw chunks
    def get_task(self, peer: Identity, request: pb.GetTaskRequest) -> AsyncIterator[pb.TaskChunk | bytes]: ...
    def get_job(self, peer: Identity, request: pb.GetJobRequest) -> AsyncIterator[pb.DataChunk]: ...
    async def reserve_upload(self, peer: Identity, request: pb.ReserveRequest) -> pb.ReserveReply: ...
    # header, payload (raw bytes on the bulk service, `data` chunks on the legacy one), trailer
    async def submit_result(self, peer: Identity,
                            chunks: AsyncIterator[pb.ResultChunk | bytes]) -> pb.SubmitReply: ...
    def presence(self, peer: Identity, request: pb.PresenceRequest) -> AsyncIterator[pb.PresenceEvent]: ...


class AdminHandler(Protocol):
    async def command(self, peer: Identity, request: pb.AdminRequest) -> pb.AdminReply: ...
    async def upload(self, peer: Identity, chunks: AsyncIterator[pb.UploadChunk]) -> pb.AdminReply: ...
    def download(self, peer: Identity, request: pb.AdminRequest) -> AsyncIterator[pb.DataChunk]: ...


def _unary(guard: _Guard, fn: Callable[..., Any]):
    async def method(request, context):
        identity = await guard.identify(context)
        try:
            return await fn(identity, request)
        except Exception as e:
            await guard.fail(context, e, identity)
    return method


def _server_stream(guard: _Guard, fn: Callable[..., AsyncIterator[Any]]):
    async def method(request, context):
        identity = await guard.identify(context)
        try:
            async for item in fn(identity, request):
                yield item
        except Exception as e:
            await guard.fail(context, e, identity)
    return method


async def _until_broken(request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """The peer's messages; raises TransferStalled if the stream ended because the call broke (a reset
    connection ends gRPC's request iterator as if the peer had finished)."""
    async for message in request_iterator:
        yield message
    if context.cancelled() or context.done():
        raise TransferStalled("the peer's stream broke off before it finished")


def _client_stream(guard: _Guard, fn: Callable[..., Any]):
    async def method(request_iterator, context):
        identity = await guard.identify(context)
        try:
            return await fn(identity, _until_broken(request_iterator, context))
        except Exception as e:
            await guard.fail(context, e, identity)
    return method


def _get_crl(guard: _Guard, crl: CrlSource):
    async def get_crl(identity: Identity, request: pb.CrlRequest) -> pb.CrlReply:
        return pb.CrlReply(crl_pem=crl())
    return _unary(guard, get_crl)


class _FederationAdapter(pb_grpc.FederationServicer):
    def __init__(self, handler: FederationHandler, check: PeerCheck, on_refused: RefusalHook | None,
                 crl: CrlSource | None):
        guard = _Guard(check, "federation", on_refused)
        if crl is not None:  # else GetCrl answers UNIMPLEMENTED, which sites refuse
            self.GetCrl = _get_crl(guard, crl)
        self.Register = _unary(guard, handler.register)
        self.Heartbeat = _unary(guard, handler.heartbeat)
        self.GetTask = _legacy_task_stream(guard, handler.get_task)
        self.GetJob = _server_stream(guard, handler.get_job)
        self.ReserveUpload = _unary(guard, handler.reserve_upload)
        self.SubmitResult = _client_stream(guard, handler.submit_result)
        self.Presence = _server_stream(guard, handler.presence)


def _legacy_task_stream(guard: _Guard, fn: Callable[..., AsyncIterator[Any]]):
    """GetTask on the protobuf service, for a site of the release before the bulk service: the same
    handler, its raw chunks wrapped in TaskChunk `data` fields (the copies the bulk path saves)."""
    async def as_messages(identity: Identity, request: pb.GetTaskRequest) -> AsyncIterator[pb.TaskChunk]:
        async for item in fn(identity, request):
            yield item if isinstance(item, pb.TaskChunk) else pb.TaskChunk(data=bytes(item))
    return _server_stream(guard, as_messages)


# ---- the bulk service: model bytes as raw gRPC messages --------------------------------------------------
# Weights used to travel in protobuf `bytes` fields, which costs a copy into the message and one out of its
# serialization on each side, per chunk. The bulk service carries the same calls with identity
# (de)serializers: its first message is the protobuf header, then the payload as raw messages (exactly the
# declared payload_bytes, however they are cut), then, on uploads, the protobuf trailer. Same port, same
# mutual TLS, same peer check: only the framing differs. A site of another release meets UNIMPLEMENTED
# (or FAILED_PRECONDITION on the old names) and `call_errors` turns that into one line naming the cause.
BULK_SERVICE = "fedkit.Bulk"
_GET_TASK = f"/{BULK_SERVICE}/GetTask"
_SUBMIT_RESULT = f"/{BULK_SERVICE}/SubmitResult"
RawChunk = bytes | memoryview


def _as_wire(item: pb.TaskChunk | RawChunk) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, memoryview):
        return item.tobytes()  # gRPC's send takes only bytes
    return item.SerializeToString()


def _bulk_task_stream(guard: _Guard, fn: Callable[..., AsyncIterator[Any]]):
    async def method(request, context):
        identity = await guard.identify(context)
        try:
            async for item in fn(identity, request):
                yield _as_wire(item)
        except Exception as e:
            await guard.fail(context, e, identity)
    return method


def _parse(cls: type[T], data: bytes, what: str) -> T:
    try:
        return cls.FromString(data)
    except Exception:  # protobuf's DecodeError, and anything a hostile message provokes
        raise UpdateRejected(f"malformed {what} in the result stream") from None


async def decode_result_stream(messages: AsyncIterator[bytes]) -> AsyncIterator[pb.ResultChunk | bytes]:
    """A bulk upload as the handler reads it: the ResultChunk header, the raw payload messages (bytes), then
    any ResultChunk trailer. Bytes past the declared size are refused before they are buffered."""
    iterator = aiter(messages)
    first = await anext(iterator, None)
    if first is None:
        return
    head = _parse(pb.ResultChunk, first, "header")
    yield head
    remaining = head.header.payload_bytes if head.WhichOneof("kind") == "header" else 0
    async for message in iterator:
        if remaining:
            if len(message) > remaining:
                raise UpdateRejected(f"payload longer than the declared {head.header.payload_bytes} bytes")
            remaining -= len(message)
            yield message
        else:
            yield _parse(pb.ResultChunk, message, "trailer")


def _bulk_result_stream(guard: _Guard, fn: Callable[..., Any]):
    async def method(request_iterator, context):
        identity = await guard.identify(context)
        try:
            return await fn(identity, decode_result_stream(_until_broken(request_iterator, context)))
        except Exception as e:
            await guard.fail(context, e, identity)
    return method


def _bulk_handler(handler: FederationHandler, check: PeerCheck, on_refused: RefusalHook | None):
    guard = _Guard(check, "federation", on_refused)
    return grpc.method_handlers_generic_handler(BULK_SERVICE, {
        "GetTask": grpc.unary_stream_rpc_method_handler(
            _bulk_task_stream(guard, handler.get_task), request_deserializer=pb.GetTaskRequest.FromString),
        "SubmitResult": grpc.stream_unary_rpc_method_handler(
            _bulk_result_stream(guard, handler.submit_result),
            response_serializer=pb.SubmitReply.SerializeToString),
    })


class BulkStub:
    """The site's side of the bulk service: GetTask answers raw messages (the first one a serialized
    TaskChunk), SubmitResult takes raw messages (see `result_messages`)."""

    def __init__(self, channel: grpc.aio.Channel):
        self.GetTask = channel.unary_stream(_GET_TASK, request_serializer=pb.GetTaskRequest.SerializeToString)
        self.SubmitResult = channel.stream_unary(_SUBMIT_RESULT, response_deserializer=pb.SubmitReply.FromString)


def parse_task_head(message: bytes) -> pb.TaskChunk:
    """The first message of a bulk GetTask answer; raises FedkitError if it is not a TaskChunk."""
    try:
        return pb.TaskChunk.FromString(message)
    except Exception:
        raise FedkitError("get task: the server's answer is not a fedkit task header "
                          "(is the server of another fedkit version?)") from None


def header_message(header: pb.ResultHeader) -> bytes:
    return pb.ResultChunk(header=header).SerializeToString()


def trailer_message(sha256_hex: str) -> bytes:
    return pb.ResultChunk(sha256=sha256_hex).SerializeToString()


class _AdminAdapter(pb_grpc.AdminServicer):
    def __init__(self, handler: AdminHandler, check: PeerCheck, on_refused: RefusalHook | None,
                 crl: CrlSource | None):
        guard = _Guard(check, "admin", on_refused)
        if crl is not None:
            self.GetCrl = _get_crl(guard, crl)
        self.Command = _unary(guard, handler.command)
        self.Upload = _client_stream(guard, handler.upload)
        self.Download = _server_stream(guard, handler.download)


def require_kind(kind: Kind, extra: PeerCheck | None = None) -> PeerCheck:
    """A PeerCheck that admits only certificates of `kind` (and passes `extra`, e.g. revocation)."""

    def check(identity: Identity, cert: x509.Certificate) -> None:
        if identity.kind is not kind:
            raise CertificateError(
                f"the {identity.kind.value} certificate of '{identity.name}' cannot be used on the {kind.value} port")
        if extra is not None:
            extra(identity, cert)

    return check


def refuse_taken_addresses(host: str, port: int) -> None:
    """Raise ConfigError when `port` is taken on any address `host` resolves to. gRPC listens on those it
    can and only logs the others: with 127.0.0.1:PORT held by another program, a server listened on ::1
    alone and said it was up, while every site dialing 127.0.0.1 reached the other program."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return  # gRPC's own bind says why
    for family, kind, proto, _, sockaddr in {(i[0], i[1], i[2], i[3], i[4]) for i in infos}:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no clash
            try:
                probe.bind(sockaddr)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:  # not an address of this machine: gRPC skips it too
                    continue
                raise ConfigError(f"cannot listen on {host_port(host, port)}: {sockaddr[0]} port {port}: "
                                  f"{e.strerror or e} (another program holds it; stop it or choose another port "
                                  "in project.yml)") from None


class RpcServer:
    """One gRPC server on one port with mutual TLS; start/stop it from async code."""

    def __init__(self, tls: TlsFiles, host: str, port: int):
        cert, key, root = tls.read()
        self._server = grpc.aio.server(options=_SERVER_OPTIONS)
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=root, require_client_auth=True)
        address = host_port(host, port)
        if port:
            refuse_taken_addresses(host, port)
        try:
            self.port = self._server.add_secure_port(address, creds)
        except RuntimeError as e:
            raise ConfigError(f"cannot listen on {address}: {e}") from None
        if self.port == 0:
            raise ConfigError(f"cannot listen on {address}: address in use or not local")

    def add_federation(self, handler: FederationHandler, check: PeerCheck,
                       on_refused: RefusalHook | None = None, crl: CrlSource | None = None) -> None:
        pb_grpc.add_FederationServicer_to_server(_FederationAdapter(handler, check, on_refused, crl), self._server)
        self._server.add_generic_rpc_handlers((_bulk_handler(handler, check, on_refused),))

    def add_admin(self, handler: AdminHandler, check: PeerCheck, on_refused: RefusalHook | None = None,
                  crl: CrlSource | None = None) -> None:
        pb_grpc.add_AdminServicer_to_server(_AdminAdapter(handler, check, on_refused, crl), self._server)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace_s: float = 5.0) -> None:
        await self._server.stop(grace_s)


def host_port(host: str, port: int) -> str:
    """gRPC's address of `host` and `port`: an IPv6 literal (a server.yml listen_host of '::') in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def open_channel(tls: TlsFiles, host: str, port: int) -> grpc.aio.Channel:
    """A mutual-TLS channel to the server; the server's certificate must name `host`."""
    cert, key, root = tls.read()
    creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)
    return grpc.aio.secure_channel(host_port(host, port), creds, options=_CLIENT_OPTIONS)


def bulk_stub(channel: grpc.aio.Channel) -> BulkStub:
    return BulkStub(channel)


def federation_stub(channel: grpc.aio.Channel) -> pb_grpc.FederationStub:
    return pb_grpc.FederationStub(channel)


def admin_stub(channel: grpc.aio.Channel) -> pb_grpc.AdminStub:
    return pb_grpc.AdminStub(channel)


@contextlib.contextmanager
def call_errors(what: str, target: str) -> Iterator[None]:
    """Turn a failed gRPC call into the fedkit error a person can act on."""
    try:
        yield
    except grpc.aio.AioRpcError as e:
        code, details = e.code(), (e.details() or "").replace("\n", " ")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            if "handshake" in details.lower() or "ssl" in details.lower() or "certificate" in details.lower():
                raise CertificateError(f"{what}: TLS handshake with {target} failed: {details}") from None
            raise ServerUnreachable(f"{what}: server {target} unreachable ({code.name}): {details}") from None
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise CertificateError(f"{what}: {target} refused our certificate: {details}") from None
        if code == grpc.StatusCode.PERMISSION_DENIED:  # the server's "denied: ..." line is whole as it is
            raise PermissionDenied(details if details.startswith("denied:") else f"{what}: {details}") from None
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise UpdateRejected(f"{what}: {details}") from None
        if code == grpc.StatusCode.ABORTED:
            raise SessionExpired(f"{what}: {details}") from None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise FedkitError(f"{what}: {target} does not offer this call: it runs another fedkit version "
                              f"(update the server and the sites' kits to the same release)") from None
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            raise JobRejected(f"{what}: {details}") from None
        raise FedkitError(f"{what}: {target} answered {code.name}: {details}") from None


def is_retryable(err: FedkitError) -> bool:
    """Errors worth a retry with backoff (the link or server may come back)."""
    return isinstance(err, ServerUnreachable | TransferStalled)


T = TypeVar("T")
# A transfer that moves no message for this long is considered stalled, whatever its total size.
IDLE_TIMEOUT_S = 20.0


async def with_idle_timeout(messages: AsyncIterator[T], idle_timeout_s: float = IDLE_TIMEOUT_S,
                            what: str = "transfer") -> AsyncIterator[T]:
    """Yield from `messages`, raising TransferStalled if the next one takes longer than `idle_timeout_s`.

    A whole-call deadline cannot fit both a 4 MB and a 4 GB model on links of unknown speed; a bound on
    the gap between messages catches a stalled link either way."""
    iterator = aiter(messages)
    while True:
        try:
            item = await asyncio.wait_for(anext(iterator), idle_timeout_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise TransferStalled(f"{what} stalled: nothing arrived for {idle_timeout_s:g} s") from None
        yield item


def iter_chunks(payload: bytes | memoryview, chunk_bytes: int = CHUNK_BYTES) -> Iterable[bytes]:
    view = memoryview(payload)
    for start in range(0, len(view), chunk_bytes):
        yield bytes(view[start:start + chunk_bytes])


class PayloadReceiver:
    """Collects a declared-size payload from chunks, into a buffer or straight into a file (`sink`).

    Refuses more bytes than declared, fewer than declared, and a SHA-256 mismatch, so a partial or
    corrupted transfer never becomes a model. The hash is given up front or, with `sha256=""`, at
    `finish` (a trailer).

    Memory follows what arrived, not what the peer declared: a reused `buffer` of exactly the declared
    size is filled in place (its memory is already held), otherwise the buffer grows with the data, so a
    site that declares 1 GiB and sends nothing costs nothing."""

    def __init__(self, declared_bytes: int, limit_bytes: int, sha256: str = "",
                 buffer: bytearray | None = None, sink: BinaryIO | None = None, verify_sha256: bool = True):
        if declared_bytes > limit_bytes:
            raise UpdateRejected(f"declared payload of {declared_bytes} bytes exceeds the limit of {limit_bytes}")
        self._declared = declared_bytes
        self._sink = sink
        if sink is None:
            self._in_place = buffer is not None and len(buffer) == declared_bytes
            self._buf = buffer if buffer is not None and self._in_place else bytearray()
        self._pos = 0
        self._sha = sha256
        self._hash = hashlib.sha256() if verify_sha256 else None

    def add(self, chunk: bytes) -> None:
        end = self._pos + len(chunk)
        if end > self._declared:
            raise UpdateRejected(f"payload longer than the declared {self._declared} bytes")
        if self._sink is not None:
            self._sink.write(chunk)
        elif self._in_place:
            self._buf[self._pos:end] = chunk
        else:
            self._buf += chunk
        if self._hash is not None:
            self._hash.update(chunk)
        self._pos = end

    def finish(self, trailer_sha256: str = "") -> bytearray:
        """The payload (empty when it went to a sink), once complete and matching its hash."""
        if self._pos != self._declared:
            raise UpdateRejected(f"payload ended after {self._pos} of {self._declared} declared bytes")
        expected = self._sha or trailer_sha256
        if self._hash is not None:
            if not expected:
                raise UpdateRejected("payload came without a SHA-256")
            if self._hash.hexdigest() != expected:
                raise UpdateRejected("payload SHA-256 does not match what the sender declared")
        return self._buf if self._sink is None else bytearray()

    @property
    def sha256(self) -> str:
        """The hash of what arrived (the declared one when not verifying)."""
        return self._hash.hexdigest() if self._hash is not None else self._sha
