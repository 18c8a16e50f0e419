"""TLS handshakes the server refused, with the peer's address, read from gRPC core's own trace.

A site with another study's certificate, an expired one or none is refused inside gRPC core, before any
Python code runs: no interceptor, servicer or credentials callback sees it, and the one line core logs by
default ("Handshake failed with error ... unable to get local issuer certificate") has no peer address.
Core's `handshaker` tracer does log each failed handshake together with the connection's
`endpoint_peer_address` and `endpoint_local_address`. So the server turns that tracer on (before grpc is
imported: core reads GRPC_TRACE once) and reads its own fd 2 through a pipe in a thread: handshake trace
entries become (service, peer, readable reason) reports for RefusalLog, everything else is copied to the
real stderr unchanged. The tracer writes a few lines per TCP connection, not per message, so the bulk
data path is untouched (no proxy in front of the port).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

TRACER = "handshaker"
FLUSH_PARTIAL_AFTER_S = 0.2  # a line without its newline yet is passed through after this much quiet
STOP_DRAIN_S = 2.0  # how long stop() waits for the last lines to be copied out

# glog/absl prefix: "I1202 03:42:18.475972   28122 handshaker.cc:155] message"
_HEADER = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([\w./-]+):\d+\] ?(.*)$")
# the lines core appends to a status: "=== Source Location Trace: ===", "src/core/...:68", " shutdown=..."
_CONTINUATION = re.compile(rb"^(=== Source Location Trace: ===\s*|src/\S+:\d+\s*| shutdown=.*|\s*)$")
_PEER = re.compile(r"grpc\.internal\.endpoint_peer_address=([^,}\s]+)")
_LOCAL = re.compile(r"grpc\.internal\.endpoint_local_address=([^,}\s]+)")

ANOTHER_CA = "certificate not issued by this study's CA"
# (text core/BoringSSL uses, what it means for a person); first match wins
_REASONS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATE"), "no client certificate"),
    (("certificate has expired",), "certificate expired"),
    (("certificate is not yet valid",), "certificate not yet valid"),
    (("certificate revoked",), "certificate revoked"),
    (("unable to get local issuer certificate", "self signed certificate", "self-signed certificate",
      "unable to verify the first certificate", "certificate signature failure"), ANOTHER_CA),
    (("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_UNKNOWN"),
     "the peer does not trust this server's certificate (a kit of another study?)"),
    # what this server's core reports when a site of another study rejects its certificate and hangs up
    (("BAD_PACKET_LENGTH",), "the peer broke off the handshake (a kit of another study?)"),
    (("HTTP_REQUEST", "WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL"), "not a TLS client (plain HTTP or another protocol)"),
)
# Only the TLS layer's own verdicts are refusals. A peer that hangs up mid-handshake ("Handshake read failed
# (Socket closed)") is left out: a port probe (a monitor, or start-up checks) looks exactly like that, and so,
# sadly, does a kit of another study, which drops the connection once it sees this server's certificate
# (that site's own log names the cause).
_TLS_VERDICT = "Ssl handshake failed"


@dataclass(frozen=True)
class HandshakeFailure:
    local_port: int | None
    peer: str | None  # gRPC's form, e.g. 'ipv6:%5B::1%5D:50120'; None if core did not say
    reason: str


def explain(error: str) -> str:
    """Core's status text for a failed handshake as a reason a person reads."""
    for needles, reason in _REASONS:
        if any(n in error for n in needles):
            return reason
    detail = error.rsplit("OPENSSL_internal:", 1)[-1].removesuffix(": OK").strip()
    return f"TLS handshake failed: {detail[:200]}"


def enable_tracer(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Turn core's handshaker tracer on; True if we added it (so its banner line is ours to hide).

    Must run before `import grpc`. Trace lines are INFO lines: a GRPC_VERBOSITY above INFO would hide them,
    so install() lowers it to INFO and TraceFilter drops the lines the operator asked not to see."""
    tracers = [t.strip() for t in environ.get("GRPC_TRACE", "").split(",") if t.strip()]
    added = TRACER not in tracers and "all" not in tracers
    if added:
        environ["GRPC_TRACE"] = ",".join([*tracers, TRACER])
    return added


def hidden_levels(environ: Mapping[str, str] = os.environ) -> bytes:
    """The glog levels of core's lines the operator's GRPC_VERBOSITY hides (b"IW" for ERROR, b"IWE" for NONE)."""
    return {"ERROR": b"IW", "NONE": b"IWE"}.get(environ.get("GRPC_VERBOSITY", "").strip().upper(), b"")


class TraceFilter:
    """Line by line: which of core's lines are handshake trace (swallowed, maybe a failure) and which pass.

    A failed handshake is one multi-line entry: "CallNextHandshakerLocked: error=<status>", the status's
    source-location lines, then " shutdown=false index=2, args={... endpoint_peer_address=...}"."""

    def __init__(self, hide_banner: bool = False, hide_levels: bytes = b""):
        self._hide_banner = hide_banner
        self._hide_levels = hide_levels
        self._in_entry = False  # inside a handshake entry: its continuation lines are swallowed too
        self._pending: str | None = None  # a failure's status, waiting for its args line

    def feed(self, line: bytes) -> tuple[bool, list[HandshakeFailure]]:
        """(pass this line through?, failures completed by it); `line` without its newline."""
        header = _HEADER.match(line)
        if header is None:
            if self._in_entry and _CONTINUATION.match(line):
                if self._pending is not None and line.startswith(b" shutdown="):
                    return False, self._complete(line.decode("utf-8", "replace"))
                return False, []
            return True, []
        done = self.flush()
        level, source, message = header.group(1), header.group(2).decode(), header.group(3).decode("utf-8", "replace")
        self._in_entry = source == "handshaker.cc" or (source == "channel_trace.h"
                                                       and message.startswith("handshake manager"))
        if self._in_entry:
            status = message.removeprefix("CallNextHandshakerLocked: error=")
            if status != message and not status.startswith("OK"):
                self._pending = status
                if "args={" in status:  # the whole entry on one line
                    done += self._complete(status)
            return False, done
        if source.startswith("ssl_transport_security") and "Handshake failed with error" in message:
            return False, done  # the same failure without a peer: reported readably from the trace instead
        if self._hide_banner and source == "trace.cc" and message.strip() == f"gRPC Tracers: {TRACER}":
            return False, done
        if level in self._hide_levels:
            return False, done
        return True, done

    def flush(self) -> list[HandshakeFailure]:
        """A failure whose args line never came (e.g. a gRPC upgrade changed the format): report without peer."""
        if self._pending is None:
            return []
        return self._complete("")

    def _complete(self, args: str) -> list[HandshakeFailure]:
        status, self._pending = self._pending or "", None
        if _TLS_VERDICT not in status or "shutdown=true" in args:
            return []  # the peer hung up, or the server itself is stopping: not a refusal
        peer, local = _PEER.search(args), _LOCAL.search(args)
        port = local.group(1).rsplit(":", 1)[-1] if local else ""
        return [HandshakeFailure(int(port) if port.isdigit() else None, peer.group(1) if peer else None,
                                 explain(status))]


class StderrWatch:
    """Owns fd 2 while running: a thread copies what is written there to the real stderr through a
    TraceFilter and hands handshake failures to `on_failure` (called on the thread: keep it short and
    thread-safe). If the thread fails, fd 2 goes back to the real stderr so no writer can block on a
    pipe nobody reads."""

    def __init__(self, hide_banner: bool = False, hide_levels: bytes = b""):
        self._filter = TraceFilter(hide_banner, hide_levels)
        self._on_failure: Callable[[HandshakeFailure], None] | None = None
        self._lock = threading.Lock()
        self._real: int | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def install(cls) -> StderrWatch:
        """Enable the tracer and capture fd 2; call before anything imports grpc."""
        watch = cls(hide_banner=enable_tracer(), hide_levels=hidden_levels())
        if hidden_levels():
            os.environ["GRPC_VERBOSITY"] = "INFO"
        watch.start()
        return watch

    def report_to(self, on_failure: Callable[[HandshakeFailure], None] | None) -> None:
        with self._lock:
            self._on_failure = on_failure

    def start(self) -> None:
        sys.stderr.flush()
        self._real = os.dup(2)
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError):  # room for bursts while the thread waits for the GIL (Linux only)
            fcntl.fcntl(write_fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._thread = threading.Thread(target=self._pump, args=(read_fd,), name="handshake-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Give fd 2 back to the real stderr and copy out what is left in the pipe."""
        if self._real is None or self._thread is None:
            return
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(self._real, 2)  # our last write end of the pipe is closed: the thread reads to EOF
        self._thread.join(STOP_DRAIN_S)
        if not self._thread.is_alive():  # else a child still holds the pipe; the thread keeps copying
            os.close(self._real)
        self._real = None

    def _pump(self, read_fd: int) -> None:
        real = self._real
        assert real is not None
        pending = b""
        try:
            while True:
                ready, _, _ = select.select([read_fd], [], [], FLUSH_PARTIAL_AFTER_S if pending else None)
                if not ready:  # a partial line and quiet: pass it on as it is
                    self._write(real, pending)
                    pending = b""
                    continue
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                self._write(real, b"".join(line + b"\n" for line in lines if self._keep(line)))
            self._write(real, pending)
            self._report(self._filter.flush())
        except Exception as e:  # noqa: BLE001 - never leave fd 2 pointing at a pipe nobody reads
            with contextlib.suppress(OSError):
                os.dup2(real, 2)
                os.write(real, f"fedkit server: handshake watch stopped ({e}); gRPC's stderr is shown as is\n"
                         .encode())
            self._copy_raw(read_fd, real, pending)
        finally:
            os.close(read_fd)

    def _keep(self, line: bytes) -> bool:
        keep, failures = self._filter.feed(line)
        self._report(failures)
        return keep

    def _report(self, failures: list[HandshakeFailure]) -> None:
        with self._lock:
            on_failure = self._on_failure
        for failure in failures:
            if on_failure is not None:
                with contextlib.suppress(Exception):  # a closed event loop at shutdown, say
                    on_failure(failure)

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        while data:
            data = data[os.write(fd, data):]

    @classmethod
    def _copy_raw(cls, read_fd: int, real: int, pending: bytes) -> None:
        with contextlib.suppress(OSError):
            cls._write(real, pending)
            while chunk := os.read(read_fd, 65536):
                cls._write(real, chunk)


def service_reporter(report: Callable[[str, str, str], None], ports: Mapping[int, str],
                     call_soon: Callable[..., object]) -> Callable[[HandshakeFailure], None]:
    """A failure as RefusalLog's (service, peer, reason), run on the event loop via `call_soon`
    (loop.call_soon_threadsafe): RefusalLog and the audit log belong to the loop's thread."""

    def on_failure(failure: HandshakeFailure) -> None:
        service = ports.get(failure.local_port or -1, "server")
        call_soon(report, service, failure.peer or "unknown address", f"{failure.reason} (TLS handshake)")

    return on_failure
