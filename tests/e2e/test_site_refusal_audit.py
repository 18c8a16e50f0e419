"""A site's own record of what it refused and what it reported, over real processes:

- a site whose local/job_policy.yml refuses a job audits it once (`job_refused`, with the submitter and the
  reason) and tells the server it declines the job, which tasks it no more for it; its failed task's report
  to the server is audited as `error_reported`, never as `update_sent`, and its log never says a result was
  accepted; the server takes the report as the site's failure of that round;
- a running site notices an edit of its local/*.yml once (log and audit: it applies it only after a restart);
  restarted from the console with a local/*.yml it cannot read, it stops with exit code 1 and says why in
  its workspace/log.txt, right after the line that says the server asked it to restart.

(tests/runtime/client/test_site_refusals.py covers every kind of refusal against a fake server.)"""

from __future__ import annotations

import json
from typing import Any

from provision.local_study import LocalStudy, wait_until
from tests.conftest import site_2_refusing_the_lead

SUBMITTER = {"name": "lead@study.org", "org": "coordinating-center", "role": "lead"}


def _events(study: LocalStudy, site: str, event: str, job_id: str) -> list[dict[str, Any]]:
    audit = study.kits[site] / "workspace" / "audit.jsonl"
    return [r for r in map(json.loads, audit.read_text().splitlines())
            if r["event"] == event and r.get("job_id") == job_id]


def test_a_refused_job_is_audited_once_and_its_error_reports_are_no_updates(make_study, tmp_path):
    handle = site_2_refusing_the_lead(make_study)
    study = handle.study
    job = handle.job(tmp_path / "job")
    job_id = study.admin_json(f"submit_job {job} --set server.rounds=2 --set meta.min_clients=1",
                              admin=SUBMITTER["name"])["job_id"]
    assert study.admin_json(f"wait_job {job_id} 240", admin=SUBMITTER["name"])["state"] == "finished"
    reason = (f"site policy refuses job {job_id}: org 'coordinating-center' of lead@study.org is not allowed "
              "here (allowed orgs: org-site-2)")

    # the server tasked site-2 once (after a prepare, or building round 0), then left it out: it declined
    failed = _events(study, "site-2", "task_failed", job_id)
    assert [r["task"] for r in failed][-1] != "prepare" and len([r for r in failed if r["task"] != "prepare"]) == 1
    assert {r["round"] for r in failed if r["task"] == "train"} <= {1}
    assert all(r["reason"] == reason for r in failed)
    (refused,) = _events(study, "site-2", "job_refused", job_id)
    assert refused["submitter"] == SUBMITTER and refused["rule"] == "org_role" and refused["reason"] == reason
    assert len(refused["job_sha256"]) == 64 and refused["code_sha256"] == ""

    # each answered failure left as an error report, audited as one; nothing says an update was sent
    reported = _events(study, "site-2", "error_reported", job_id)
    assert [(r["task"], r["round"]) for r in reported] == [(r["task"], r["round"]) for r in failed
                                                           if r["task"] != "prepare"]
    assert all(r["reason"] == reason for r in reported)
    assert _events(study, "site-2", "update_sent", job_id) == []
    log = (study.kits["site-2"] / "workspace" / "log.txt").read_text().splitlines()
    mine = [line for line in log if f"job {job_id} " in line]
    assert not any("result accepted" in line for line in mine), mine
    assert sum("the server took this site's failure report" in line for line in mine) == len(reported)

    # the server took it as site-2's failure, with its reason, in the round it answered, and left it out after
    rounds = [m for m in study.admin_json(f"show_job {job_id}")["metrics"] if m["type"] == "round"]
    assert [r["sites"] for r in rounds] == [["site-1"], ["site-1"]]
    assert [bool(r["failed"]) for r in rounds] in ([True, False], [False, False])  # (False: it declined round 0)
    assert all(reason in r["failed"]["site-2"] for r in rounds if r["failed"])
    assert len(_events(study, "site-1", "update_sent", job_id)) >= 2  # site-1's real updates still are


def test_a_site_restarted_with_a_bad_local_file_says_why_in_its_log(make_study):
    study = make_study(sites=["site-1"]).study
    study.start_server()
    study.start_sites()
    proc = study.procs["site-1"]
    study.write_local("site-1", "privacy.yml", {"gaussian_dp": {"noise_multiplier": 1.0, "clip": 1.0}})
    # the running site goes on with the settings it started with, and says so once
    site_log = study.kits["site-1"] / "workspace" / "log.txt"
    wait_until(lambda: "local/privacy.yml changed since this site started" in site_log.read_text(), 60,
               "site-1 to notice the edit")
    assert [r["file"] for r in map(json.loads, (study.kits["site-1"] / "workspace" / "audit.jsonl").read_text()
                                   .splitlines()) if r["event"] == "local_settings_changed"] == ["local/privacy.yml"]

    study.admin_json("restart client site-1")

    wait_until(lambda: proc.poll() is not None, 60, "site-1 to stop on its bad privacy.yml")
    assert proc.returncode == 1
    log = (study.kits["site-1"] / "workspace" / "log.txt").read_text().strip().splitlines()
    asked = max(i for i, line in enumerate(log) if "server asked this site to restart" in line)
    last = log[-1]
    assert asked < len(log) - 1 and " ERROR fedkit.client: site cannot start: " in last, log[asked:]
    assert "local/privacy.yml" in last and "gaussian_dp.clip" in last
    # stderr (start.sh's output, here root/logs/site-1.log) ends with the same reason in its one line
    assert study.log_tail("site-1").strip().splitlines()[-1] == \
        "fedkit client: " + last.partition(" site cannot start: ")[2]
