"""What check_status says about each site, over real processes: idle, working on a job's round, and
revoked the moment lead IT's CRL reaches the server (not "online" until the heartbeat timeout), with the
revoked site's endless retries recorded once, at a readable address."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from typing import Any

from provision import revoke
from provision.local_study import LocalStudy, wait_until
from provision.state import StudyWorkspace
from tests.conftest import StudyHandle


def _states(study: LocalStudy) -> dict[str, str]:
    return {s["site"]: s["state"] for s in study.admin_json("check_status client")["sites"]}


def _audit(study: LocalStudy, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (study.kits[name] / "workspace" / "audit.jsonl").read_text().splitlines()]


def _two_idle_sites(make_study) -> StudyHandle:
    """A server and site-1, site-2 started from their kits, both idle."""
    handle = make_study(sites=["site-1", "site-2"], heartbeat_timeout_s=60.0)
    study = handle.study
    study.start_server()
    for site in study.clients:
        study.start(site)
    wait_until(lambda: _states(study) == {"site-1": "idle", "site-2": "idle"}, 90, "both sites idle")
    return handle


def test_check_status_tells_idle_busy_and_revoked_sites_apart(make_study, tmp_path):
    handle = _two_idle_sites(make_study)
    study = handle.study

    job = handle.job(tmp_path / "job")
    # rounds enough to outlast the wait on any machine (30 ended in under a second once torch was loaded)
    job_id = study.admin_json(f"submit_job {job} --set server.rounds=1000 --set meta.min_clients=1")["job_id"]
    wait_until(lambda: all(s.startswith("round ") and s.endswith(f"of job {job_id}") for s in _states(study).values()),
               120, "both sites to report the job's round")

    result = revoke(StudyWorkspace.for_study(study.root / "workspace", study.project_name), "site-2",
                    dt.datetime.now(dt.UTC))
    shutil.copy(result.published_crl_path, study.kits[study.server] / "local" / "crl.pem")

    wait_until(lambda: _states(study).get("site-2") == "revoked", 30,  # half the heartbeat timeout
               "site-2 to show as revoked")
    status = {s["site"]: s for s in study.admin_json("check_status client")["sites"]}
    assert status["site-2"]["online"] is False
    assert status["site-1"]["online"] is True

    # site-2 keeps retrying (heartbeats, presence, polls, then registering every few seconds); the server
    # records that once, not per retry, and so does site-2's own log (once a minute)
    wait_until(lambda: "has been revoked" in study.log_tail("site-2", 20_000), 90, "site-2 to be refused")
    time.sleep(20)  # several retries (its backoff: up to 15 s)
    assert study.log_tail("site-2", 20_000).count("has been revoked") == 1
    refused = [r for r in _audit(study, study.server) if r["event"] == "peer_refused" and "site-2" in r["reason"]]
    assert len(refused) == 1, refused
    assert refused[0]["peer"].startswith(("127.0.0.1:", "[::1]:")), refused[0]["peer"]
    if study.admin_json(f"show_job {job_id}")["record"]["state"] in ("queued", "running"):
        study.admin_json(f"abort_job {job_id}")
    wait_until(lambda: study.admin_json(f"show_job {job_id}")["record"]["state"] in ("aborted", "finished", "failed"),
               60, "the job to end")
    # at once, not a heartbeat later: the site's last heartbeat still names the job, which has ended
    after = study.admin_json("check_status client")
    assert after["server"]["running_job"] is None
    assert {s["site"]: (s["state"], s["job_id"]) for s in after["sites"]}["site-1"] == ("idle", "")


def test_a_site_outside_the_running_job_says_so_and_is_idle_again_after_it(make_study, tmp_path):
    """While a job runs, an admin asking why a site does nothing reads it in check_status: this site is not
    one of the job's (a round-level 'outside round R' or 'done with round R' is said the same way)."""
    handle = _two_idle_sites(make_study)
    study = handle.study

    job = handle.job(tmp_path / "job")
    # enough rounds that the job is still running when aborted: a one-site round of the small job takes well
    # under a second, and 30 of them once ended before the abort came
    job_id = study.admin_json(f"submit_job {job} --set server.rounds=1000 --set meta.min_clients=1 "
                              "--set meta.sites=[site-1]")["job_id"]
    wait_until(lambda: _states(study)["site-1"].startswith("round "), 120, "site-1 to work on the job")
    assert _states(study)["site-2"] == f"outside job {job_id}"

    study.admin_json(f"abort_job {job_id}")
    wait_until(lambda: study.admin_json(f"show_job {job_id}")["record"]["state"] == "aborted", 60, "the abort")
    assert _states(study)["site-2"] == "idle"
