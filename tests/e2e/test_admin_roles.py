"""The default authorization policy over the real console: each role's allowed and denied commands, run
through an admin kit's own fl_admin.sh against a real server and sites. A denied command must print one
clear line, exit non-zero and leave an audit record with allowed=false; an allowed one must succeed and
be audited with allowed=true."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from provision.demo_data import write_demo_data
from provision.local_study import LocalStudy, wait_until

from ..conftest import EXAMPLE_PROJECT, JOB_TEMPLATE

PROJECT_ADMIN, LEAD = "admin@study.org", "lead@study.org"
ORG_ADMIN, MEMBER = "orgadmin@hospital-a.org", "member@hospital-b.org"
SITE_ORGS = {"site-1": "hospital-a", "site-2": "hospital-b"}
# a job for a site that never comes online stays queued, so every job command has a stable target
PARKED = "--set meta.sites=[site-9] --set meta.min_clients=1 --set server.rounds=1"


def _edit(data: dict[str, Any]) -> None:
    """Two sites in two orgs, and one admin of each role (the example has project_admin and lead)."""
    kept = [p for p in data["participants"] if p.get("type") != "client"]
    data["participants"] = kept + [{"type": "client", "name": s, "org": o} for s, o in SITE_ORGS.items()] + [
        {"type": "admin", "name": ORG_ADMIN, "org": "hospital-a", "role": "org_admin"},
        {"type": "admin", "name": MEMBER, "org": "hospital-b", "role": "member"},
    ]


def _start_study(root: Path) -> LocalStudy:
    """Server and both sites running, built from their kits. The caller stops it (by PID)."""
    study = LocalStudy.create(EXAMPLE_PROJECT, root / "study", edit=_edit)
    try:
        data = write_demo_data(root / "data", list(SITE_ORGS))
        # every command its own record, repeated reads too: these tests count the records
        study.write_local(study.server, "server.yml", {"heartbeat_timeout_s": 6.0, "audit_repeated_reads_s": 0})
        for site in SITE_ORGS:
            study.write_local(site, "site.yml", {"data_root": str(data.site_dirs[site]), "heartbeat_interval_s": 1.0})
        study.start_server()
        study.start_sites(list(SITE_ORGS))
    except BaseException:
        study.stop_all()
        raise
    return study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStudy]:
    """One study for the tests that change nothing but the job queue (each parks its own jobs)."""
    study = _start_study(tmp_path_factory.mktemp("roles"))
    yield study
    study.stop_all()


@pytest.fixture
def fresh_study(tmp_path: Path) -> Iterator[LocalStudy]:
    """A study of its own, for a test that shuts participants down."""
    study = _start_study(tmp_path)
    yield study
    study.stop_all()


def _server_command(line: str) -> str:
    """The server-side name a console line is authorized and audited under."""
    words = line.split()
    return f"{words[0]}_{words[1]}" if words[0] in ("shutdown", "restart") else words[0]


@dataclass(frozen=True)
class Call:
    admin: str
    line: str
    allowed: bool


class Console:
    """Runs console lines as admins and checks each outcome, and the server's audit trail, against what
    the default policy says."""

    def __init__(self, study: LocalStudy):
        self._study = study
        self._audit = study.kits[study.server] / "workspace" / "audit.jsonl"
        self._seen = len(self._admin_records())

    def _admin_records(self) -> list[dict[str, Any]]:
        records = [json.loads(line) for line in self._audit.read_text().splitlines()]
        return [r for r in records if r["event"] == "admin_command"]

    def run(self, *calls: Call) -> list[Any]:
        """Run `calls`, one admin's after another but different admins' at once (one kit must not run twice
        at the same time: its fl_admin.sh clears the kit's __pycache__ folders, and two runs race on that).
        Returns the parsed JSON of each allowed call and the one-line message of each denied one."""
        by_admin: dict[str, list[Call]] = {}
        for call in calls:
            by_admin.setdefault(call.admin, []).append(call)
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = dict(zip(by_admin, pool.map(self._run_in_turn, by_admin.values()), strict=True))
        done = [results[c.admin].pop(0) for c in calls]
        outputs = [self._outcome(call, result) for call, result in zip(calls, done, strict=True)]
        records = self._admin_records()
        new, self._seen = records[self._seen:], len(records)
        assert Counter((r["admin"], r["command"], r["allowed"]) for r in new) == Counter(
            (c.admin, _server_command(c.line), c.allowed) for c in calls), "one audit record per command"
        assert all(bool(r["error"]) == (not r["allowed"]) for r in new), "denied ones carry their reason"
        return outputs

    def _run_in_turn(self, calls: list[Call]) -> list[subprocess.CompletedProcess]:
        return [self._study.admin(c.line, admin=c.admin) for c in calls]

    @staticmethod
    def _outcome(call: Call, done: subprocess.CompletedProcess) -> Any:
        message = done.stderr.strip()
        if call.allowed:
            assert done.returncode == 0, f"{call.admin} '{call.line}' should be allowed: {message}"
            return json.loads(done.stdout)
        assert done.returncode == 1, f"{call.admin} '{call.line}' should be denied; exit {done.returncode}"
        assert "\n" not in message and message.startswith("fl_admin: denied: role"), message  # README: one denied: line
        assert json.loads(done.stdout) == {"error": message.removeprefix("fl_admin: "), "exit_code": 1}
        return message

    def allowed(self, admin: str, line: str) -> Any:
        return self.run(Call(admin, line, True))[0]

    def denied(self, admin: str, line: str) -> str:
        return self.run(Call(admin, line, False))[0]


@pytest.fixture
def job(tmp_path: Path) -> Path:
    return Path(shutil.copytree(JOB_TEMPLATE, tmp_path / "job"))


def test_member_may_only_read(study: LocalStudy, job: Path, tmp_path: Path) -> None:
    console = Console(study)
    job_id = console.allowed(LEAD, f"submit_job {job} {PARKED}")["job_id"]

    helped, helped_submit, listed, shown, status, *_ = console.run(
        Call(MEMBER, "help", True), Call(MEMBER, "help submit_job", True), Call(MEMBER, "list_jobs", True),
        Call(MEMBER, f"show_job {job_id}", True), Call(MEMBER, "check_status client", True),
        *(Call(MEMBER, line, False) for line in (
            f"submit_job {job}", f"abort_job {job_id}", f"download_job {job_id} {tmp_path / 'dl'}",
            "sys_info site-2", "show_audit")))

    assert helped["commands"] == ["check_status", "help", "list_jobs", "show_job", "wait_job"]
    assert helped_submit["allowed"] is False and helped_submit["usage"].startswith("submit_job FOLDER")
    assert job_id in [j["job_id"] for j in listed]
    assert shown["record"]["submitter"] == LEAD and shown["record"]["state"] == "queued"
    assert shown["waiting_for"] == "needs 1 site online, 0 are; never seen by this server (check the names): site-9"
    assert {s["site"] for s in status["sites"]} == set(SITE_ORGS)
    assert all(s["online"] and 0 <= s["last_heartbeat_s_ago"] < 6 for s in status["sites"])
    # the role is checked before the target is looked up: no probing for which jobs exist
    assert "may not run 'abort_job'" in console.denied(MEMBER, "abort_job no-such-job")


def test_lead_manages_only_its_own_jobs(study: LocalStudy, job: Path, tmp_path: Path) -> None:
    console = Console(study)
    own = console.allowed(LEAD, f"submit_job {job} {PARKED} --set client.learner.args.lr=0.1")["job_id"]
    other = console.allowed(PROJECT_ADMIN, f"submit_job {job} {PARKED}")["job_id"]

    clone = console.allowed(LEAD, f"clone_job {own}")
    assert clone["cloned_from"] == own and "client.learner.args.lr=0.1" in clone["overrides"]
    assert console.allowed(LEAD, f"abort_job {clone['job_id']}")["state"] == "aborted"
    downloaded, *denials = console.run(
        Call(LEAD, f"download_job {own} {tmp_path / 'dl'}", True), Call(LEAD, f"delete_job {clone['job_id']}", True),
        *(Call(LEAD, line, False) for line in (f"abort_job {other}", f"download_job {other} {tmp_path / 'dl2'}")),
        *(Call(LEAD, line, False) for line in ("sys_info site-1", "tail_log server")))

    assert (Path(downloaded["path"]) / "record.json").exists()
    assert all(f"on a job of {PROJECT_ADMIN}" in m for m in denials[1:3])
    assert not (tmp_path / "dl2").exists() or list((tmp_path / "dl2").iterdir()) == [], "a denied download left files"
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == [own], "one folder per download, no zip"
    jobs = [j["job_id"] for j in console.allowed(LEAD, "list_jobs")]
    assert clone["job_id"] not in jobs and jobs.index(own) < jobs.index(other)


def test_org_admin_sees_all_jobs_and_its_own_org_sites(study: LocalStudy, job: Path, tmp_path: Path) -> None:
    console = Console(study)
    job_id = console.allowed(PROJECT_ADMIN, f"submit_job {job} {PARKED}")["job_id"]

    listed, downloaded, info, *denials = console.run(
        Call(ORG_ADMIN, "list_jobs", True), Call(ORG_ADMIN, f"download_job {job_id} {tmp_path / 'dl'}", True),
        Call(ORG_ADMIN, "sys_info site-1", True),
        *(Call(ORG_ADMIN, line, False) for line in ("sys_info site-2", "restart client site-2", "tail_log server")),
        *(Call(ORG_ADMIN, line, False) for line in (f"submit_job {job}", f"abort_job {job_id}")))

    assert job_id in [j["job_id"] for j in listed]
    assert (Path(downloaded["path"]) / "job.zip").exists()
    assert info["site"] == "site-1" and info["org"] == "hospital-a" and info["online"]
    assert all("only for org 'hospital-a'" in m for m in denials[:3])


def test_project_admin_may_run_anything(study: LocalStudy, job: Path) -> None:
    console = Console(study)
    job_id = console.allowed(LEAD, f"submit_job {job} {PARKED}")["job_id"]

    aborted, info, log, audit = console.run(
        Call(PROJECT_ADMIN, f"abort_job {job_id}", True), Call(PROJECT_ADMIN, "sys_info site-2", True),
        Call(PROJECT_ADMIN, "tail_log server 20", True), Call(PROJECT_ADMIN, "show_audit 3", True))

    assert aborted["state"] == "aborted" and info["org"] == "hospital-b"
    assert any("listening" in line for line in log["lines"])
    assert all(r["event"] == "admin_command" for r in audit) and len(audit) == 3


def test_shutdown_is_for_the_sites_own_org_admin_and_the_project_admin(fresh_study: LocalStudy) -> None:
    study, console = fresh_study, Console(fresh_study)
    console.run(Call(ORG_ADMIN, "shutdown client site-2", False), Call(LEAD, "shutdown client site-1", False),
                Call(LEAD, "shutdown server", False), Call(MEMBER, "restart client site-1", False))

    console.allowed(ORG_ADMIN, "shutdown client site-1")
    site_1 = study.procs["site-1"]
    wait_until(lambda: site_1.poll() is not None, 30, "site-1 to shut down when its org admin asks")
    assert study.procs["site-2"].poll() is None

    console.allowed(PROJECT_ADMIN, "shutdown server")
    server = study.procs[study.server]
    wait_until(lambda: server.poll() is not None, 30, "the server to shut down")
    assert server.returncode == 0


def test_with_json_every_failure_is_one_json_object_and_leaves_no_file(tmp_path):
    study = LocalStudy.create(EXAMPLE_PROJECT, tmp_path / "study", edit=_edit)
    try:
        study.start_server()
        _json_failures_leave_nothing(study, tmp_path / "downloads")
    finally:
        study.stop_all()


def _json_failures_leave_nothing(study: LocalStudy, dest: Path) -> None:
    outcomes = [study.admin(line, admin=MEMBER) for line in
                ("submit_job /nonexistent", "abort_job 20260101-000000-abcdef", "download_job ../../etc " + str(dest),
                 "download_job 20260101-000000-abcdef " + str(dest), "no_such_command")]
    outcomes.append(study.admin("download_job 20260101-000000-abcdef " + str(dest), admin=PROJECT_ADMIN))

    for done in outcomes:
        assert done.returncode in (1, 2), done
        reply = json.loads(done.stdout)  # exactly one JSON object on stdout
        assert set(reply) == {"error", "exit_code"} and reply["exit_code"] == done.returncode, reply
        assert "\n" not in reply["error"] and reply["error"]
    assert [json.loads(d.stdout)["error"].startswith("denied: role 'member' may not run") for d in outcomes[1:2]] \
        == [True]
    assert not dest.exists(), "a failed or denied download left files behind"
