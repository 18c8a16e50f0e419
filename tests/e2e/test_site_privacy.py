"""The site decides, over real processes: a site's local/privacy.yml filters everything that leaves it
(training deltas, the round-0 model, local models for cross-site validation) even for a job that asks for
no filters, and says what ran in its audit and in show_job; local/job_policy.yml `code:` refuses code the
site did not approve (approved_hashes) or that no listed admin signed (signed_by), saying why in show_job.
Jobs are one round on one or two small sites, to keep the tests short."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_bytes
from typer.testing import CliRunner

from provision.cli import app as fedkit_cli
from provision.local_study import LocalStudy, wait_until
from runtime.admin.client import AdminClient
from runtime.weights import load_file

EXCLUDED = "2.bias"  # the tabular model's last layer bias
FAST = "--set server.rounds=1 --set meta.min_clients=1"
LEAD = "lead@study.org"
PROJECT_ADMIN = "admin@study.org"
DP_ACCOUNTING = {"delta": 1e-5, "sampling_rate": 1.0}  # gaussian_dp's defaults, reported with the floor's args


def _online(study: LocalStudy) -> LocalStudy:
    wait_until(lambda: sum(s["online"] for s in study.admin_json("check_status client")["sites"])
               == len(study.clients), 60, "every site online")
    return study


def _events(study: LocalStudy, site: str, event: str) -> list[dict[str, Any]]:
    audit = study.kits[site] / "workspace" / "audit.jsonl"
    return [r for r in map(json.loads, audit.read_text().splitlines()) if r["event"] == event]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_all_differ(sent: dict[str, np.ndarray], raw: dict[str, np.ndarray], what: str) -> None:
    """`sent` left the site, `raw` is what the site's learner produced. (After round 0 the raw weights lack
    the excluded tensor too: the global model never had it, so it stayed in the worker.)"""
    assert EXCLUDED not in sent, f"{what}: the excluded tensor left the site"
    assert set(sent) == set(raw) - {EXCLUDED}
    for name, value in sent.items():
        assert not np.allclose(value, raw[name]), f"{what}: tensor '{name}' left the site without noise"


def test_site_policy_filters_every_path_out_of_the_site(make_study, tmp_path):
    handle = make_study(sites=["site-1", "site-2"])
    study = handle.study
    floors = {"site-1": {"noise_multiplier": 0.05, "clip_norm": 2.0},
              "site-2": {"noise_multiplier": 0.1, "clip_norm": 1.0}}
    for site, floor in floors.items():
        study.write_local(site, "privacy.yml", {"exclude_vars": [f"^{EXCLUDED.replace('.', '[.]')}$"],
                                                "gaussian_dp": floor, "build_initial_model": True})
    study.start_server()
    for site in study.clients:
        study.start(site)
    _online(study)

    job = handle.job(tmp_path / "job")
    record = study.admin_json(f"submit_job {job} --set server.rounds=1 --set meta.min_clients=2 "
                              "--set client.filters=[] --set client.keep_updates=true "
                              "--set server.workflows=[fedavg,cross_site]")
    job_id = record["job_id"]
    assert study.admin_json(f"wait_job {job_id} 300")["state"] == "finished"

    # 1. Nothing the server holds, and nothing a downloader gets, contains the excluded tensor.
    server_job = study.kits[study.server] / "workspace" / "jobs" / job_id
    server_models = sorted(server_job.rglob("*.safetensors"))
    assert {p.name for p in server_models} >= {"initial.safetensors", "global.safetensors", "site_site-1.safetensors",
                                                "site_site-2.safetensors"}
    for path in server_models:
        assert EXCLUDED not in load_file(path), f"{path.name} holds the excluded tensor"
    study.admin_json(f"download_job {job_id} {tmp_path / 'results'} --zip")
    with zipfile.ZipFile(tmp_path / "results" / f"{job_id}.zip") as zf:
        downloaded = [n for n in zf.namelist() if n.endswith(".safetensors")]
        assert len(downloaded) == len(server_models)
        for name in downloaded:
            assert EXCLUDED not in load_bytes(zf.read(name)), f"download {name} holds the excluded tensor"

    # 2. What left each site differs, tensor by tensor, from what the site computed (kept by keep_updates).
    shown = study.admin_json(f"show_job {job_id}")
    (init,) = [m for m in shown["metrics"] if m["type"] == "shared" and m["task"] == "init"]
    (builder,) = init["sites"]
    site_job = {s: study.kits[s] / "workspace" / "jobs" / job_id / "inbox" for s in study.clients}  # round folders
    raw_initial = load_file(site_job[builder] / "round_0000_init" / "initial.safetensors")
    assert EXCLUDED in raw_initial
    _assert_all_differ(load_file(server_job / "models" / "initial.safetensors"), raw_initial, "initial model")
    for site in study.clients:
        (submit_dir,) = site_job[site].glob("cross_site_round_*_submit_model")
        _assert_all_differ(load_file(server_job / "models" / f"site_{site}.safetensors"),
                           load_file(submit_dir / "local_model.safetensors"), f"{site}'s local model")
        train_dir = site_job[site] / "round_0001_train"
        _assert_all_differ(load_file(train_dir / "update_sent.safetensors"),
                           load_file(train_dir / "delta_out.safetensors"), f"{site}'s update")

    # 3. Each site's audit says per update what ran, raised from the job's request, and the hash of the
    #    exact bytes that left.
    for site in study.clients:
        sent = {r["task"]: r for r in _events(study, site, "update_sent") if r["job_id"] == job_id
                and r["task"] != "validate"}  # validation sends metrics only
        assert all(r["privacy"] is None for r in _events(study, site, "update_sent") if r["task"] == "validate")
        assert set(sent) == ({"init", "train", "submit_model"} if site == builder else {"train", "submit_model"})
        (submit_dir,) = site_job[site].glob("cross_site_round_*_submit_model")
        files = {"init": site_job[site] / "round_0000_init" / "initial.sent.safetensors",
                 "train": site_job[site] / "round_0001_train" / "update_sent.safetensors",
                 "submit_model": submit_dir / "local_model.sent.safetensors"}
        for task, entry in sent.items():
            privacy = entry["privacy"]
            assert [(s["name"], s["source"]) for s in privacy["chain"]] == [("exclude_vars", "site"),
                                                                            ("gaussian_dp", "site")]
            assert privacy["chain"][1]["args"] == {**floors[site], **DP_ACCOUNTING} and privacy["raised"] is True
            # later the worker holds it back already (the global never had it), so only round 0 drops it; a
            # round-0 model's names are the job's choice, so that report counts it without naming it
            assert privacy["excluded"] == [] and privacy["n_excluded"] == (1 if task == "init" else 0)
            assert privacy["payload_sha256"] == entry["payload_sha256"] == _sha256(files[task])
        assert sent["train"]["privacy"]["applied_to"] == "delta"
        assert sent["submit_model"]["privacy"]["applied_to"] == "model_minus_last_global"

    # 4. show_job carries the chain per site, for the training round and for the shared models.
    (train_round,) = [m for m in shown["metrics"] if m["type"] == "round"]
    assert sorted(train_round["privacy"]) == ["site-1", "site-2"]
    for site in study.clients:
        assert train_round["privacy"][site]["chain"][1]["args"] == {**floors[site], **DP_ACCOUNTING}
    (cross,) = [m for m in shown["metrics"] if m["type"] == "shared" and m["task"] == "submit_model"]
    assert sorted(cross["privacy"]) == ["site-1", "site-2"]
    assert init["privacy"][builder]["applied_to"] == "whole_model"
    table = study.admin(f"show_job {job_id}", as_json=False).stdout
    assert ("  site-2: exclude_vars(pattern=^2[.]bias$)[site] -> gaussian_dp(clip_norm=1, delta=1e-05, "  # sorted by
            "noise_multiplier=0.1, sampling_rate=1)[site]; raised by site (the job asks for no gaussian_dp; "
            "this site requires gaussian_dp with noise_multiplier >= 0.1, clip_norm <= 1)  "
            "[round 1, submit_model]") in table.splitlines()  # the server's record, with the site's reason


def _job_hash(job: Path) -> str:
    result = CliRunner().invoke(fedkit_cli, ["job", "hash", str(job)])
    assert result.exit_code == 0, result.output
    return result.stdout.split()[0]


def _refused(study: LocalStudy, job_id: str, admin: str | None = None) -> str:
    waited = study.admin(f"wait_job {job_id} 120", admin=admin)
    assert waited.returncode == 1, waited.stdout
    record = study.admin_json(f"show_job {job_id}", admin=admin)["record"]
    assert record["state"] == "failed"
    return record["error"]


def _restart(study: LocalStudy, site: str) -> None:
    study.stop(site)
    study.start(site)
    _online(study)


def test_approved_hashes_refuse_until_site_it_approves(make_study, tmp_path):
    handle = make_study(sites=["site-1"])
    study = handle.study
    study.write_local("site-1", "job_policy.yml", {"code": {"approved_hashes": ["0" * 64]}})
    study.start_server()
    study.start("site-1")
    _online(study)
    job = handle.job(tmp_path / "job")
    code = _job_hash(job)

    refused = study.admin_json(f"submit_job {job} {FAST}")
    assert refused["code_sha256"] == code  # the console and `fedkit job hash` agree
    error = _refused(study, refused["job_id"])
    assert f"site-1: site policy refuses job {refused['job_id']}: its code hash {code} is not in approved_hashes" \
        in error and "the site keeps the code for its IT to review" in error
    (audited,) = _events(study, "site-1", "job_refused")
    assert audited["code_sha256"] == code and "approved_hashes" in audited["reason"]
    assert _events(study, "site-1", "job_received") == [], "refused code is never unpacked"

    # site IT reads the very code that asked to run (kept as received) and takes its hash from there
    assert [r["code_sha256"] for r in _events(study, "site-1", "code_kept_for_review")] == [code]
    listed = _kit_script(study, "site-1", "review_job.sh")
    assert refused["job_id"] in listed and f"code {code[:16]}..." in listed
    review = _kit_script(study, "site-1", "review_job.sh", refused["job_id"])
    unpacked = study.kits["site-1"] / "workspace" / "review" / refused["job_id"]
    assert f"unpacked, never run, into {unpacked}:" in review and "custom/learner.py" in review
    assert (unpacked / "custom" / "learner.py").read_bytes() == (job / "custom" / "learner.py").read_bytes()
    approve = review.splitlines()[-2].strip()
    assert approve == f"- {code}"
    assert not _events(study, "site-1", "job_received"), "reviewing ran nothing"

    study.write_local("site-1", "job_policy.yml", {"code": {"approved_hashes": ["0" * 64, approve[2:]]}})
    _restart(study, "site-1")
    accepted = study.admin_json(f"clone_job {refused['job_id']}")
    assert study.admin_json(f"wait_job {accepted['job_id']} 300")["state"] == "finished"
    (received,) = _events(study, "site-1", "job_received")
    assert received["code_sha256"] == code and received["code_approval"] == f"code hash {code[:16]} approved"

    # its next version is read as what changed from the code that ran
    with (job / "custom" / "learner.py").open("a") as f:
        f.write("# version 2: one line more\n")
    changed = study.admin_json(f"submit_job {job} {FAST}")
    assert "the site keeps the code for its IT to review" in _refused(study, changed["job_id"])
    review = _kit_script(study, "site-1", "review_job.sh", changed["job_id"], "--against", accepted["job_id"])
    diff = review[:review.index("\n\njob ")].splitlines()
    assert diff[:4] == [f"changes from the code of job {accepted['job_id']} to this one:",
                        "--- a/custom/learner.py", "+++ b/custom/learner.py", diff[3]] and diff[3].startswith("@@")
    assert [line for line in diff if line.startswith(("+", "-")) and line[:3] not in ("+++", "---")] == \
        ["+# version 2: one line more"]


def _kit_script(study: Any, kit: str, script: str, *args: str) -> str:
    ran = subprocess.run(["bash", str(study.kits[kit] / "startup" / script), *args], capture_output=True,
                         text=True, env=study.env(), timeout=120, check=False)
    assert ran.returncode == 0, ran.stderr
    return ran.stdout


def test_signed_by_accepts_only_listed_signers(make_study, tmp_path):
    handle = make_study(sites=["site-1"])
    study = handle.study
    study.write_local("site-1", "job_policy.yml", {"code": {"signed_by": [LEAD]}})
    study.start_server()
    study.start("site-1")
    _online(study)
    job = handle.job(tmp_path / "job")

    async def submit_unsigned() -> dict[str, Any]:
        async with AdminClient(study.kits[LEAD]) as client:
            return await client.submit_job(job, FAST.replace("--set ", "").split(), sign=False)

    unsigned = asyncio.run(submit_unsigned())
    by_other = study.admin_json(f"submit_job {job} {FAST}", admin=PROJECT_ADMIN)
    by_lead = study.admin_json(f"submit_job {job} {FAST}", admin=LEAD)
    assert (unsigned["code_signed_by"], by_other["code_signed_by"], by_lead["code_signed_by"]) == \
        ("", PROJECT_ADMIN, LEAD)

    assert f"its code ({unsigned['code_sha256'][:16]}...) is not signed; signed_by requires one of: {LEAD}" in \
        _refused(study, unsigned["job_id"])
    assert f"its code is signed by '{PROJECT_ADMIN}', who is not in signed_by ({LEAD})" in \
        _refused(study, by_other["job_id"])
    assert study.admin_json(f"wait_job {by_lead['job_id']} 300")["state"] == "finished"
    shown = study.admin(f"show_job {by_lead['job_id']}", as_json=False).stdout
    assert f"signed by {LEAD}" in shown
    assert {r["job_id"] for r in _events(study, "site-1", "job_refused")} == {unsigned["job_id"], by_other["job_id"]}



def test_a_site_that_declines_a_job_is_left_out_of_its_later_rounds(make_study, tmp_path):
    # site-2's policy refuses the job's code: before, the server tasked it every round to be refused again
    # (a 300-round job: 300 refusals, each audited and logged on the site)
    handle = make_study(sites=["site-1", "site-2"])
    study = handle.study
    study.write_local("site-2", "job_policy.yml", {"code": {"approved_hashes": ["0" * 64]}})
    study.start_server()
    study.start_sites()
    job = handle.job(tmp_path / "job")
    job_id = study.admin_json(f"submit_job {job} --set server.rounds=4 --set meta.min_clients=1")["job_id"]
    assert study.admin_json(f"wait_job {job_id} 300")["state"] == "finished"

    received = [(r["task"], r["round"]) for r in _events(study, "site-2", "task_received") if r["job_id"] == job_id]
    (reported,) = [r for r in _events(study, "site-2", "error_reported") if r["job_id"] == job_id]
    assert reported["declines_job"] is True
    # a prepare (never answered) at most, then the one task it declined, and nothing after
    assert received[-1] == (reported["task"], reported["round"]) and len(received) <= 2, received
    server_audit = [json.loads(line) for line in
                    (study.kits[study.server] / "workspace" / "audit.jsonl").read_text().splitlines()]
    declined = [r for r in server_audit if r["event"] == "site_declined"]
    assert [(r["site"], r["job_id"]) for r in declined] == [("site-2", job_id)]
    assert "approved_hashes" in declined[0]["reason"]
    rounds = {r["round"]: r["sites"] for r in server_audit if r["event"] == "round_done" and r["job_id"] == job_id}
    assert all(sites == ["site-1"] for sites in rounds.values()) and len(rounds) == 4, rounds
    assert "site-2 declines it" in (study.kits[study.server] / "workspace" / "log.txt").read_text()
