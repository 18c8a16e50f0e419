"""The fault proxy itself, against a plain echo server on 127.0.0.1: each mode does what the
resilience tests rely on, so a passing resilience test means the fault really happened."""

from __future__ import annotations

import os
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from .faultproxy import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except (ConnectionResetError, BrokenPipeError):
            pass  # the proxy's reset mode does this on purpose


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with FaultProxy(server.server_address[1]) as p:
            yield p
    finally:
        server.shutdown()
        server.server_close()


def _connect(p: FaultProxy) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    s.settimeout(5)
    return s


def _recv_all(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def test_pass_forwards_both_ways(proxy):
    with _connect(proxy) as s:
        s.sendall(b"x" * 300_000)
        assert _recv_all(s, 300_000) == b"x" * 300_000
    assert proxy.stats.bytes_up >= 300_000 and proxy.stats.bytes_down >= 300_000


def test_delay_holds_each_chunk(proxy):
    proxy.delay(200, direction="down")
    with _connect(proxy) as s:
        start = time.monotonic()
        s.sendall(b"ping")
        assert _recv_all(s, 4) == b"ping"
        assert time.monotonic() - start >= 0.2


def test_stall_holds_bytes_until_pass(proxy):
    with _connect(proxy) as s:
        s.sendall(b"a")
        assert _recv_all(s, 1) == b"a"
        proxy.stall()
        s.sendall(b"b")
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(1)
        proxy.pass_()
        s.settimeout(5)
        assert _recv_all(s, 1) == b"b"


def test_drop_closes_after_n_bytes_once(proxy):
    proxy.drop(after_bytes=1000, direction="down")
    with _connect(proxy) as s:
        s.sendall(b"z" * 5000)
        got = _recv_all(s, 5000)
    assert got == b"z" * 1000
    with _connect(proxy) as s:  # fired once: the next connection passes
        s.sendall(b"z" * 5000)
        assert _recv_all(s, 5000) == b"z" * 5000


def test_reset_sends_rst(proxy):
    proxy.reset(after_bytes=0, direction="up")
    with _connect(proxy) as s:
        s.sendall(b"hello")
        with pytest.raises(ConnectionResetError):
            while s.recv(100):
                pass
    assert proxy.stats.faults_fired == ["reset:up:0"]


def test_reset_all_now_aborts_open_connections(proxy):
    with _connect(proxy) as s:
        s.sendall(b"a")
        assert _recv_all(s, 1) == b"a"
        assert proxy.reset_all_now() == 1
        with pytest.raises(ConnectionResetError):
            s.sendall(b"b" * 100_000)
            while s.recv(100):
                pass


def test_one_shot_stall_freezes_one_connection_mid_stream(proxy):
    proxy.stall(direction="down", after_bytes=1000)
    with _connect(proxy) as frozen, _connect(proxy) as other:
        frozen.sendall(b"f" * 5000)
        assert _recv_all(frozen, 1000) == b"f" * 1000
        frozen.settimeout(0.5)
        with pytest.raises(TimeoutError):
            frozen.recv(1)
        other.sendall(b"o" * 5000)  # fired once: another connection still passes
        assert _recv_all(other, 5000) == b"o" * 5000
        proxy.pass_()
        frozen.settimeout(5)
        assert _recv_all(frozen, 4000) == b"f" * 4000


def test_a_fault_limited_to_some_processes_spares_the_connections_of_others(proxy):
    other = subprocess.Popen(["sleep", "60"])  # a process that dialed nothing
    try:
        proxy.drop(after_bytes=1000, direction="down", pids=frozenset({other.pid}))
        with _connect(proxy) as s:  # dialed by this process: not the fault's target, so it passes
            s.sendall(b"z" * 5000)
            assert _recv_all(s, 5000) == b"z" * 5000
        assert proxy.stats.faults_fired == []
    finally:
        other.kill()
        other.wait()
    proxy.drop(after_bytes=1000, direction="down", pids=frozenset({os.getpid()}))
    with _connect(proxy) as s:  # dialed by the target: cut after 1000 bytes
        s.sendall(b"z" * 5000)
        assert _recv_all(s, 5000) == b"z" * 1000
    assert proxy.stats.faults_fired == ["drop:down:1000"]
