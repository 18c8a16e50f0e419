"""A fault-injecting TCP proxy for end-to-end tests: sites dial it, it forwards to the server.

It listens on 127.0.0.1 (a free port unless one is given) and runs its own asyncio loop in a background
thread, so a synchronous test can switch its mode while real processes talk through it:

    pass_()                       forward everything
    delay(ms)                     hold each chunk `ms` milliseconds before forwarding it
    stall()                       stop forwarding (sockets stay open, nothing is read); pass_() resumes
    stall(after_bytes, ...)       freeze only a connection that forwarded `after_bytes` more bytes (black hole)
    drop(after_bytes, ...)        close a connection (FIN) once it forwarded `after_bytes` more bytes
    reset(after_bytes, ...)       likewise, but abort with a TCP RST (SO_LINGER 0) on both sides

`direction` picks what counts and what is affected: "up" (site -> server), "down" (server -> site) or
"both". `drop`, `reset` and a byte-triggered `stall` fire on at most `times` connections and then fall
back to pass, so a retried transfer can succeed. It never changes the bytes it forwards (TLS passes as is).
`pids=` (stall, drop, reset) limits a fault to connections dialed by those processes (found through
/proc: the client socket's inode among the process's file descriptors), so a test can cut one site's link
when several sites share the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal

Direction = Literal["up", "down", "both"]

READ_BYTES = 64 << 10
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class Mode(StrEnum):
    PASS = "pass"
    DELAY = "delay"
    STALL = "stall"
    DROP = "drop"
    RESET = "reset"


_TRIGGERED = (Mode.DROP, Mode.RESET, Mode.STALL)  # modes that may wait for `after_bytes`, on `times` connections


@dataclass(frozen=True)
class Fault:
    """What the proxy does now; `generation` tells a connection that the fault changed (byte counts restart)."""

    mode: Mode = Mode.PASS
    direction: Direction = "both"
    delay_ms: float = 0.0
    after_bytes: int = 0  # DROP, RESET, STALL: bytes a connection forwards before it fires; -1: at once, all
    times: int = 1
    generation: int = 0
    pids: frozenset[int] = frozenset()  # only connections dialed by these processes; empty: any

    def applies_to(self, direction: str) -> bool:
        return self.direction in ("both", direction)


@dataclass
class Stats:
    """What went through, for tests that wait for a transfer to be under way."""

    connections_accepted: int = 0
    connections_open: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    faults_fired: list[str] = field(default_factory=list)
    fired_at: list[float] = field(default_factory=list)  # time.time() of each, to compare with audit records


class _Connection:
    def __init__(self, proxy: FaultProxy, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter]):
        self.proxy = proxy
        self.client_reader, self.client_writer = client
        self.server_reader, self.server_writer = server
        self.counted: dict[str, tuple[int, int]] = {}  # direction -> (fault generation, bytes since)
        self.closed = False
        self.frozen: set[str] = set()  # directions stalled on this connection alone, until pass_()
        self.client_port = int(self.client_writer.get_extra_info("peername")[1])
        self._owned_by: dict[int, bool] = {}  # pid -> whether it dialed this connection (cached)

    def dialed_by(self, pids: frozenset[int]) -> bool:
        """Whether one of `pids` holds the client end of this connection (any process when empty)."""
        if not pids:
            return True
        for pid in pids:
            if pid not in self._owned_by:
                self._owned_by[pid] = _holds_socket(pid, self.client_port, self.proxy.port)
        return any(self._owned_by[pid] for pid in pids)

    async def run(self) -> None:
        up = asyncio.create_task(self._pump(self.client_reader, self.server_writer, "up"))
        down = asyncio.create_task(self._pump(self.server_reader, self.client_writer, "down"))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self.close(rst=False)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        proxy = self.proxy
        while True:
            await proxy._not_stalled(self, direction)
            data = await reader.read(READ_BYTES)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            while data:
                await proxy._not_stalled(self, direction)  # a stall set while this chunk was read holds it too
                fault = proxy.fault
                if fault.applies_to(direction) and fault.mode is Mode.DELAY and fault.delay_ms > 0:
                    await asyncio.sleep(fault.delay_ms / 1000)
                    fault = proxy.fault
                if fault.applies_to(direction) and fault.after_bytes >= 0 and fault.mode in _TRIGGERED \
                        and self.dialed_by(fault.pids):
                    gen, seen = self.counted.get(direction, (fault.generation, 0))
                    seen = seen if gen == fault.generation else 0
                    room = fault.after_bytes - seen
                    if room < len(data) and proxy._take_shot(fault):
                        if room > 0:
                            self._count(direction, room)
                            writer.write(data[:room])
                            with contextlib.suppress(OSError, ConnectionError):
                                await writer.drain()
                        if fault.mode is Mode.STALL:
                            self.frozen.add(direction)  # the rest waits until pass_()
                            data = data[max(room, 0):]
                            continue
                        self.close(rst=fault.mode is Mode.RESET)
                        return
                    self.counted[direction] = (fault.generation, seen + len(data))
                self._count(direction, len(data))
                writer.write(data)
                await writer.drain()
                data = b""

    def _count(self, direction: str, n: int) -> None:
        if direction == "up":
            self.proxy.stats.bytes_up += n
        else:
            self.proxy.stats.bytes_down += n

    def close(self, rst: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for writer in (self.client_writer, self.server_writer):
            if rst:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()


class FaultProxy:
    """TCP proxy 127.0.0.1:`listen_port` -> `target_host`:`target_port` with switchable faults.

    Use as a context manager, or call start() and stop(). Mode setters are safe to call from any thread.
    """

    def __init__(self, target_port: int, listen_port: int = 0, target_host: str = "127.0.0.1"):
        self.target_host, self.target_port = target_host, target_port
        self.port = listen_port
        self.fault = Fault()
        self.stats = Stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._connections: set[_Connection] = set()
        self._changed: asyncio.Event | None = None  # replaced (and the old one set) on every fault change
        self._stop: asyncio.Event | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run_thread, name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise TimeoutError(f"fault proxy did not start within {START_TIMEOUT_S:g} s")
        if self._start_error is not None:
            raise RuntimeError(f"fault proxy could not listen on 127.0.0.1:{self.port}") from self._start_error
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            raise TimeoutError(f"fault proxy did not stop within {STOP_TIMEOUT_S:g} s")
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run_thread(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        try:
            server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        except OSError as e:
            self._start_error = e
            self._ready.set()
            return
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for conn in list(self._connections):
                conn.close(rst=True)
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), STOP_TIMEOUT_S / 2)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        # asyncio (3.11) logs a cancelled connection callback as an error, so stopping ends these quietly
        with contextlib.suppress(asyncio.CancelledError):
            await self._forward(client_reader, client_writer)

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.stats.connections_accepted += 1
        try:
            server = await asyncio.wait_for(asyncio.open_connection(self.target_host, self.target_port), 10.0)
        except (OSError, TimeoutError):
            client_writer.close()  # the server is down: the site sees a closed connection, as it would
            return
        conn = _Connection(self, (client_reader, client_writer), server)
        self._connections.add(conn)
        self.stats.connections_open += 1
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)
            self.stats.connections_open -= 1

    # ---- faults ----------------------------------------------------------------------------------

    def _set(self, mode: Mode, **kwargs: object) -> None:
        def apply() -> None:
            self._replace_fault(Fault(mode=mode, generation=self.fault.generation + 1, **kwargs))  # type: ignore[arg-type]

        self._call(apply)

    def _replace_fault(self, fault: Fault) -> None:
        """On the proxy's loop: switch the fault and wake every pump waiting out a stall to look again."""
        assert self._changed is not None
        self.fault = fault
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    def _call(self, fn) -> None:
        """Run `fn` on the proxy's loop and wait for it, so a mode is in force when the setter returns."""
        if self._loop is None:
            raise RuntimeError("fault proxy is not running")
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        if not done.wait(START_TIMEOUT_S):
            raise TimeoutError("fault proxy loop did not answer")

    def pass_(self) -> None:
        """Forward everything again, including connections a one-shot stall froze."""

        def thaw_and_pass() -> None:
            for conn in self._connections:
                conn.frozen.clear()
            self._replace_fault(Fault(generation=self.fault.generation + 1))

        self._call(thaw_and_pass)

    def delay(self, ms: float, direction: Direction = "both") -> None:
        self._set(Mode.DELAY, delay_ms=float(ms), direction=direction)

    def stall(self, direction: Direction = "both", after_bytes: int = -1, times: int = 1,
              pids: frozenset[int] = frozenset()) -> None:
        """Stop forwarding. By default every connection, open or new, at once, until pass_(). With
        `after_bytes` >= 0, only the first `times` connections (of `pids`, if given) that forward that many
        more bytes freeze (a black-holed flow: sockets open, nothing moves) while others pass; pass_()
        thaws them."""
        self._set(Mode.STALL, direction=direction, after_bytes=int(after_bytes), times=times, pids=frozenset(pids))

    def drop(self, after_bytes: int, direction: Direction = "both", times: int = 1,
             pids: frozenset[int] = frozenset()) -> None:
        self._set(Mode.DROP, after_bytes=int(after_bytes), direction=direction, times=times, pids=frozenset(pids))

    def reset(self, after_bytes: int = 0, direction: Direction = "both", times: int = 1,
              pids: frozenset[int] = frozenset()) -> None:
        self._set(Mode.RESET, after_bytes=int(after_bytes), direction=direction, times=times, pids=frozenset(pids))

    def reset_all_now(self) -> int:
        """Abort every open connection with a RST at once; returns how many there were."""
        count = [0]

        def abort() -> None:
            count[0] = len(self._connections)
            for conn in list(self._connections):
                conn.close(rst=True)
            self.stats.faults_fired.append(f"reset_all:{count[0]}")
            self.stats.fired_at.append(time.time())

        self._call(abort)
        return count[0]

    def _take_shot(self, fault: Fault) -> bool:
        """A drop/reset fires on at most `fault.times` connections, then the proxy passes again."""
        if fault is not self.fault:
            return False
        left = fault.times - 1
        self.stats.faults_fired.append(f"{fault.mode.value}:{fault.direction}:{fault.after_bytes}")
        self.stats.fired_at.append(time.time())
        if left <= 0:
            self._replace_fault(Fault(generation=fault.generation + 1))
        else:
            self.fault = Fault(mode=fault.mode, direction=fault.direction, after_bytes=fault.after_bytes,
                               times=left, generation=fault.generation, pids=fault.pids)
        return True

    async def _not_stalled(self, conn: _Connection, direction: str) -> None:
        while direction in conn.frozen or (
                self.fault.mode is Mode.STALL and self.fault.after_bytes < 0 and self.fault.applies_to(direction)):
            assert self._changed is not None
            await self._changed.wait()


def _holds_socket(pid: int, local_port: int, remote_port: int) -> bool:
    """Whether process `pid` has the loopback TCP socket local_port -> remote_port among its file
    descriptors (its inode from /proc/net/tcp and tcp6, matched against /proc/PID/fd)."""
    wanted = f":{local_port:04X}", f":{remote_port:04X}"
    inodes = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[1].endswith(wanted[0]) and fields[2].endswith(wanted[1]):
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
    return False
