"""local/privacy.yml `scores:` caps how many models jobs may have scored on a site's data (validations are a
query interface to it, with weights the server chooses): counted per job and for the whole site, across
restarts, before any of the job's code runs; past a cap the site declines the job."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.client.privacy_policy import PrivacyPolicy
from tests.runtime.client.test_site_refusals import FakeServer, _daemon, _events, _run_tasks


def _caps(**caps: int) -> PrivacyPolicy:
    return PrivacyPolicy.model_validate({"scores": caps})


def test_a_job_past_its_cap_of_scores_is_declined_before_its_code_runs(tmp_path: Path) -> None:
    server = FakeServer()
    daemon = _daemon(tmp_path, server, privacy=_caps(max_per_job=2))
    _run_tasks(daemon, "job-a", (("validate", 1), ("validate", 2), ("validate", 3)))
    failed = _events(daemon, "task_failed")
    refused = [r for r in failed if "its cap (local/privacy.yml scores.max_per_job)" in r["reason"]]
    assert [r["round"] for r in refused] == [3]  # the first two were let through (and failed for want of a model)
    assert refused[0]["reason"].startswith("job job-a: this site has scored 2 models for this job")
    assert _events(daemon, "error_reported")[-1]["declines_job"] is True
    assert json.loads((daemon._ws / "scores.json").read_text()) == {"jobs": {"job-a": 2}, "total": 2}


def test_the_site_cap_holds_across_jobs_and_restarts(tmp_path: Path) -> None:
    _run_tasks(_daemon(tmp_path, FakeServer(), privacy=_caps(max_per_site=3)), "job-a",
               (("validate", 1), ("train", 1)))
    restarted = _daemon(tmp_path, FakeServer(), privacy=_caps(max_per_site=3))  # same workspace
    _run_tasks(restarted, "invented-job", (("validate", 1), ("validate", 2)))
    reasons = [r["reason"] for r in _events(restarted, "task_failed") if r["job_id"] == "invented-job"]
    assert "scored 3 models for all jobs together, its cap (local/privacy.yml scores.max_per_site)" in reasons[-1]
    assert json.loads((restarted._ws / "scores.json").read_text())["total"] == 3


def test_without_caps_nothing_is_counted(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, FakeServer())
    _run_tasks(daemon, "job-a", (("validate", 1),))
    assert not (daemon._ws / "scores.json").exists()
