"""A dashboard polls read-only commands every second: the audit trail records each (admin, command,
arguments) once per interval with the count of the repeats in between, and still records every denial,
failure and state-changing command at once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

from runtime.audit import AuditLog, verify
from runtime.identity import Identity, Kind, Role
from runtime.server.admin_service import AdminService
from runtime.server.repeated_reads import RepeatedReads, read_key

LEAD = Identity("lead@study.org", "org-a", Kind.ADMIN, Role.LEAD)
MEMBER = Identity("member@study.org", "org-a", Kind.ADMIN, Role.MEMBER)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_repeated_read_is_counted_and_its_count_lands_in_the_next_record():
    clock = Clock()
    reads = RepeatedReads(clock, repeat_after_s=60)
    key = read_key("a", "show_job", {"job_id": "j1"})
    assert reads.due(key) == 0
    for _ in range(5):
        clock.now += 1
        assert reads.due(key) is None
    assert reads.due(read_key("a", "show_job", {"job_id": "j2"})) == 0  # other arguments: its own record
    assert reads.due(read_key("b", "show_job", {"job_id": "j1"})) == 0  # another admin: its own record
    clock.now = 60
    assert reads.due(key) == 5


def _service(audit: AuditLog, clock: Clock) -> SimpleNamespace:
    return SimpleNamespace(_audit=audit, _repeated_reads=RepeatedReads(clock))


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_audit_trail_coalesces_polls_but_never_denials_failures_or_actions(tmp_path):
    path, clock = tmp_path / "audit.jsonl", Clock()
    service = _service(AuditLog(path), clock)

    async def polls() -> None:
        record = AdminService._record
        for _ in range(30):  # a dashboard's second-by-second polls
            await record(service, LEAD, "check_status", {}, allowed=True)
            await record(service, LEAD, "show_job", {"job_id": "j1"}, allowed=True)
            await record(service, MEMBER, "abort_job", {"job_id": "j1"}, allowed=False, error="denied")
            await record(service, LEAD, "show_job", {"job_id": "gone"}, allowed=True, error="no job gone")
            clock.now += 1
        await record(service, LEAD, "abort_job", {"job_id": "j1"}, allowed=True)
        await record(service, LEAD, "abort_job", {"job_id": "j1"}, allowed=True)
        clock.now += 60
        await record(service, LEAD, "check_status", {}, allowed=True)

    asyncio.run(polls())
    records = _records(path)
    reads = [r for r in records if r["command"] == "check_status"]
    assert [r.get("repeats_since_last", 0) for r in reads] == [0, 29]
    assert len([r for r in records if r["command"] == "show_job" and r["result"] == "ok"]) == 1
    assert len([r for r in records if r["command"] == "abort_job" and not r["allowed"]]) == 30
    assert len([r for r in records if r["command"] == "show_job" and r["result"] == "error"]) == 30
    assert len([r for r in records if r["command"] == "abort_job" and r["allowed"]]) == 2
    assert verify(path).records == len(records)  # the chain holds: verify raises on a broken one


def test_an_interval_of_zero_records_every_read():
    reads = RepeatedReads(Clock(), repeat_after_s=0)
    key = read_key("a", "list_jobs", {})
    assert [reads.due(key) for _ in range(3)] == [0, 0, 0]
