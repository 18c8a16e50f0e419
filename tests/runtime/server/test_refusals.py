"""runtime/server/refusals.py: a refused peer retrying for ever is recorded once per interval, readably."""

from __future__ import annotations

from pathlib import Path

from runtime.audit import AuditLog
from runtime.server.refusals import RefusalLog, readable_peer


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_grpc_peer_strings_read_as_addresses() -> None:
    assert readable_peer("ipv6:%5B::1%5D:50120") == "[::1]:50120"
    assert readable_peer("ipv4:127.0.0.1:4000") == "127.0.0.1:4000"


def test_retries_from_one_host_are_recorded_once_per_interval_with_a_count(tmp_path: Path) -> None:
    audit, clock = AuditLog(tmp_path / "audit.jsonl"), FakeClock()
    refusals = RefusalLog(audit, clock, repeat_after_s=60)

    for port in range(50000, 50010):  # every retry comes from a new source port
        refusals("federation", f"ipv6:%5B::1%5D:{port}", "certificate of 'site-2' has been revoked")
        clock.now += 1
    refusals("federation", "ipv4:127.0.0.1:1", "certificate of 'site-3' has been revoked")
    clock.now += 60
    refusals("federation", "ipv6:%5B::1%5D:50099", "certificate of 'site-2' has been revoked")

    records = [r for r in audit.tail(100) if r["event"] == "peer_refused"]
    assert [(r["peer"], r["repeats_since_last"]) for r in records] == [
        ("[::1]:50000", 0), ("127.0.0.1:1", 0), ("[::1]:50099", 9)]
