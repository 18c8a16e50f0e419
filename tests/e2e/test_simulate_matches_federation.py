"""A job that passes in the simulator runs unchanged on the federation: the template job (fixed seed, 2 sites,
2 rounds) through `fedkit simulate` and through a real study (kits, TLS, site daemons, sandboxed workers) on
the same data gives the same final global model and the same per-round metrics, up to float rounding (the
server folds updates in arrival order, which differs between runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from provision.cli import app
from runtime.weights import load_file

SITES = ["site-1", "site-2"]
SETTINGS = ["--set", "server.rounds=2", "--set", "meta.min_clients=2", "--set", "client.learner.args.seed=7"]


def _per_round(job_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train metrics per round and site, global validation per model round) from a job's metrics.jsonl."""
    entries = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    train = {e["round"]: e["train"] for e in entries if e["type"] == "round"}
    validation = {e["model_round"]: e["global"] for e in entries if e["type"] == "validation"}
    return train, validation


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_close(a[key], b[key])
        else:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_simulator_and_federation_give_the_same_model(make_study, tmp_path: Path) -> None:
    handle = make_study(sites=SITES)
    study = handle.study
    study.start_server()
    study.start_sites(SITES)
    job = handle.job(tmp_path / "job")
    record = study.admin_json(f"submit_job {job} {' '.join(SETTINGS)}")
    assert study.admin_json(f"wait_job {record['job_id']} 240")["state"] == "finished"
    study.admin_json(f"download_job {record['job_id']} {tmp_path / 'real'}")
    real = tmp_path / "real" / record["job_id"]

    data_roots = [arg for site in SITES for arg in ("--data-roots", str(handle.data.site_dirs[site]))]
    result = CliRunner().invoke(app, ["simulate", str(job), *data_roots, *SETTINGS, "--out", str(tmp_path / "sim"),
                                      "--processes", "2"])
    assert result.exit_code == 0, result.output
    simulated = tmp_path / "sim" / "simulated"

    real_model, sim_model = (load_file(d / "models" / "global.safetensors") for d in (real, simulated))
    initial = load_file(real / "models" / "initial.safetensors")
    assert real_model.keys() == sim_model.keys()
    for name in real_model:
        np.testing.assert_allclose(sim_model[name], real_model[name], rtol=1e-4, atol=1e-5)
    assert any(not np.allclose(real_model[n], initial[n]) for n in real_model), "training moved the model"

    real_train, real_validation = _per_round(real)
    sim_train, sim_validation = _per_round(simulated)
    assert sorted(real_train) == [1, 2] and sorted(real_validation) == [0, 1, 2]
    _assert_close(sim_train, real_train)
    _assert_close(sim_validation, real_validation)
