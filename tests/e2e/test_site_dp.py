"""Differential-privacy accounting over real processes: a site whose local/privacy.yml adds gaussian_dp and
sets a DP budget reports the epsilon of every upload (the accountant's, recomputed here), audits it, shows
it in show_job, and refuses the upload that would go past its budget, before anything is written to send.
One site, two rounds, to keep it short."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from provision.local_study import LocalStudy, wait_until

NOISE, DELTA = 1.0, 1e-5


def accountant_epsilon(releases: int, delta: float = DELTA) -> float:
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(NOISE), releases)
    return float(accountant.get_epsilon(delta))


def _events(study: LocalStudy, site: str, event: str) -> list[dict[str, Any]]:
    audit = study.kits[site] / "workspace" / "audit.jsonl"
    return [r for r in map(json.loads, audit.read_text().splitlines()) if r["event"] == event]


def _start_with_budget(study: LocalStudy, setting: str, budget: float) -> None:
    """The server and site-1, whose local/privacy.yml adds gaussian_dp at NOISE and sets `setting`."""
    study.write_local("site-1", "privacy.yml", {"gaussian_dp": {"noise_multiplier": NOISE, "clip_norm": 1.0},
                                                setting: {"epsilon": budget, "delta": DELTA},
                                                "build_initial_model": True})  # round 0 is a release too
    study.start_server()
    study.start_sites()


def test_site_reports_its_epsilon_and_stops_at_its_budget(make_study, tmp_path):
    handle = make_study(sites=["site-1"])
    study = handle.study
    budget = (accountant_epsilon(2) + accountant_epsilon(3)) / 2  # the round-0 model and round 1 fit; not round 2
    _start_with_budget(study, "dp_budget", budget)

    job = handle.job(tmp_path / "job")
    job_id = study.admin_json(f"submit_job {job} --set server.rounds=2 --set meta.min_clients=1 "
                              "--set client.filters=[] --set client.keep_updates=true")["job_id"]
    wait_until(lambda: _events(study, "site-1", "dp_budget_exhausted"), 300, "the site to refuse round 2")
    study.admin(f"wait_job {job_id} 120")  # the job ends, however the server takes a round without results

    # every upload through gaussian_dp is audited with what it cost: the accountant's numbers
    sent = [r for r in _events(study, "site-1", "update_sent") if r["job_id"] == job_id and r["privacy"]]
    assert [(r["task"], r["privacy"]["dp"]["releases"]) for r in sent] == [("init", 1), ("train", 2)]
    for entry in sent:
        dp = entry["privacy"]["dp"]
        assert dp["epsilon_total"] == pytest.approx(accountant_epsilon(dp["releases"]), rel=1e-9)
        assert dp["epsilon_round"] == pytest.approx(accountant_epsilon(1), rel=1e-9)
        assert (dp["delta"], dp["noise_multiplier"], dp["sampling_rate"]) == (DELTA, NOISE, 1.0)

    # the third release was refused on the site, audited, and nothing for it was written to send
    (refused,) = _events(study, "site-1", "dp_budget_exhausted")
    assert refused["job_id"] == job_id and refused["task"] == "train" and refused["releases_so_far"] == 2
    assert refused["epsilon_would_be"] == pytest.approx(accountant_epsilon(3), rel=1e-9)
    failed = [r for r in _events(study, "site-1", "task_failed") if r["job_id"] == job_id]
    assert any("DP budget exhausted on this site" in r["reason"] and "local/privacy.yml dp_budget" in r["reason"]
               and "nothing of the job ran for this task" in r["reason"] for r in failed)
    site_job = study.kits["site-1"] / "workspace" / "jobs" / job_id
    trained = sorted(p.parent.name for p in site_job.glob("inbox/*/delta_out.safetensors"))  # kept by keep_updates
    assert len(list(site_job.glob("inbox/*/*.sent.safetensors"))) == 2  # round 0 and 1
    assert trained == ["round_0001_train"], "round 2 was refused before the job's code trained it"
    # the site said it declines the rest of the job: with its budget spent, it answers nothing more of it, not
    # even a validation (scores of weights the server chose read the data outside any budget)
    (reported,) = [r for r in _events(study, "site-1", "error_reported") if r["job_id"] == job_id]
    assert reported["declines_job"] is True
    server_audit = study.kits[study.server] / "workspace" / "audit.jsonl"
    declined = [r for r in map(json.loads, server_audit.read_text().splitlines()) if r["event"] == "site_declined"]
    assert [r["site"] for r in declined] == ["site-1"]
    refusals = [r for r in _events(study, "site-1", "job_refused") if r["job_id"] == job_id]
    assert [r["rule"] for r in refusals] == ["privacy"] and "dp_budget" in refusals[0]["reason"]
    assert json.loads((site_job / "dp_ledger.json").read_text())["releases"] == 2

    # the site's own report of its audit trail (startup/audit_report.sh) says the same, from the records
    ran = subprocess.run(["bash", str(study.kits["site-1"] / "startup" / "audit_report.sh"), "--json", "--job",
                          job_id], capture_output=True, text=True, env=study.env(), timeout=120, check=False)
    assert ran.returncode == 0, ran.stderr
    (report,) = json.loads(ran.stdout)["jobs"]
    assert report["submitter"].startswith(study.admins[0]) and report["code_approval"] == ["any code allowed"]
    assert report["uploads_with_weights"] == 2 and report["bytes_sent"] == sum(
        f.stat().st_size for f in site_job.glob("inbox/*/*.sent.safetensors"))  # what left, kept by keep_updates
    assert [f for f in report["filters"] if f.startswith("gaussian_dp")] == ["gaussian_dp (site)"]
    assert report["dp"]["releases"] == 2 and report["dp"]["epsilon_total"] == pytest.approx(accountant_epsilon(2))
    assert report["refused"] == {f"privacy: {refusals[0]['reason']}": 1} and report["dp_refused"] == {"dp_budget": 1}
    assert list(report["errors_sent"]) == [reported["reason"]] and report["tasks_failed"] == 1
    uploads = [r for r in _events(study, "site-1", "update_sent") if r["job_id"] == job_id]
    assert report["scalar_points"] == sum(r["reported"].get("scalar_points", 0) for r in uploads) > 0
    assert "loss" in report["metric_names"]["train"]

    # show_job: the total so far, per site, at the site's delta
    table = study.admin(f"show_job {job_id}", as_json=False).stdout
    expected = f"  site-1: epsilon {accountant_epsilon(2):.3g} at delta 1e-05 after 2 releases (noise multiplier 1"
    assert any(line.startswith(expected) for line in table.splitlines()), table


def test_a_site_budget_holds_across_a_job_and_its_clone(make_study, tmp_path):
    """dp_site_budget fits three releases: the first job spends two (the round-0 model and round 1), its
    clone one; the clone's round 1 is refused, though the clone alone has released once."""
    handle = make_study(sites=["site-1"])
    study = handle.study
    budget = (accountant_epsilon(3) + accountant_epsilon(4)) / 2
    _start_with_budget(study, "dp_site_budget", budget)

    job = handle.job(tmp_path / "job")
    first = study.admin_json(f"submit_job {job} --set server.rounds=1 --set meta.min_clients=1 "
                             "--set client.filters=[]")["job_id"]
    assert study.admin_json(f"wait_job {first} 300", timeout_s=330)["state"] == "finished"
    clone = study.admin_json(f"clone_job {first}")["job_id"]
    wait_until(lambda: _events(study, "site-1", "dp_budget_exhausted"), 300, "the site to refuse the clone's round 1")
    study.admin(f"wait_job {clone} 120")

    (refused,) = _events(study, "site-1", "dp_budget_exhausted")
    assert (refused["job_id"], refused["task"], refused["budget"]) == (clone, "train", "dp_site_budget")
    assert refused["releases_so_far"] == 3
    assert refused["epsilon_would_be"] == pytest.approx(accountant_epsilon(4), rel=1e-9)
    sent = [(r["job_id"], r["task"], r["privacy"]["dp"]["releases"], r["privacy"]["dp"]["site_releases"])
            for r in _events(study, "site-1", "update_sent") if r["privacy"]]  # validation sends no weights
    assert sent == [(first, "init", 1, 1), (first, "train", 2, 2), (clone, "init", 1, 3)]
    ledger = json.loads((study.kits["site-1"] / "workspace" / "dp_site_ledger.json").read_text())
    assert ledger["releases"] == 3 and ledger["jobs"] == {first: 2, clone: 1}

    table = study.admin(f"show_job {clone}", as_json=False).stdout
    assert f"all jobs on this site together: epsilon {accountant_epsilon(3):.3g} at delta 1e-05 after 3 releases" \
        in table, table
