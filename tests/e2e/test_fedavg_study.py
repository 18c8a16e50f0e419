"""A real study over loopback with mutual TLS: server, three sites and an admin, each started from its
own unzipped kit. Checks that FedAvg does what it claims on the updates the sites actually sent."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from runtime.weights import load_file

from ..conftest import JOB_TEMPLATE


def _load_template_learner():
    spec = importlib.util.spec_from_file_location("tabular_learner", JOB_TEMPLATE / "custom" / "learner.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tabular_learner"] = module
    spec.loader.exec_module(module)
    return module


def _heldout_metrics(weights: dict[str, np.ndarray], heldout_csv: Path) -> dict[str, float]:
    learner = _load_template_learner()
    x, y = learner.read_csv(heldout_csv)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)  # a new site standardizes with its own statistics
    model = learner.build_model(x.shape[1], weights["0.weight"].shape[0])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    model.eval()
    return learner.evaluate(model, torch.from_numpy(x), y)


def _started(study):
    """Start the server and every site from their kits; return once all sites are online."""
    study.start_server()
    study.start_sites()
    return study


def test_fedavg_three_sites_three_rounds(make_study, tmp_path):
    handle = make_study()
    study = _started(handle.study)

    job = handle.job(tmp_path / "job")
    record = study.admin_json(f"submit_job {job} --set server.rounds=3 --set client.keep_updates=true "
                              "--set meta.min_clients=3")
    final = study.admin_json(f"wait_job {record['job_id']} 240")
    assert final["state"] == "finished"
    assert final["rounds_done"] == 3
    assert final["sites"] == sorted(study.clients), "the job record names the sites that took part"

    results = tmp_path / "results"
    study.admin_json(f"download_job {record['job_id']} {results}")
    models = results / record["job_id"] / "models"
    global_model = load_file(models / "global.safetensors")
    initial_model = load_file(models / "initial.safetensors")
    assert (models / "best.safetensors").exists()

    # Independently recompute round 3 from what each site kept: the global it received and the update
    # it sent, weighted by the n_samples it declared.
    received, deltas, weights = None, [], []
    for site in study.clients:
        round_dir = study.kits[site] / "workspace" / "jobs" / record["job_id"] / "inbox" / "round_0003_train"
        site_received = load_file(round_dir / "global_in.safetensors")
        if received is None:
            received = site_received
        for name in received:
            np.testing.assert_array_equal(site_received[name], received[name])
        deltas.append(load_file(round_dir / "update_sent.safetensors"))
        weights.append(json.loads((round_dir / "update_sent.json").read_text())["n_samples"])
    assert len(set(weights)) > 1, "sites should differ in size so the weighting matters"
    differs_from_unweighted = False
    for name, base in received.items():
        expected = base.astype(np.float64) + sum(w * d[name].astype(np.float64)
                                                 for w, d in zip(weights, deltas, strict=True)) / sum(weights)
        np.testing.assert_allclose(global_model[name], expected, rtol=1e-5, atol=1e-6)
        unweighted = base + sum(d[name] for d in deltas) / len(deltas)
        differs_from_unweighted |= not np.allclose(global_model[name], unweighted, rtol=1e-5, atol=1e-6)
    assert differs_from_unweighted, "the aggregate must depend on n_samples, not be a plain mean"

    before = _heldout_metrics(initial_model, handle.data.heldout_csv)
    after = _heldout_metrics(global_model, handle.data.heldout_csv)
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > before["accuracy"]

    shown = study.admin_json(f"show_job {record['job_id']}")
    validations = [m for m in shown["metrics"] if m["type"] == "validation"]
    assert [m["model_round"] for m in validations] == [0, 1, 2, 3]
    assert sum(m["is_best"] for m in validations) >= 1

    # while one site built the initial model, the others prepared the job (fetched it, started its worker):
    # every site started one worker for the whole job, and only the builder was not told to prepare
    audits = {site: [json.loads(line) for line in (study.kits[site] / "workspace" / "audit.jsonl").read_text()
                     .splitlines()] for site in study.clients}
    tasks = {site: [r["task"] for r in records if r["event"] == "task_received"] for site, records in audits.items()}
    (builder,) = [site for site, names in tasks.items() if "init" in names]
    assert all(("prepare" in names) == (site != builder) for site, names in tasks.items()), tasks
    assert all(sum(r["event"] == "worker_started" for r in records) == 1 for records in audits.values())

    # each site's log says where its training rounds spent their time, for site IT looking at a slow round
    for site in study.clients:
        log = study.log_tail(site, 1 << 20).splitlines()
        lines = [line for line in log if "train round 3: result accepted" in line]
        assert len(lines) == 1, site
        assert re.search(r"; download [\d.]+ s, worker [\d.]+ s, privacy [\d.]+ s, upload slot [\d.]+ s, "
                         r"upload [\d.]+ s$", lines[0]), lines[0]


def test_cross_site_validation_matrix(make_study, tmp_path):
    handle = make_study()
    study = _started(handle.study)
    job = handle.job(tmp_path / "job")
    record = study.admin_json(f"submit_job {job} --set server.rounds=2 --set server.workflows=[fedavg,cross_site] "
                              "--set meta.min_clients=3")
    assert study.admin_json(f"wait_job {record['job_id']} 240")["state"] == "finished"

    results = tmp_path / "results"
    study.admin_json(f"download_job {record['job_id']} {results}")
    cross = json.loads((results / record["job_id"] / "cross_site.json").read_text())

    sites = sorted(study.clients)
    assert cross["sites"] == sites
    assert cross["models"][:1] == ["global"]
    assert {m for m in cross["models"] if m.startswith("site:")} == {f"site:{s}" for s in sites}
    for model in cross["models"]:
        assert sorted(cross["matrix"][model]) == sites  # every model scored on every site's data
        for metrics in cross["matrix"][model].values():
            assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n_samples"] > 0
    # a site's own model differs from the global one, so its scores do too somewhere off the diagonal
    assert any(cross["matrix"][f"site:{s}"] != cross["matrix"]["global"] for s in sites)
    # show_job carries the key metric of the same matrix, and prints it with the per-model means
    shown = study.admin_json(f"show_job {record['job_id']}")["cross_site"]
    key = cross["key_metric"]  # the job's key metric (auc in the template)
    assert shown["scores"] == {m: {s: cell[key] for s, cell in row.items()} for m, row in cross["matrix"].items()}
    printed = study.admin(f"show_job {record['job_id']}", as_json=False).stdout
    assert f"{key} of each model (rows) on each site's data" in printed and "other sites (mean)" in printed
