"""runtime/admin/console.py: what the console says about where a job stands: why a queued job has not
started (submit_job, show_job, wait_job), and which workflow step a running job is in (check_status)."""

from __future__ import annotations

import pytest

from runtime.errors import JobRejected
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
