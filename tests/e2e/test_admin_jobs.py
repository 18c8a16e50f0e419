"""Jobs over the real console, server and sites: the queue runs jobs in submission order, the queue and
the finished jobs' records survive a server stop (SIGTERM) and a crash (SIGKILL), runs can be compared
from list_jobs/show_job alone, and a job a site's local policy refuses comes back with the site's reason.
Jobs are one round on one or two small sites, to keep the tests short."""

from __future__ import annotations

import itertools
import json
from typing import Any

from provision.local_study import LocalStudy
from tests.conftest import site_2_refusing_the_lead

SUBMITTER = "lead@study.org"
FAST = "--set server.rounds=1 --set meta.min_clients=1"
TUNED = "--set client.learner.args.lr=0.2 --set meta.sites=[site-1]"


def _jobs(study: LocalStudy) -> dict[str, dict[str, Any]]:
    return {j["job_id"]: j for j in study.admin_json("list_jobs", admin=SUBMITTER)}


def _restart_server(study: LocalStudy, crash: bool) -> None:
    if crash:
        study.kill(study.server)
    else:
        assert study.stop(study.server) == 0, "SIGTERM should end the server cleanly"
    study.start_server()


def test_queue_runs_in_order_survives_server_stop_and_crash_and_runs_compare(make_study, tmp_path):
    handle = make_study(sites=["site-1"])
    study = handle.study
    study.start_server()
    job = handle.job(tmp_path / "job")
    # no site is online yet, so all three wait in the queue
    first = study.admin_json(f"submit_job {job} {FAST}", admin=SUBMITTER)["job_id"]
    second = study.admin_json(f"submit_job {job} {FAST} {TUNED}", admin=SUBMITTER)["job_id"]
    third = study.admin_json(f"clone_job {first}", admin=SUBMITTER)["job_id"]
    queued = _jobs(study)

    _restart_server(study, crash=False)
    assert _jobs(study) == queued
    _restart_server(study, crash=True)
    assert _jobs(study) == queued
    assert study.admin_json("check_status server")["server"]["queued"] == [first, second, third]

    study.start("site-1")
    assert study.admin_json(f"wait_job {third} 180", admin=SUBMITTER)["state"] == "finished"
    done = _jobs(study)
    runs = [done[j] for j in (first, second, third)]
    assert all(r["state"] == "finished" and r["rounds_done"] == 1 and r["final_metrics"] for r in runs), \
        [(r["state"], r["rounds_done"], r["final_metrics"], r["error"]) for r in runs]
    for before, after in itertools.pairwise(runs):  # one at a time, in submission order
        assert before["started_at"] < before["finished_at"] <= after["started_at"] < after["finished_at"]

    _assert_comparable(study, *runs)
    # the server's trail says what the clone made, as it does for a submission: its new id and hashes
    trail = study.kits[study.server] / "workspace" / "audit.jsonl"
    (cloned,) = [r for r in map(json.loads, trail.read_text().splitlines())
                 if r["event"] == "admin_command" and r["command"] == "clone_job"]
    assert cloned["args"]["job_id"] == first and cloned["args"]["new_job_id"] == third
    assert cloned["args"]["job_sha256"] == done[third]["job_sha256"] == done[first]["job_sha256"]

    metrics = study.admin_json(f"show_job {first}", admin=SUBMITTER)["metrics"]
    _restart_server(study, crash=True)
    assert _jobs(study) == done, "finished jobs keep their records across a crash"
    assert study.admin_json(f"show_job {first}", admin=SUBMITTER)["metrics"] == metrics


def _assert_comparable(study: LocalStudy, base: dict[str, Any], tuned: dict[str, Any],
                       clone: dict[str, Any]) -> None:
    """Two hyper-parameter runs tell apart, and a clone matches its original, from list_jobs/show_job alone."""
    assert base["config_hash"] == clone["config_hash"] != tuned["config_hash"]
    assert tuned["overrides"] == ["server.rounds=1", "meta.min_clients=1", "client.learner.args.lr=0.2",
                                  "meta.sites=[site-1]"]
    assert base["final_metrics"] != tuned["final_metrics"] and base["best_metric"] is not None
    table = study.admin("list_jobs", admin=SUBMITTER, as_json=False).stdout
    for run in (base, tuned, clone):
        assert run["job_id"] in table and run["config_hash"][:8] in table
    assert "client.learner.args.lr=0.2" in table and "meta.sites=[site-1]" in table  # printed as typed
    shown = study.admin(f"show_job {tuned['job_id']}", admin=SUBMITTER, as_json=False).stdout
    for text in (f"submitted by {SUBMITTER}", f"config {tuned['config_hash']}", TUNED.replace("--set ", ""),
                 f"auc={tuned['final_metrics']['auc']:.4f}", "took "):
        assert text in shown, text


def _site_events(study: LocalStudy, site: str, event: str) -> list[dict[str, Any]]:
    audit = study.kits[site] / "workspace" / "audit.jsonl"
    return [r for r in map(json.loads, audit.read_text().splitlines()) if r["event"] == event]


def test_a_job_a_site_refuses_is_reported_with_the_sites_reason(make_study, tmp_path):
    handle = site_2_refusing_the_lead(make_study)
    study = handle.study
    job = handle.job(tmp_path / "job")
    only_site_2 = study.admin_json(f"submit_job {job} {FAST} --set meta.sites=[site-2]", admin=SUBMITTER)["job_id"]
    both = study.admin_json(f"submit_job {job} {FAST}", admin=SUBMITTER)["job_id"]
    reason = f"site policy refuses job {{}}: org 'coordinating-center' of {SUBMITTER} is not allowed here"

    # the only site refuses: the job fails, and the submitter reads why in wait_job and show_job
    waited = study.admin(f"wait_job {only_site_2} 120", admin=SUBMITTER)
    assert waited.returncode == 1 and "site-2: " + reason.format(only_site_2) in waited.stderr
    record = study.admin_json(f"show_job {only_site_2}", admin=SUBMITTER)["record"]
    assert record["state"] == "failed" and reason.format(only_site_2) in record["error"]
    assert reason.format(only_site_2) in study.admin(f"show_job {only_site_2}", admin=SUBMITTER,
                                                     as_json=False).stdout

    # one of two refuses: the job runs on the other, and show_job names the refusal in its round
    assert study.admin_json(f"wait_job {both} 120", admin=SUBMITTER)["state"] == "finished"
    rounds = [m for m in study.admin_json(f"show_job {both}", admin=SUBMITTER)["metrics"] if m["type"] == "round"]
    assert rounds[0]["sites"] == ["site-1"] and reason.format(both) in rounds[0]["failed"]["site-2"]

    refusals = _site_events(study, "site-2", "task_failed")
    assert {r["job_id"] for r in refusals} == {only_site_2, both}
    assert _site_events(study, "site-2", "job_received") == [], "a refused job's code never reaches the site"
