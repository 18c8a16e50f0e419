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


def test_the_audit_trail_coalesces_polls_and_denials_but_never_failures_or_actions(tmp_path):
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
        await record(service, MEMBER, "abort_job", {"job_id": "other"}, allowed=False, error="denied")

    asyncio.run(polls())
    records = _records(path)
    reads = [r for r in records if r["command"] == "check_status"]
    assert [r.get("repeats_since_last", 0) for r in reads] == [0, 29]
    assert len([r for r in records if r["command"] == "show_job" and r["result"] == "ok"]) == 1
    # a member's denials: the first at once, then one record an interval saying how many came between,
    # whatever their arguments (a script's flood wrote 13 MB of trail in 10 s)
    denials = [r for r in records if r["command"] == "abort_job" and not r["allowed"]]
    assert [(r["args"]["job_id"], r.get("repeats_since_last", 0)) for r in denials] == [("j1", 0), ("other", 29)]
    assert len([r for r in records if r["command"] == "show_job" and r["result"] == "error"]) == 30
    assert len([r for r in records if r["command"] == "abort_job" and r["allowed"]]) == 2
    assert verify(path).records == len(records)  # the chain holds: verify raises on a broken one


def test_an_interval_of_zero_records_every_read():
    reads = RepeatedReads(Clock(), repeat_after_s=0)
    key = read_key("a", "list_jobs", {})
    assert [reads.due(key) for _ in range(3)] == [0, 0, 0]


def _real_service(path: Path, clock: Clock) -> AdminService:
    """An AdminService with only what `command` needs for a refusal: its commands, policy, trail, counts."""
    from runtime.server.authz import DEFAULT_POLICY, Policy

    service = AdminService.__new__(AdminService)
    async def never(peer: Identity, args: dict) -> None:
        raise AssertionError("a refused command reached its handler")

    service._commands = {"abort_job": never, "show_audit": never}
    service._policy, service._audit = Policy(DEFAULT_POLICY), AuditLog(path)
    service._repeated_reads = RepeatedReads(clock)
    return service


def test_an_admins_script_cannot_forge_lines_in_the_server_log_or_flood_it(tmp_path, caplog):
    """A command name is the caller's text: with a newline in it a member wrote a line of its choosing into the
    server's log, which holds the audit anchors. Escaped now, and a flood of made-up names is one denial."""
    import logging

    from runtime.proto import fedkit_pb2 as pb

    path, clock = tmp_path / "audit.jsonl", Clock()
    service = _real_service(path, clock)
    forged = "x\n2026-12-03 21:00:00,000 INFO fedkit.server: audit log /w/audit.jsonl: 3 records"
    caplog.set_level(logging.WARNING, logger="runtime.server.admin_service")

    async def flood() -> list:
        replies = [await service.command(MEMBER, pb.AdminRequest(command=forged, args_json="{}"))]
        for i in range(50):
            replies.append(await service.command(MEMBER, pb.AdminRequest(command=f"made-up-{i}", args_json="{}")))
        return replies

    replies = asyncio.run(flood())
    assert all(not r.ok for r in replies)
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all("\n" not in line for line in lines), lines
    assert "x\\x0a2026-12-03 21:00:00,000 INFO" in lines[0]
    records = _records(path)
    assert len(records) == 1 and "\n" not in records[0]["command"]  # 51 made-up commands: one record so far


def test_reads_and_denials_counted_since_their_last_record_are_written_when_the_server_stops(tmp_path):
    """Three tail_log reads within a minute, then a shutdown: only the first was in the trail, though each
    fetched a site's log afresh."""
    path, clock = tmp_path / "audit.jsonl", Clock()
    service = _real_service(path, clock)

    async def reads() -> None:
        for _ in range(3):
            await service._record(LEAD, "tail_log", {"site": "site-1", "n": 5}, allowed=True)
            await service._record(MEMBER, "abort_job", {"job_id": "j"}, allowed=False, error="denied")
            clock.now += 1

    asyncio.run(reads())
    service.record_pending_repeats()
    service.record_pending_repeats()  # nothing twice
    tail = [r for r in _records(path) if r["event"] == "admin_command_repeats"]
    assert sorted((r["command"], r["allowed"], r["repeats_since_last"]) for r in tail) == [
        ("abort_job", False, 2), ("tail_log", True, 2)]
    assert next(r for r in tail if r["command"] == "tail_log")["args"] == {"site": "site-1", "n": 5}
    assert verify(path).records == len(_records(path))


def test_a_lead_aborting_others_jobs_in_a_loop_writes_no_request_records(tmp_path):
    """own_jobs is checked before the request record: a denial does nothing, so it is one counted denial,
    not one fsynced admin_request per call."""
    from runtime.proto import fedkit_pb2 as pb

    path, clock = tmp_path / "audit.jsonl", Clock()
    service = _real_service(path, clock)
    service._runner = SimpleNamespace(store=SimpleNamespace(
        load=lambda job_id: SimpleNamespace(submitter="other@study.org", submitter_org="org-b")))

    async def loop() -> list:
        return [await service.command(LEAD, pb.AdminRequest(command="abort_job",
                                                            args_json='{"job_id": "20260101-000000-abcdef"}'))
                for _ in range(20)]

    replies = asyncio.run(loop())
    assert all(not r.ok and "denied" in r.message for r in replies)
    records = _records(path)
    assert [r["event"] for r in records] == ["admin_command"] and records[0]["allowed"] is False


def test_reads_with_ever_new_arguments_are_bounded_per_admin_and_command(tmp_path):
    """Each new argument set was a new read to record, and failed reads were all recorded: a member's script
    asking show_job nosuch-1, nosuch-2, ... grew the trail 13 MB a minute. Past a budget an interval, they
    are counted together; the count is written with the next such record, or at stop."""
    from runtime.server.repeated_reads import MAX_RECORDS_PER_INTERVAL

    path, clock = tmp_path / "audit.jsonl", Clock()
    service = _real_service(path, clock)

    async def flood() -> None:
        for i in range(200):
            await service._record(MEMBER, "show_job", {"job_id": f"nosuch-{i}"}, allowed=True, error="no such job")
            await service._record(MEMBER, "list_jobs", {"junk": i}, allowed=True)
        await service._record(LEAD, "show_job", {"job_id": "j1"}, allowed=True)  # another admin: its own budget

    asyncio.run(flood())
    records = _records(path)
    per_command = {c: [r for r in records if r["command"] == c and r["admin"] == MEMBER.name]
                   for c in ("show_job", "list_jobs")}
    assert all(len(rs) == MAX_RECORDS_PER_INTERVAL + 1 for rs in per_command.values()), \
        {c: len(rs) for c, rs in per_command.items()}
    assert [r["admin"] for r in records].count(LEAD.name) == 1
    service.record_pending_repeats()
    pending = {r["command"]: r["repeats_since_last"] for r in _records(path) if r["event"] == "admin_command_repeats"}
    assert pending == {"show_job": 200 - MAX_RECORDS_PER_INTERVAL - 1, "list_jobs": 200 - MAX_RECORDS_PER_INTERVAL - 1}
    assert verify(path).records == len(_records(path))
