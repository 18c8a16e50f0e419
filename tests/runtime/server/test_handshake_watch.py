"""runtime/server/handshake_watch.py: gRPC core's handshaker trace (lines as grpc 1.85 writes them, args
trimmed) becomes refusals with the peer's address; everything else written to stderr passes unchanged."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from runtime.server.handshake_watch import (
    ANOTHER_CA,
    HandshakeFailure,
    TraceFilter,
    enable_tracer,
    explain,
    hidden_levels,
    service_reporter,
)

ARGS = ("args={endpoint=0x7f3650001bb0, args={grpc.experimental.event_engine=0x563081196220, "
        "grpc.internal.endpoint_local_address=ipv6:%5B::1%5D:40165, "
        "grpc.internal.endpoint_peer_address=ipv6:%5B::1%5D:34440, grpc.internal.security_connector=0x55a}}")
VERIFY_FAILED = ("SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
                 "unable to get local issuer certificate")
P = "I1202 03:48:41.874892    1932 "
SLT = "=== Source Location Trace: === "  # core writes it with a trailing space
TRANSCRIPT = f"""\
{P}handshaker.cc:80] handshake_manager 0x7f3650002080: adding handshaker security [0x7f3650002400] at index 1
{P}handshaker.cc:155] CallNextHandshakerLocked: error=OK shutdown=false index=1, {ARGS}
{P}channel_trace.h:396] handshake manager 0x7f3650002080:  calling handshaker security at index 1
2026-12-02 03:48:41,880 INFO fedkit.server: a line of our own
{P}ssl_transport_security.cc:2563] Handshake failed with error {VERIFY_FAILED}
{P}handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: Ssl handshake failed (TSI_PROTOCOL_FAILURE): \
{VERIFY_FAILED}: OK
{SLT}
src/core/util/status_helper.cc:68
 shutdown=false index=2, {ARGS}
{P}channel_trace.h:396] handshake manager 0x7f3650002080: Failed with error: UNKNOWN: Ssl handshake failed \
(TSI_PROTOCOL_FAILURE): {VERIFY_FAILED}: OK
{SLT}
src/core/util/status_helper.cc:68

{P}handshaker.cc:155] CallNextHandshakerLocked: error=UNAVAILABLE: Handshake read failed (Socket closed)
{SLT}
src/core/util/status_helper.cc:124
 shutdown=false index=2, {ARGS}
{P}server.cc:1865] Disconnected client
Traceback (most recent call last):
"""


def _feed(filt: TraceFilter, text: str) -> tuple[list[str], list[HandshakeFailure]]:
    passed, failures = [], []
    for line in text.splitlines():
        keep, done = filt.feed(line.encode())
        passed += [line] if keep else []
        failures += done
    return passed, failures + filt.flush()


def test_a_refused_handshake_is_one_failure_with_peer_and_port_and_the_trace_is_swallowed() -> None:
    passed, failures = _feed(TraceFilter(), TRANSCRIPT)

    assert failures == [HandshakeFailure(40165, "ipv6:%5B::1%5D:34440", ANOTHER_CA)]  # not the hung-up peer
    assert passed == ["2026-12-02 03:48:41,880 INFO fedkit.server: a line of our own",
                      f"{P}server.cc:1865] Disconnected client", "Traceback (most recent call last):"]


def test_a_failure_whose_args_never_come_is_reported_without_a_peer() -> None:
    _, failures = _feed(TraceFilter(), f"{P}handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: "
                                       f"Ssl handshake failed (TSI_PROTOCOL_FAILURE): {VERIFY_FAILED}: OK\n"
                                       f"{P}server.cc:1] next\n")
    assert failures == [HandshakeFailure(None, None, ANOTHER_CA)]


def test_core_lines_are_hidden_only_when_the_operator_asked_for_less() -> None:
    line = f"{P}server.cc:1865] Disconnected client"
    assert _feed(TraceFilter(hide_levels=b"IW"), line)[0] == []
    assert _feed(TraceFilter(), line)[0] == [line]
    assert _feed(TraceFilter(hide_levels=b"IW"), f"E{line[1:]}")[0] == [f"E{line[1:]}"]
    assert _feed(TraceFilter(hide_banner=True), f"{P}trace.cc:91] gRPC Tracers: handshaker")[0] == []


def test_reasons_read_as_what_happened() -> None:
    assert explain(VERIFY_FAILED) == ANOTHER_CA
    assert explain("CERTIFICATE_VERIFY_FAILED: certificate has expired: OK") == "certificate expired"
    assert explain("error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid "
                   "certificate verification context") == "no client certificate"
    assert explain("OPENSSL_internal:HTTP_REQUEST: x").startswith("not a TLS client")
    assert explain("error:100000a0:SSL routines:OPENSSL_internal:BAD_PACKET_LENGTH: Invalid certificate "
                   "verification context") == "the peer broke off the handshake (a kit of another study?)"
    assert explain("SSL routines:OPENSSL_internal:SOMETHING_NEW: detail: OK") == \
        "TLS handshake failed: SOMETHING_NEW: detail"


def test_the_tracer_is_added_to_the_operators_own() -> None:
    env = {"GRPC_TRACE": "tsi"}
    assert enable_tracer(env) and env["GRPC_TRACE"] == "tsi,handshaker"
    assert not enable_tracer(env) and env["GRPC_TRACE"] == "tsi,handshaker"
    assert not enable_tracer({"GRPC_TRACE": "all"})
    assert hidden_levels({"GRPC_VERBOSITY": "error"}) == b"IW" and hidden_levels({"GRPC_VERBOSITY": "NONE"}) == b"IWE"
    assert hidden_levels({}) == hidden_levels({"GRPC_VERBOSITY": "INFO"}) == b""


def test_failures_reach_the_refusal_log_by_service_through_the_loop() -> None:
    calls: list[tuple] = []
    report = service_reporter(lambda *a: calls.append(a), {40165: "federation"}, lambda fn, *a: fn(*a))
    report(HandshakeFailure(40165, "ipv6:%5B::1%5D:34440", ANOTHER_CA))
    report(HandshakeFailure(None, None, "certificate expired"))
    assert calls == [("federation", "ipv6:%5B::1%5D:34440", f"{ANOTHER_CA} (TLS handshake)"),
                     ("server", "unknown address", "certificate expired (TLS handshake)")]


def test_the_watch_owns_fd_2_and_passes_everything_else_through_unchanged(tmp_path) -> None:
    """In a process of its own (it replaces fd 2): C-level writes, Python's stderr, a line without its
    newline yet, and what is written after stop() all come out; the trace becomes one report."""
    (tmp_path / "transcript.txt").write_text(TRANSCRIPT)
    script = textwrap.dedent(f"""
        import os, sys, threading
        from runtime.server.handshake_watch import StderrWatch
        seen = threading.Event()
        watch = StderrWatch.install()
        watch.report_to(lambda f: (print("REPORT", f.peer, f.reason, flush=True), seen.set()))
        os.write(2, open({str(tmp_path / "transcript.txt")!r}, "rb").read())
        print("python stderr line", file=sys.stderr, flush=True)
        assert seen.wait(30)
        os.write(2, b"no newline yet")
        watch.stop()
        print("after stop", file=sys.stderr, flush=True)
        print(os.environ["GRPC_TRACE"])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"REPORT ipv6:%5B::1%5D:34440 {ANOTHER_CA}", "handshaker"]
    assert done.stderr.splitlines() == ["2026-12-02 03:48:41,880 INFO fedkit.server: a line of our own",
                                        f"{P}server.cc:1865] Disconnected client", "Traceback (most recent call last):",
                                        "python stderr line", "no newline yetafter stop"]
