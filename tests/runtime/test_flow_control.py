"""A reader that stops reading a model (its disk is busy) must not make the transfer pile up in its memory:
a site receiving the global model, and the server receiving an update (times its upload slots). HTTP/2
flow control decides how far the sender may get ahead of what the reader has taken; this checks that
fedkit's real mutual-TLS server and channel keep that bounded on a long link, after a fast start, where
gRPC's bandwidth-delay probing would otherwise widen the window to hundreds of MiB."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from provision.certs import create_ca, issue_credential, save_ca
from provision.project import ClientSpec, ServerSpec
from runtime.identity import Identity
from runtime.proto import fedkit_pb2 as pb
from runtime.transport import (
    CHUNK_BYTES,
    SERVER_WINDOW_BYTES,
    STREAM_WINDOW_BYTES,
    RpcServer,
    TlsFiles,
    bulk_stub,
    header_message,
    open_channel,
    parse_task_head,
)

NOW = dt.datetime.now(dt.UTC)
ONE_WAY_DELAY_S = 0.05  # a 100 ms round trip: a hospital far from the server
FAST_CHUNKS = 256  # read this many at full speed first, so the link's bandwidth-delay product is known
MODEL_CHUNKS = 1024
STALL_S = 2.0
# Past the window: messages queued in gRPC at both ends. Measured 2-17 past it; with gRPC's window probing
# instead, 120-480.
SLACK_CHUNKS = 32


def _tls_pair(folder: Path) -> tuple[TlsFiles, TlsFiles]:
    ca = create_ca("flow", NOW, 1)
    save_ca(ca, folder / "rootCA.pem", folder / "rootCA.key")
    files = []
    for name, spec in [("server", ServerSpec(type="server", name="localhost", org="o", fed_learn_port=1,
                                             admin_port=2, host_names=("127.0.0.1",))),
                       ("site", ClientSpec(type="client", name="site-1", org="o"))]:
        cred = issue_credential(ca, spec, NOW, 1, "flow")
        (folder / f"{name}.crt").write_bytes(cred.cert_pem)
        key = folder / f"{name}.key"
        key.write_bytes(cred.key_pem)
        key.chmod(0o600)
        files.append(TlsFiles(folder / f"{name}.crt", key, folder / "rootCA.pem"))
    return files[0], files[1]


class _Server:
    """Streams a model of MODEL_CHUNKS raw chunks to a site, counting what it handed to gRPC; reads an
    update FAST_CHUNKS at a time, then stops."""

    register = heartbeat = get_job = reserve_upload = presence = None  # not called here

    def __init__(self) -> None:
        self.sent = 0
        self.read = 0

    async def get_task(self, peer: Identity, request: pb.GetTaskRequest) -> AsyncIterator[pb.TaskChunk | bytes]:
        yield pb.TaskChunk(header=pb.TaskHeader(task_id="t", payload_bytes=MODEL_CHUNKS * CHUNK_BYTES))
        chunk = bytes(CHUNK_BYTES)
        for _ in range(MODEL_CHUNKS):
            self.sent += 1
            yield chunk

    async def submit_result(self, peer: Identity, chunks: AsyncIterator[pb.ResultChunk | bytes]) -> pb.SubmitReply:
        await anext(chunks)  # the header
        async for _ in chunks:
            self.read += 1
            if self.read == FAST_CHUNKS:
                await asyncio.sleep(STALL_S)  # the spool's disk is busy: gRPC keeps receiving, nothing is read
                break
        return pb.SubmitReply(accepted=True)


async def _delaying_proxy(target_port: int) -> asyncio.Server:
    """127.0.0.1:<port> -> the server, each byte held ONE_WAY_DELAY_S each way (bandwidth unlimited)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while data := (item := await queue.get())[1]:
                await asyncio.sleep(max(0.0, item[0] + ONE_WAY_DELAY_S - time.monotonic()))
                writer.write(data)
                await writer.drain()
            writer.close()

        forwarding = asyncio.create_task(forward())
        try:
            while data := await reader.read(1 << 16):
                queue.put_nowait((time.monotonic(), data))
        finally:
            queue.put_nowait((time.monotonic(), b""))
            await forwarding

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@contextlib.asynccontextmanager
async def _linked(folder: Path) -> AsyncIterator[tuple[_Server, grpc.aio.Channel]]:
    """fedkit's server and a site's channel to it, over a link of ONE_WAY_DELAY_S each way."""
    server_tls, site_tls = _tls_pair(folder)
    handler = _Server()
    server = RpcServer(server_tls, "127.0.0.1", 0)
    server.add_federation(handler, lambda identity, cert: None)
    await server.start()
    proxy = await _delaying_proxy(server.port)
    channel = open_channel(site_tls, "127.0.0.1", proxy.sockets[0].getsockname()[1])
    try:
        yield handler, channel
    finally:
        await channel.close()
        proxy.close()
        await server.stop(0)


async def _download_ahead(folder: Path) -> int:
    """Chunks the server got ahead of a site that reads FAST_CHUNKS of the model, then stops reading."""
    async with _linked(folder) as (server, channel):
        call = bulk_stub(channel).GetTask(pb.GetTaskRequest(session_id="s"))
        stream = aiter(call)
        assert parse_task_head(await anext(stream)).header.task_id == "t"
        for _ in range(FAST_CHUNKS):
            await anext(stream)
        await asyncio.sleep(STALL_S)  # the site's disk is busy: gRPC keeps receiving, nothing is read
        call.cancel()
        return server.sent - FAST_CHUNKS


async def _upload_ahead(folder: Path) -> int:
    """Chunks a site got ahead of a server that reads FAST_CHUNKS of the update, then stops reading."""
    sent = 0

    async def update() -> AsyncIterator[bytes]:
        nonlocal sent
        yield header_message(pb.ResultHeader(task_id="t", payload_bytes=MODEL_CHUNKS * CHUNK_BYTES))
        chunk = bytes(CHUNK_BYTES)
        for _ in range(MODEL_CHUNKS):
            sent += 1
            yield chunk

    async with _linked(folder) as (server, channel):
        call = bulk_stub(channel).SubmitResult(update())
        while server.read < FAST_CHUNKS:
            await asyncio.sleep(0.05)
        await asyncio.sleep(STALL_S)  # the server is not reading (see _Server.submit_result)
        ahead = sent - server.read
        await call
        return ahead


def test_a_site_that_stops_reading_holds_at_most_a_few_windows_of_the_model(tmp_path: Path) -> None:
    ahead = asyncio.run(_download_ahead(tmp_path))

    assert ahead <= STREAM_WINDOW_BYTES // CHUNK_BYTES + SLACK_CHUNKS, f"the server sent {ahead} MiB past the site"
    assert ahead >= 1  # the stream was flowing: the bound is flow control's, not a stuck sender's


def test_a_server_that_stops_reading_an_update_holds_at_most_a_few_of_its_smaller_windows(tmp_path: Path) -> None:
    ahead = asyncio.run(_upload_ahead(tmp_path))

    # the server's window is smaller: it holds one per upload slot
    assert ahead <= SERVER_WINDOW_BYTES // CHUNK_BYTES + SLACK_CHUNKS, f"the site sent {ahead} MiB past the server"
    assert ahead >= 1
