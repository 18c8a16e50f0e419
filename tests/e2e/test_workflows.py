"""The workflows over real processes (server, three sites, admin, mutual TLS on 127.0.0.1): an
evaluation-only study, cross-site validation on label-skewed sites, and a server killed mid-job with a
stateful aggregator (FedOpt/Adam, SCAFFOLD) ending with the same model as an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from provision.demo_data import write_label_skewed_data
from provision.local_study import LocalStudy, wait_until
from runtime.weights import load_file, save_file

from .test_fedavg_study import _load_template_learner, _started

SITES = ["site-1", "site-2", "site-3"]


def _wait_finished(study: LocalStudy, job_id: str, timeout_s: float = 300) -> dict[str, Any]:
    try:
        final = study.admin_json(f"wait_job {job_id} {timeout_s:g}", timeout_s=timeout_s + 30)
    except RuntimeError as e:  # wait_job exits non-zero when the job failed
        final = {"state": "failed", "error": str(e)}
    if final["state"] != "finished":
        pytest.fail(f"job {job_id} {final['state']}: {final.get('error')}\n{study.log_tail(study.server, 3000)}")
    return final


def _audit(study: LocalStudy, name: str) -> list[dict[str, Any]]:
    path = study.kits[name] / "workspace" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _site_scores(weights: dict[str, np.ndarray], site_dir: Path) -> dict[str, float]:
    """The template learner's validate(), run here in the test on one site's data."""
    module = _load_template_learner()
    x_train, _ = module.read_csv(site_dir / "train.csv")
    x_val, y_val = module.read_csv(site_dir / "val.csv")
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    model = module.build_model(x_val.shape[1], weights["0.weight"].shape[0])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    model.eval()
    return module.evaluate(model, torch.from_numpy((x_val - mean) / std), y_val)


def test_evaluate_job_scores_a_given_model_on_every_site(make_study, tmp_path):
    handle = make_study(sites=SITES)
    study = _started(handle.study)
    job = handle.job(tmp_path / "job")
    module = _load_template_learner()
    torch.manual_seed(3)
    model = module.build_model(30, 16)
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    save_file(weights, job / "external.safetensors")

    record = study.admin_json(f"submit_job {job} --set server.workflows=[evaluate] "
                              "--set server.evaluate_models=[external.safetensors] --set meta.min_clients=3")
    _wait_finished(study, record["job_id"])

    results = tmp_path / "results"
    study.admin_json(f"download_job {record['job_id']} {results}")
    report = json.loads((results / record["job_id"] / "cross_site.json").read_text())
    assert report["kind"] == "evaluate" and report["models"] == ["external.safetensors"]
    assert sorted(report["matrix"]["external.safetensors"]) == SITES
    for site in SITES:
        expected = _site_scores(weights, handle.data.site_dirs[site])
        got = report["matrix"]["external.safetensors"][site]
        for metric in ("accuracy", "auc", "loss", "n_samples"):
            assert got[metric] == pytest.approx(expected[metric], rel=1e-5), (site, metric)
    assert (results / record["job_id"] / "cross_site.csv").exists()
    assert (results / record["job_id"] / "cross_site.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing was trained: no site sent weights, and no train task went out
    assert not [r for r in _audit(study, study.server) if r["event"] == "task_sent" and r.get("task") != "validate"
                and r.get("job_id") == record["job_id"]]


def test_global_model_beats_local_models_off_diagonal_on_label_skewed_sites(make_study, tmp_path):
    handle = make_study(sites=SITES)
    # the sites' data rewritten, each mostly one class (10%, 90%, 50% malignant), in the same folders
    write_label_skewed_data(handle.data.heldout_csv.parent, SITES, seed=7, malignant_shares=(0.1, 0.9, 0.5))
    study = _started(handle.study)
    job = handle.job(tmp_path / "job")
    record = study.admin_json(
        f"submit_job {job} --set server.rounds=4 --set server.workflows=[fedavg,cross_site] "
        "--set server.key_metric.name=accuracy --set client.learner.args.epochs=4 --set meta.min_clients=3")
    _wait_finished(study, record["job_id"], 400)

    shown = study.admin_json(f"show_job {record['job_id']}")["cross_site"]
    summary = shown["summary"]
    local_off = [summary[f"site:{s}"]["off_diagonal"] for s in SITES]
    assert summary["global"]["off_diagonal"] > float(np.mean(local_off)), summary
    # each site's submitted model is its best local one by the key metric, as scored on its own data
    entries = [json.loads(line) for line in (study.kits[study.server] / "workspace" / "jobs" / record["job_id"]
                                             / "metrics.jsonl").read_text().splitlines()]
    local_scores = {s: [e["local_validation"][s]["accuracy"] for e in entries if e["type"] == "round"
                        and s in e.get("local_validation", {})] for s in SITES}
    for site in SITES:
        assert summary[f"site:{site}"]["on_diagonal"] == pytest.approx(max(local_scores[site]), rel=1e-6), site


@pytest.mark.parametrize("aggregator", ["{name: fedopt, optimizer: adam, server_lr: 0.02}", "{name: scaffold}"])
def test_server_killed_mid_job_ends_with_the_uninterrupted_model(make_study, tmp_path, aggregator):
    handle = make_study(sites=SITES[:2])
    study = _started(handle.study)
    # short rounds (30 ms where torch is warm), the kill when round 3 goes out: the 17 left outlast many polls
    sets = (f"--set server.rounds=20 --set 'server.aggregator={aggregator}' --set meta.min_clients=2 "
            "--set client.learner.args.epochs=1")

    straight = study.admin_json(f"submit_job {handle.job(tmp_path / 'a')} {sets}")["job_id"]
    _wait_finished(study, straight)
    resumed = study.admin_json(f"submit_job {handle.job(tmp_path / 'b')} {sets}")["job_id"]
    wait_until(lambda: len([r for r in _audit(study, study.server) if r["event"] == "task_sent"
                            and r.get("job_id") == resumed and r.get("task") == "train" and r.get("round") == 3]) == 2,
               180, "round 3 sent to both sites", interval_s=0.02)
    study.kill(study.server)
    assert not [r for r in _audit(study, study.server) if r["event"] == "job_ended" and r.get("job_id") == resumed], \
        "the job ended before the server was killed: nothing was left to resume"
    study.start_server()
    _wait_finished(study, resumed)

    jobs = study.kits[study.server] / "workspace" / "jobs"
    starts = [r["resumed"] for r in _audit(study, study.server) if r["event"] == "job_started"
              and r.get("job_id") == resumed]
    assert starts == [False, True]
    a, b = load_file(jobs / straight / "models" / "global.safetensors"), load_file(jobs / resumed / "models" /
                                                                                  "global.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # and the model did move: the optimizer state, not a no-op, is what was resumed
    initial = load_file(jobs / resumed / "models" / "initial.safetensors")
    assert any(not np.allclose(b[n], initial[n]) for n in b)


