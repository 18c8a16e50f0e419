"""The bulk channel: tasks and results, with their model bytes, over raw mutual TLS on the server's bulk port.

gRPC costs the model bytes its HTTP/2 framing and copies in and out of its core on both sides: measured
with 2 sites each taking a 40 MB model and sending 40 MB back, the server spent 0.34 CPU-s per round on
gRPC raw messages and 0.17 CPU-s on this channel, whose TLS records decrypt straight into the reader's
buffer (asyncio's SSL transport with a BufferedProtocol) and encrypt straight from the model's memory.

It carries the two calls that move model bytes, with the same handlers, peer check and errors as the gRPC
port: identity comes from the verified client certificate, never from a message. The gRPC port keeps
everything else (register, heartbeat, upload slots, jobs) and both calls too, for a site whose firewall
has no opening for the bulk port: such a site falls back to it (`BulkRoute`).

Wire format (integers big-endian; a frame is u8 status, u32 length, that many bytes):
  request      b"FKB1", u8 call, u32 length, a protobuf: GetTaskRequest, or a ResultChunk header
  GetTask      server: frame(OK, TaskChunk: a header or idle), then exactly header.payload_bytes raw
               bytes; site: b"A" once it has them all (the server records the task as sent only then)
  SubmitResult server: frame(GO) when it is ready for the payload (or a frame with an error);
               site: exactly header.payload_bytes raw bytes, then u32 length + ResultChunk trailer;
               server: frame(OK, SubmitReply)
  a failure    frame(status, UTF-8 message): the number of the gRPC status the same failure gets there
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from cryptography import x509

from .errors import CertificateError, ConfigError, FedkitError, ServerUnreachable, TransferStalled, UpdateRejected
from .identity import Identity, Kind, identity_from_cert
from .proto import fedkit_pb2 as pb
from .transport import (
    CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    FederationHandler,
    PeerCheck,
    RefusalHook,
    TlsFiles,
    error_for_status,
    status_from_number,
    status_number,
)

log = logging.getLogger(__name__)

MAGIC = b"FKB1"
GET_TASK, SUBMIT_RESULT = 1, 2
OK, GO = 0, 255  # 1..16 are gRPC's status numbers (failures)
ACK = b"A"
HANDSHAKE_S = 10.0  # connect and TLS handshake
REQUEST_S = 10.0  # the request, once connected
ACK_S = 30.0  # the site's receipt of a task's last byte
_FRAME = struct.Struct(">BI")
_REQUEST = struct.Struct(">4sBI")


class TlsStream(asyncio.BufferedProtocol):
    """One TLS connection, read into buffers its caller gives: asyncio's SSL transport decrypts each
    record straight into them. Reading is paused whenever no read is waiting, so a peer cannot make this
    side buffer more than the TLS layer's own few hundred KB."""

    def __init__(self, on_open: Callable[[TlsStream], None] | None = None):
        self._on_open = on_open
        self.transport: asyncio.Transport | None = None
        self._target: memoryview | None = None
        self._got = 0
        self._waiter: asyncio.Future | None = None
        self._spill = bytearray()  # bytes that came with no read waiting (the TLS layer may hand some over)
        self._spare = bytearray(64 << 10)
        self._lost: Exception | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.on_lost: Callable[[], None] | None = None  # called once if the connection drops

    # -- asyncio's side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.pause_reading()
        if self._on_open is not None:
            self._on_open(self)

    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        if self._target is None:
            return self._spare
        return self._target[self._got:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is None:
            self._spill += self._spare[:nbytes]
            return
        self._got += nbytes
        if self._got == len(self._target):
            self._done(None)

    def eof_received(self) -> bool:
        self._done(ConnectionError("the peer closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = ConnectionError(f"connection lost ({exc})" if exc else "connection closed")
        self._writable.set()
        self._done(self._lost)
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _done(self, error: Exception | None) -> None:
        self._target = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    # -- the caller's side
    async def read_into(self, view: memoryview) -> None:
        """Fill `view` exactly; ConnectionError if the connection ends first."""
        taken = min(len(self._spill), len(view))
        if taken:
            view[:taken] = self._spill[:taken]
            del self._spill[:taken]
        if taken == len(view):
            return
        if self._lost is not None:
            raise self._lost
        assert self.transport is not None and self._waiter is None
        self._target, self._got = view[taken:], 0
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.resume_reading()
        await self._waiter

    async def read_exactly(self, n: int) -> bytearray:
        buf = bytearray(n)
        if n:
            await self.read_into(memoryview(buf))
        return buf

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data`, waiting while the transport's buffer is over its high-water mark."""
        if self._lost is not None:
            raise self._lost
        assert self.transport is not None
        self.transport.write(data)
        await self._writable.wait()
        if self._lost is not None:
            raise self._lost

    async def read_frame(self, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[int, bytearray]:
        status, length = _FRAME.unpack(await self.read_exactly(_FRAME.size))
        if length > max_bytes:
            raise UpdateRejected(f"a bulk-channel message of {length} bytes exceeds the limit of {max_bytes}")
        return status, await self.read_exactly(length)

    def peer_certificate(self) -> x509.Certificate:
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise CertificateError("peer presented no certificate")
        return x509.load_der_x509_certificate(der)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def frame(status: int, body: bytes = b"") -> bytes:
    return _FRAME.pack(status, len(body)) + body


def _failure(err: BaseException) -> bytes:
    message = str(err) if isinstance(err, FedkitError) else "internal server error (see server log)"
    return frame(status_number(err), message.encode()[:4096])


# ---- the server's side ---------------------------------------------------------------------------------

class BulkServer:
    """The bulk port: accepts mutual-TLS connections and serves one call on each with `handler`."""

    def __init__(self, tls: TlsFiles, host: str, port: int, handler: FederationHandler, check: PeerCheck,
                 on_refused: RefusalHook | None = None):
        tls.read()  # the same checks as the gRPC port's (readable files, a private key kept private)
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.root_ca))
        self._ssl.load_cert_chain(str(tls.cert), str(tls.key))
        self._ssl.verify_mode = ssl.CERT_REQUIRED
        self._host, self._requested_port = host, port
        self._handler, self._check, self._on_refused = handler, check, on_refused
        self._server: asyncio.Server | None = None
        self._calls: set[asyncio.Task] = set()
        self.port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: TlsStream(self._open), self._host, self._requested_port,
                                                    ssl=self._ssl, ssl_handshake_timeout=HANDSHAKE_S)
        except OSError as e:
            raise ConfigError(f"cannot listen on {self._host}:{self._requested_port}: {e.strerror or e}") from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for call in list(self._calls):
            call.cancel()
        await asyncio.gather(*self._calls, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _open(self, stream: TlsStream) -> None:
        call = asyncio.get_running_loop().create_task(self._serve(stream), name="bulk-call")
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)
        stream.on_lost = call.cancel  # a site that hangs up mid-call ends it, as gRPC cancels its handler

    def _identify(self, stream: TlsStream) -> Identity:
        peer = stream.transport.get_extra_info("peername") if stream.transport else None
        try:
            cert = stream.peer_certificate()
            identity = identity_from_cert(cert)
            self._check(identity, cert)
            return identity
        except FedkitError as e:
            if self._on_refused is not None:  # rate-limited log and audit record, as on the gRPC port
                self._on_refused("bulk", str(peer), str(e))
            else:
                log.warning("bulk refused peer %s: %s", peer, e)
            raise

    async def _serve(self, stream: TlsStream) -> None:
        identity: Identity | None = None
        try:
            identity = self._identify(stream)
            async with asyncio.timeout(REQUEST_S):
                magic, call, length = _REQUEST.unpack(await stream.read_exactly(_REQUEST.size))
                if magic != MAGIC or length > MAX_MESSAGE_BYTES:
                    raise UpdateRejected("not a fedkit bulk-channel request")
                body = bytes(await stream.read_exactly(length))
            if call == GET_TASK:
                await self._get_task(identity, stream, _parse(pb.GetTaskRequest, body, "task request"))
            elif call == SUBMIT_RESULT:
                await self._submit_result(identity, stream, _parse(pb.ResultChunk, body, "result header"))
            else:
                raise UpdateRejected(f"unknown bulk-channel call {call}")
        except (ConnectionError, TimeoutError, asyncio.CancelledError) as e:
            log.debug("bulk call from %s ended: %s", identity.name if identity else "?", e or type(e).__name__)
        except Exception as e:
            if not isinstance(e, FedkitError):
                log.exception("bulk: internal error serving %s", identity.name if identity else "?")
            elif identity is not None:
                log.warning("bulk: %s: %s", identity.name, e)
            with contextlib.suppress(ConnectionError):
                await stream.write(_failure(e))
        finally:
            stream.on_lost = None
            stream.close()

    async def _get_task(self, peer: Identity, stream: TlsStream, request: pb.GetTaskRequest) -> None:
        items = aiter(self._handler.get_task(peer, request))
        try:
            head = await anext(items)
            assert isinstance(head, pb.TaskChunk)
            await stream.write(frame(OK, head.SerializeToString()))
            remaining = head.header.payload_bytes if head.WhichOneof("kind") == "header" else 0
            while remaining:
                chunk = await anext(items)
                remaining -= len(chunk)
                await stream.write(chunk)  # a view of the model's one serialized copy: encrypted from there
            if head.WhichOneof("kind") == "header":
                async with asyncio.timeout(ACK_S):
                    if await stream.read_exactly(len(ACK)) != ACK:
                        raise TransferStalled("the site did not confirm the task")
                stream.on_lost = None  # the site has it all: its hanging up now must not undo that
            await anext(items, None)  # the handler's own end (it records the task as sent)
        finally:
            await items.aclose()  # a broken transfer: the handler offers the task again

    async def _submit_result(self, peer: Identity, stream: TlsStream, head: pb.ResultChunk) -> None:
        if head.WhichOneof("kind") != "header":
            raise UpdateRejected("result stream must start with a header")
        declared = head.header.payload_bytes
        left = [declared]

        async def messages() -> AsyncIterator[pb.ResultChunk | bytearray]:
            yield head
            if not declared:
                return
            try:
                await stream.write(frame(GO))  # the handler is ready for the bytes: they may come now
                while left[0]:
                    chunk = await stream.read_exactly(min(CHUNK_BYTES, left[0]))
                    left[0] -= len(chunk)
                    yield chunk
                _status, trailer = await stream.read_frame()
            except ConnectionError as e:  # the handler's cue that the site may send it again
                raise TransferStalled(f"the upload from {peer.name} broke off: {e}") from None
            yield _parse(pb.ResultChunk, bytes(trailer), "trailer")

        reply = await self._handler.submit_result(peer, messages())
        if left[0] and left[0] != declared:
            await _discard(stream, left[0])  # refused mid-way: take the rest so the site reads the reply
        await stream.write(frame(OK, reply.SerializeToString()))


async def _discard(stream: TlsStream, n: int) -> None:
    async with asyncio.timeout(REQUEST_S + n / 1e6):
        while n:
            n -= len(await stream.read_exactly(min(CHUNK_BYTES, n)))
        await stream.read_frame()


def _parse(cls: Any, data: bytes, what: str) -> Any:
    try:
        return cls.FromString(data)
    except Exception:  # protobuf's DecodeError, and anything a hostile message provokes
        raise UpdateRejected(f"malformed {what} on the bulk channel") from None


# ---- the site's side ---------------------------------------------------------------------------------

class BulkClient:
    """Calls on the server's bulk port, one connection per call; errors as fedkit errors (`call_errors`'
    mapping). The calls look like the gRPC bulk stub's, so the daemon uses either the same way."""

    def __init__(self, tls: TlsFiles, host: str, port: int):
        tls.read()
        self._ssl = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.root_ca))
        self._ssl.load_cert_chain(str(tls.cert), str(tls.key))
        self._host, self._port = host, port
        self.target = f"{host}:{port}"

    async def connect(self, what: str) -> TlsStream:
        """A connection to a verified fedkit server; ServerUnreachable if no TCP connection could be made."""
        loop = asyncio.get_running_loop()
        try:
            _transport, stream = await loop.create_connection(
                TlsStream, self._host, self._port, ssl=self._ssl, server_hostname=self._host,
                ssl_handshake_timeout=HANDSHAKE_S)
        except ssl.SSLError as e:
            raise CertificateError(f"{what}: TLS handshake with {self.target} failed: {e}") from None
        except (OSError, TimeoutError) as e:
            raise ServerUnreachable(f"{what}: bulk port {self.target} unreachable: {e}") from None
        try:
            if identity_from_cert(stream.peer_certificate()).kind is not Kind.SERVER:
                raise CertificateError(f"{what}: {self.target} presented a certificate that is not the server's")
        except BaseException:
            stream.close()
            raise
        return stream

    def GetTask(self, request: pb.GetTaskRequest, stream: TlsStream | None = None) -> TaskCall:  # noqa: N802
        return TaskCall(self, request, stream)

    async def SubmitResult(self, messages: AsyncIterator[bytes], timeout: float,  # noqa: N802
                           stream: TlsStream | None = None) -> pb.SubmitReply:
        what = "submit result"
        stream = stream or await self.connect(what)
        try:
            async with asyncio.timeout(timeout):
                iterator = aiter(messages)
                header = await anext(iterator)
                await stream.write(_REQUEST.pack(MAGIC, SUBMIT_RESULT, len(header)) + header)
                declared = pb.ResultChunk.FromString(header).header.payload_bytes
                if declared:
                    status, body = await stream.read_frame()
                    if status == OK:  # answered before it needed the bytes (a refusal, with its reason)
                        return pb.SubmitReply.FromString(bytes(body))
                    if status != GO:
                        raise self._failure(what, status, body)
                    sent = 0
                    async for message in iterator:
                        if sent < declared:
                            sent += len(message)
                            await stream.write(message)
                        else:  # the trailer
                            await stream.write(_FRAME.pack(OK, len(message)) + message)
                status, body = await stream.read_frame()
                if status != OK:
                    raise self._failure(what, status, body)
                return pb.SubmitReply.FromString(bytes(body))
        except TimeoutError:
            raise TransferStalled(f"{what}: no answer from {self.target} within {timeout:.0f} s") from None
        except OSError as e:  # ConnectionError, or the TLS layer's own failure
            raise TransferStalled(f"{what}: the bulk connection to {self.target} broke: {e}") from None
        finally:
            stream.close()

    def _failure(self, what: str, status: int, body: bytes) -> FedkitError:
        return error_for_status(status_from_number(status), bytes(body).decode(errors="replace"), what, self.target)


class TaskCall:
    """One GetTask on the bulk port, used like gRPC's call object: iterate it for the serialized TaskChunk
    then the payload's raw chunks; `cancel()` hangs up."""

    def __init__(self, client: BulkClient, request: pb.GetTaskRequest, stream: TlsStream | None):
        self._client, self._request, self._stream = client, request, stream
        self._messages = self._run()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._messages

    def cancel(self) -> None:
        if self._stream is not None:
            self._stream.close()

    async def _run(self) -> AsyncIterator[bytes]:
        what = "get task"
        if self._stream is None:
            self._stream = await self._client.connect(what)
        stream = self._stream
        try:
            body = self._request.SerializeToString()
            await stream.write(_REQUEST.pack(MAGIC, GET_TASK, len(body)) + body)
            status, head = await stream.read_frame()
            if status != OK:
                raise self._client._failure(what, status, head)
            yield bytes(head)
            chunk = pb.TaskChunk.FromString(bytes(head)) if head else pb.TaskChunk()
            remaining = chunk.header.payload_bytes if chunk.WhichOneof("kind") == "header" else 0
            while remaining:
                piece = await stream.read_exactly(min(CHUNK_BYTES, remaining))
                remaining -= len(piece)
                yield piece
            if chunk.WhichOneof("kind") == "header":
                await stream.write(ACK)
        except OSError as e:
            raise TransferStalled(f"{what}: the bulk connection to {self._client.target} broke: {e}") from None
        finally:
            stream.close()


class BulkRoute:
    """The site's way to the two bulk calls: the bulk port when its kit names one and it answers, else the
    gRPC port's bulk service. A bulk port that cannot be reached (a firewall with no opening for it) is
    logged once and left alone for RETRY_S; its calls go over gRPC meanwhile."""

    RETRY_S = 300.0

    def __init__(self, grpc_stub: Any, client: BulkClient | None, clock: Callable[[], float] = time.monotonic):
        self._grpc = grpc_stub
        self._client = client
        self._clock = clock
        self._avoid_until = 0.0

    async def _stream(self, what: str) -> TlsStream | None:
        if self._client is None or self._clock() < self._avoid_until:
            return None
        try:
            return await self._client.connect(what)
        except ServerUnreachable as e:
            self._avoid_until = self._clock() + self.RETRY_S
            log.warning("%s; using the gRPC port for the model bytes for the next %.0f min", e, self.RETRY_S / 60)
            return None

    def GetTask(self, request: pb.GetTaskRequest) -> _RoutedTaskCall:  # noqa: N802
        return _RoutedTaskCall(self, request)

    async def SubmitResult(self, messages: AsyncIterator[bytes], timeout: float) -> pb.SubmitReply:  # noqa: N802
        stream = await self._stream("submit result")
        if stream is None:
            return await self._grpc.SubmitResult(messages, timeout=timeout)
        assert self._client is not None
        return await self._client.SubmitResult(messages, timeout, stream)


class _RoutedTaskCall:
    def __init__(self, route: BulkRoute, request: pb.GetTaskRequest):
        self._route, self._request = route, request
        self._call: Any = None
        self._messages = self._run()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._messages

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    async def _run(self) -> AsyncIterator[bytes]:
        stream = await self._route._stream("get task")
        if stream is None:
            self._call = self._route._grpc.GetTask(self._request)
        else:
            assert self._route._client is not None
            self._call = self._route._client.GetTask(self._request, stream)
        async for message in self._call:
            yield message
