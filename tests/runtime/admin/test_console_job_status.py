"""runtime/admin/console.py: what the console says about where a job stands: why a queued job has not
started (submit_job, show_job, wait_job), and which workflow step a running job is in (check_status)."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
from rich.console import Console

from runtime.admin import console as console_module
from runtime.admin.console import AdminConsole
from runtime.errors import JobRejected, ServerUnreachable
from tests.runtime.admin.canned import printed as printed_by

WHY = "needs 2 sites online, 1 is: site-1; never seen by this server (check the names): site-9"
RECORD = {"job_id": "j1", "name": "job", "state": "queued", "rounds_done": 0, "rounds_total": 50,
          "submitter": "lead", "submitter_org": "o", "submitter_role": "lead", "config_hash": "c" * 16,
          "overrides": [], "job_sha256": "a" * 64, "submitted_at": 1.0, "started_at": None, "finished_at": None,
          "best_metric": None, "best_round": None, "final_metrics": {}, "error": ""}


def test_show_job_says_why_a_queued_job_waits() -> None:
    printed = printed_by("show_job j1", {"show_job": {"record": RECORD, "queue_position": 1, "metrics": [],
                                                    "waiting_for": WHY}})

    assert f"waiting: {WHY}" in printed.splitlines()


def test_show_job_of_a_job_that_waits_for_nothing_has_no_such_line() -> None:
    printed = printed_by("show_job j1", {"show_job": {"record": {**RECORD, "state": "running"}, "queue_position": None,
                                                    "metrics": [], "waiting_for": ""}})

    assert "waiting" not in printed


def test_wait_job_that_times_out_on_a_queued_job_says_why_it_waits() -> None:
    with pytest.raises(JobRejected) as caught:
        printed_by("wait_job j1 0", {"wait_job": {"record": RECORD, "metrics": [], "waiting_for": WHY}})

    assert str(caught.value) == f"job j1 still queued after 0 s: {WHY}"


SERVER = {"running_job": "j1", "running_job_name": "job", "round": 3, "rounds_total": 50, "queued": [],
          "uptime_s": 10.0, "sites_online": 2}


@pytest.mark.parametrize(("task", "label", "expected"), [
    ("train", "global", "running j1 (job) round 3/50"),
    (None, None, "running j1 (job) round 3/50"),  # between rounds
    ("validate", "site:site-1", "running j1 (job) validate site:site-1 (step 3)"),
    ("submit_model", "site models", "running j1 (job) submit_model site models (step 3)"),
], ids=["training", "between-rounds", "cross-site-scoring", "cross-site-models"])
def test_check_status_names_the_workflow_step_not_a_training_round(task: str | None, label: str | None,
                                                                  expected: str) -> None:
    printed = printed_by("check_status server", {"check_status": {
        "server": {**SERVER, "task": task, "task_label": label}, "sites": []}})

    assert expected in printed


def test_wait_job_says_a_failed_job_once() -> None:
    # the failure goes to stderr (and with --json to stdout as one object) as every failure does; printed
    # on stdout as well, a long reason stood twice on the terminal
    failed = {**RECORD, "state": "failed", "error": "round 3: 1 of min 2 sites answered"}
    out = io.StringIO()
    console = AdminConsole(_Scripted([{"record": failed, "metrics": []}]),  # type: ignore[arg-type]
                           Console(file=out, width=200, markup=False, highlight=False))
    with pytest.raises(JobRejected, match="^job j1 failed: round 3: 1 of min 2 sites answered$"):
        asyncio.run(console.run_line("wait_job j1 60"))
    assert "failed" not in out.getvalue()


class _Scripted:
    """A server whose wait_job answers come from a list; an exception in it is raised instead."""

    def __init__(self, answers: list[Any]):
        self.answers, self.calls = answers, 0

    async def command(self, name: str, **args: Any) -> Any:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_wait_job_waits_through_a_server_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    # the server crashed mid-job and came back: the job resumes, so the wait goes on instead of failing
    monkeypatch.setattr(console_module, "SERVER_RETRY_S", 0.01)
    running, done = {**RECORD, "state": "running"}, {**RECORD, "state": "finished"}
    unreachable = ServerUnreachable("wait_job: server localhost:8003 unreachable (UNAVAILABLE): Stream removed")
    server = _Scripted([{"record": running, "metrics": []}, unreachable, unreachable,
                        {"record": done, "metrics": []}])
    out = io.StringIO()
    console = AdminConsole(server, Console(file=out, width=200, markup=False, highlight=False))  # type: ignore[arg-type]
    asyncio.run(console.run_line("wait_job j1 60"))
    assert server.calls == 4
    assert "server unreachable; still waiting for job j1" in out.getvalue()
    assert "job j1 finished" in out.getvalue()


def test_show_job_lists_each_sites_part_in_the_round_that_failed_the_job() -> None:
    failed = {**RECORD, "state": "failed", "error": "train round 3: 1 of min 2 sites answered"}
    printed = printed_by("show_job j1", {"show_job": {"record": failed, "queue_position": None, "metrics": [
        {"type": "round_failed", "task": "train", "round": 3, "sites": ["site-1"], "n_samples": {"site-1": 100},
         "train": {"site-1": {"loss": 0.25}}, "failed": {"site-2": "round deadline passed"}}]}})
    rows = [" ".join(line.replace("│", " ").split()) for line in printed.splitlines()]
    assert "3 site-1 100 loss=0.2500 (answered; the round failed for want of others)" in rows
    assert "3 site-2 - FAILED: round deadline passed" in rows


def test_show_job_says_when_a_model_was_compared_with_the_best_on_fewer_sites() -> None:
    running = {**RECORD, "state": "running", "rounds_done": 3, "best_round": 1, "best_metric": 3.0}
    printed = printed_by("show_job j1", {"show_job": {"record": running, "queue_position": None, "metrics": [
        {"type": "validation", "model_round": 1, "sites": {"a": {"mse": 1.0}, "b": {"mse": 5.0}},
         "global": {"mse": 3.0}, "is_best": True},
        {"type": "validation", "model_round": 2, "sites": {"a": {"mse": 1.2}}, "global": {"mse": 1.2},
         "is_best": False, "compared_on": ["a"]}]}})
    rows = [" ".join(line.replace("│", " ").split()) for line in printed.splitlines()]
    assert any(r.startswith("model 1") and r.endswith("[best]") for r in rows), rows
    assert any(r.startswith("model 2") and r.endswith("mse=1.2000 (against the best on a)") for r in rows), rows


def _validation(model_round: int) -> dict[str, Any]:
    return {"type": "validation", "model_round": model_round, "sites": {"a": {"acc": 0.5}}, "global": {"acc": 0.5},
            "is_best": False}


class _Recording(_Scripted):
    def __init__(self, answers: list[Any]):
        super().__init__(answers)
        self.args: list[dict[str, Any]] = []

    async def command(self, name: str, **args: Any) -> Any:
        self.args.append(args)
        return await super().command(name, **args)


def test_wait_job_follows_a_job_whose_metrics_do_not_fit_one_reply() -> None:
    # a long job's metrics (7 MB for 3000 rounds) made every show_job and wait_job fail; the server now sends
    # the newest entries from what the console has seen on, and says how many there are in all
    running, done = {**RECORD, "state": "running"}, {**RECORD, "state": "finished"}
    server = _Recording([
        {"record": running, "metrics": [_validation(r) for r in (8, 9)], "metrics_total": 10, "metrics_skipped": 8},
        {"record": done, "metrics": [_validation(r) for r in (9, 10, 11)], "metrics_total": 12,
         "metrics_skipped": 9}])
    out = io.StringIO()
    console = AdminConsole(server, Console(file=out, width=200, markup=False, highlight=False))  # type: ignore[arg-type]
    asyncio.run(console.run_line("wait_job j1 60"))
    assert [a["seen_metrics"] for a in server.args] == [0, 10]
    rounds = [line.split()[0] for line in out.getvalue().splitlines() if line.strip()[:1].isdigit()]
    assert rounds == ["8", "9", "10", "11"]  # each once: 9 was in both replies


def test_show_job_says_when_the_oldest_metrics_are_left_out() -> None:
    running = {**RECORD, "state": "running"}
    printed = printed_by("show_job j1", {"show_job": {"record": running, "queue_position": None,
                                                    "metrics": [_validation(2999)], "metrics_total": 9000,
                                                    "metrics_skipped": 8999}})
    assert ("(the first 8999 of 9000 metric entries are not shown: download_job j1 DIR has them all, in "
            "metrics.jsonl)") in printed


def test_a_view_carries_the_newest_entries_that_fit_from_what_was_seen() -> None:
    from runtime.server.admin_service import _first_shown

    entries = [{"i": i, "pad": "x" * 90} for i in range(100)]  # about 110 bytes each in JSON
    assert _first_shown(entries, 0, 10_000_000) == 0  # all fit
    first = _first_shown(entries, 0, 1000)
    assert 90 <= first < 100 and sum(len(json.dumps(e)) for e in entries[first:]) <= 1000
    assert _first_shown(entries, 95, 10_000_000) == 95  # only what the console has not seen
    assert _first_shown(entries, 100, 1000) == 100 and _first_shown([], 0, 1000) == 0
