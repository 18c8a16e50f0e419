"""The site's own limits on a job, over real processes, whatever the job asks.

- Disk: the learner (tests/e2e/jobs/diskfill) writes 32 MiB files into its scratch folder; the site's floor
  (local/site.yml sandbox.min_free_disk_mb) is set 320 MiB under the disk's free space at the start, so the
  job passes it within seconds. The site kills the worker, empties the job's scratch, audits job_stopped,
  fails the task with the reason, and takes no more of the job's tasks; the site itself stays up.
- Time: a job allowing each task 120 s meets a site whose sandbox.max_task_s is 10: its 30 s round fails
  at the site's cap, which the reason names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from provision.local_study import wait_until
from runtime.client.disk_guard import free_mb

DISKFILL_JOB = Path(__file__).parent / "jobs" / "diskfill"
SLEEPY_JOB = Path(__file__).parent / "jobs" / "sleepy"
MARGIN_MB = 320


def test_a_job_that_fills_the_disk_is_stopped_and_cleaned_up(make_study, tmp_path):
    handle = make_study(sites=["site-1"])
    study = handle.study
    floor = int(free_mb(tmp_path)) - MARGIN_MB
    study.update_local("site-1", "site.yml", {"sandbox": {"min_free_disk_mb": floor}})
    study.start_server()
    study.start_sites()

    job = Path(shutil.copytree(DISKFILL_JOB, tmp_path / "diskfill"))
    job_id = study.admin_json(f"submit_job {job}")["job_id"]
    audit_path = study.kits["site-1"] / "workspace" / "audit.jsonl"

    def events(name: str) -> list[dict]:
        return [r for r in map(json.loads, audit_path.read_text().splitlines()) if r["event"] == name]

    wait_until(lambda: events("job_stopped"), 120, "the site to stop the job")
    try:
        study.admin(f"wait_job {job_id} 120", timeout_s=150)
    except RuntimeError:
        pass  # the job fails: its only site stopped it

    (stopped,) = events("job_stopped")
    assert stopped["job_id"] == job_id and stopped["rule"] == "disk"
    assert f"below local/site.yml sandbox.min_free_disk_mb ({floor})" in stopped["reason"]
    failed = [r["reason"] for r in events("task_failed") if r["job_id"] == job_id]
    assert failed and all(r == stopped["reason"] for r in failed), failed  # the interrupted task and any later
    scratch = study.kits["site-1"] / "workspace" / "jobs" / job_id / "scratch"
    assert not any(scratch.iterdir()), "the job's files were removed"
    assert free_mb(tmp_path) > floor  # the room came back
    assert len(events("worker_started")) == 1, "no second worker for a stopped job"
    # the site stays up and says why to the server
    assert study.procs["site-1"].poll() is None
    shown = study.admin_json(f"show_job {job_id}")
    assert "min_free_disk_mb" in json.dumps(shown)


def _sleepy_task_failures(study, tmp_path, settings: str) -> list[str]:
    """Start the study, run the sleepy job for one round with `settings`, and wait for site-1 to fail a task
    of it; the reasons site-1 audited."""
    study.start_server()
    study.start_sites()
    job = Path(shutil.copytree(SLEEPY_JOB, tmp_path / "sleepy"))
    job_id = study.admin_json(f"submit_job {job} --set server.rounds=1 {settings}")["job_id"]
    audit_path = study.kits["site-1"] / "workspace" / "audit.jsonl"

    def failed() -> list[str]:
        return [r["reason"] for r in map(json.loads, audit_path.read_text().splitlines())
                if r["event"] == "task_failed" and r["job_id"] == job_id]

    wait_until(failed, 60, "site-1 to fail a task of the job")
    return failed()


def test_a_task_longer_than_the_sites_cap_fails_saying_so(make_study, tmp_path):
    handle = make_study(sites=["site-1"])
    study = handle.study
    # 10 s: the cap bounds the worker's start too, which a loaded machine may take seconds for
    study.update_local("site-1", "site.yml", {"sandbox": {"max_task_s": 10}})
    reasons = _sleepy_task_failures(study, tmp_path, "--set client.learner.args.train_s=30 "
                                    "--set client.task_timeout_s=120 --set server.round_timeout_s=300")
    assert reasons[0] == ("training worker gave no answer within 10 s: this site's cap (local/site.yml "
                           "sandbox.max_task_s), below the 120 s the job allows")


def _kept(study, site: str, job_id: str) -> dict[str, int]:
    """Task folder -> bytes on disk, of what the site kept of the job."""
    inbox = study.kits[site] / "workspace" / "jobs" / job_id / "inbox"
    return {d.name: sum(f.stat().st_blocks * 512 for f in d.rglob("*")) for d in inbox.iterdir() if d.is_dir()}


def test_the_site_caps_what_jobs_keep_on_it(make_study, tmp_path):
    # a job keeps each round's models (keep_updates); site-1 keeps at most 2 MiB of them, site-2 none
    handle = make_study(sites=["site-1", "site-2"])
    study = handle.study
    study.update_local("site-1", "site.yml", {"keep_updates_max_mb": 2})
    study.update_local("site-2", "site.yml", {"keep_updates_max_mb": 0})
    study.start_server()
    study.start_sites()

    job = Path(shutil.copytree(SLEEPY_JOB, tmp_path / "sleepy"))  # 100k float32: 0.4 MB a model, 0.8 a round
    job_id = study.admin_json(f"submit_job {job} --set server.rounds=5 --set client.keep_updates=true "
                              "--set client.learner.args.n_params=100000 --set client.learner.args.train_s=0.1 "
                              "--set meta.min_clients=2")["job_id"]
    assert study.admin_json(f"wait_job {job_id} 240")["state"] == "finished"  # the cap fails no task

    kept = _kept(study, "site-1", job_id)
    assert 0 < sum(kept.values()) <= 2 << 20, kept
    assert "round_0005_train" in kept and "round_0001_train" not in kept, kept  # the oldest went first
    records = [json.loads(line) for line in (study.kits["site-1"] / "workspace" / "audit.jsonl").read_text()
               .splitlines()]
    removed = [f for r in records if r["event"] == "kept_updates_removed" for f in r["folders"]]
    assert f"jobs/{job_id}/inbox/round_0001_train" in removed
    assert "capped at local/site.yml keep_updates_max_mb (2 MiB)" in study.log_tail("site-1", 1 << 20)

    assert _kept(study, "site-2", job_id) == {}
    log = study.log_tail("site-2", 1 << 20)
    assert log.count(f"job {job_id} asks to keep its models on this site; local/site.yml keep_updates_max_mb "
                     "is 0: none are kept") == 1


def test_a_learner_hanging_while_it_is_built_is_stopped_at_the_jobs_task_timeout(make_study, tmp_path):
    # it waited the worker start's 300 s whatever the job asked
    handle = make_study(sites=["site-1"])
    study = handle.study
    reasons = _sleepy_task_failures(study, tmp_path, "--set client.learner.args.init_s=600 "
                                    "--set client.task_timeout_s=3 --set server.round_timeout_s=120")
    assert reasons[0].endswith("while starting (importing the job's code, building its learner): the job's "
                               "task_timeout_s"), reasons
