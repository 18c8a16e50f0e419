"""`fedkit simulate`: the template job on virtual sites, in a pool of worker processes and in one process,
with download_job's results layout; bad input gets one line and exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from provision.cli import app
from runtime.weights import load_file
from tests.runtime.server.test_job_intake import CUSTOM_AGGREGATOR  # a job's own aggregator

from ..conftest import JOB_TEMPLATE

SITES = 4


def _simulate(out: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["simulate", str(JOB_TEMPLATE), "--out", str(out), *args])
    return result.exit_code, result.output


def test_pool_and_in_process_give_the_same_study(tmp_path: Path) -> None:
    common = ["--sites", str(SITES), "--demo-data", "--set", "server.rounds=2", "--set", "client.learner.args.epochs=1"]
    code, output = _simulate(tmp_path / "pool", *common, "--processes", "2")
    assert code == 0, output
    assert "2 worker processes" in output and "finished" in output
    job = tmp_path / "pool" / "simulated"
    for name in ("models/global.safetensors", "models/initial.safetensors", "models/best.safetensors",
                 "metrics.jsonl", "record.json"):
        assert (job / name).is_file(), name
    record = json.loads((job / "record.json").read_text())
    assert record["state"] == "finished" and record["rounds_done"] == 2
    assert record["sites"] == [f"site-{i + 1}" for i in range(SITES)]
    rounds = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    rounds = [e for e in rounds if e["type"] == "round"]
    assert [len(e["sites"]) for e in rounds] == [SITES, SITES] and not any(e["failed"] for e in rounds)
    # sites 1 and 4 share the first demo split (cycled beyond three): the same data, the same update size
    assert rounds[0]["n_samples"]["site-1"] == rounds[0]["n_samples"]["site-4"]
    for line in ("model 2", "loss="):  # the per-round table was printed
        assert line in output

    code, output = _simulate(tmp_path / "inproc", *common, "--processes", "0")
    assert code == 0, output
    assert "in this process" in output
    pooled, inproc = (load_file(tmp_path / d / "simulated" / "models" / "global.safetensors")
                      for d in ("pool", "inproc"))
    assert pooled.keys() == inproc.keys()
    for name in pooled:  # the fold order differs between runs: equal up to float rounding, not bit for bit
        np.testing.assert_allclose(pooled[name], inproc[name], rtol=1e-5, atol=1e-6)


def test_bad_input_gets_one_line(tmp_path: Path) -> None:
    code, output = _simulate(tmp_path / "a", "--sites", "1", "--demo-data")
    assert code == 2 and "min_clients: 2 but only 1 virtual sites" in output and len(output.splitlines()) == 1
    assert not (tmp_path / "a").exists(), "bad input left its --out folder (with the demo data) behind"
    code, output = _simulate(tmp_path / "b", "--demo-data")
    assert code == 2 and "no sites: give --data-roots" in output
    code, output = _simulate(tmp_path / "c", "--data-roots", str(tmp_path / "nowhere"))
    assert code == 2 and "is not a folder" in output
    roots = [tmp_path / f"root-{i}" for i in range(3)]
    for root in roots:
        root.mkdir()
    code, output = _simulate(tmp_path / "c2", "--sites", "2", *[a for r in roots for a in ("--data-roots", str(r))])
    assert code == 2 and "the last 1 would be left out" in output  # the third folder was ignored silently
    code, output = _simulate(tmp_path / "d", "--sites", "2", "--demo-data", "--set", "server.rounds=0")
    assert code == 2 and "config_fed_server.yml" in output and len(output.splitlines()) == 1
    # every problem at once, each with its fix, in the words submit_job and `fedkit job check` use
    code, output = _simulate(tmp_path / "e", "--sites", "2", "--demo-data", "--set", "server.roundz=1",
                             "--set", "meta.min_clients=0")
    assert code == 2 and len(output.splitlines()) == 1, output
    # each named with the --set that made it (the files themselves are fine)
    assert "config_fed_server.yml (--set server.roundz=1): roundz: unknown key; did you mean 'rounds'?" in output
    assert "meta.yml (--set meta.min_clients=0): min_clients: Input should be greater than or equal to 1" in output


def test_a_learner_that_does_not_load_is_named_in_one_line(tmp_path: Path) -> None:
    job = tmp_path / "job"
    shutil.copytree(JOB_TEMPLATE, job)
    (job / "custom" / "learner.py").write_text("class TabularLearner:\n    def __init__(self, *a, **k):\n"
                                               "        raise RuntimeError('no GPU here')\n")
    for processes in ("1", "0"):
        result = CliRunner().invoke(app, ["simulate", str(job), "--sites", "2", "--out", str(tmp_path / processes),
                                          "--processes", processes])
        assert result.exit_code == 2, result.output
        last = result.output.splitlines()[-1]
        assert "site 'site-1': the job's learner did not load (RuntimeError: no GPU here)" in last


def test_the_record_keeps_the_overrides_and_hash_and_a_failure_says_failed(tmp_path: Path) -> None:
    """record.json is the layout download_job gives: the --set lines and the config hash a server gives the
    same settings, and a simulation that fails ends 'failed' with its error (it stayed 'running')."""
    from runtime.job_spec import load_job_folder, sha256_hex, spec_to_json

    sets = ["server.rounds=1", "client.learner.args.epochs=1"]
    code, output = _simulate(tmp_path / "ok", "--sites", "2", "--demo-data", "--processes", "0",
                             *[a for s in sets for a in ("--set", s)])
    assert code == 0, output
    record = json.loads((tmp_path / "ok" / "simulated" / "record.json").read_text())
    assert record["overrides"] == sets
    assert record["config_hash"] == sha256_hex(spec_to_json(load_job_folder(JOB_TEMPLATE, sets)).encode())[:16]

    code, output = _simulate(tmp_path / "bad", "--sites", "2", "--demo-data", "--processes", "0",
                             "--set", "server.rounds=1", "--set", "client.learner.args.batch_size=0")
    assert code != 0
    record = json.loads((tmp_path / "bad" / "simulated" / "record.json").read_text())
    assert record["state"] == "failed" and record["error"] and record["finished_at"]


def test_a_custom_aggregator_runs_in_a_simulation(tmp_path: Path) -> None:
    """The person's own aggregator on their own machine: refused before ('this server does not run job code')."""
    job = tmp_path / "job"
    shutil.copytree(JOB_TEMPLATE, job)
    (job / "custom" / "half_step.py").write_text(CUSTOM_AGGREGATOR)
    result = CliRunner().invoke(app, [
        "simulate", str(job), "--out", str(tmp_path / "out"), "--sites", "2", "--demo-data", "--processes", "0",
        "--set", "server.rounds=1", "--set", "client.learner.args.epochs=1",
        "--set", "server.aggregator={name: custom, path: 'half_step:HalfStep', args: {factor: 0.5}}"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "simulated" / "record.json").read_text())
    assert record["state"] == "finished" and record["rounds_done"] == 1


def test_an_evaluate_only_study_shows_each_models_score_over_the_sites(tmp_path: Path) -> None:
    """External validation on virtual sites: the table has a row per scored model with its mean over the
    sites weighted by their validation size (it printed an empty table, 'rounds 0/5, final -'), and the
    summary names the cross-site report the study wrote."""
    code, output = _simulate(tmp_path / "trained", "--sites", "3", "--demo-data", "--processes", "0",
                             "--set", "server.rounds=1", "--set", "client.learner.args.epochs=1")
    assert code == 0, output
    job = tmp_path / "job"
    shutil.copytree(JOB_TEMPLATE, job)
    shutil.copy(tmp_path / "trained" / "simulated" / "models" / "global.safetensors", job / "model.safetensors")
    result = CliRunner().invoke(app, [
        "simulate", str(job), "--out", str(tmp_path / "eval"), "--sites", "3", "--demo-data", "--processes", "0",
        "--set", "server.workflows=[evaluate]", "--set", "server.initial_model=model.safetensors"],
        env={"COLUMNS": "200"})  # rich's width where stdout is no terminal: one table row per line
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "simulated" / "cross_site.json").read_text())
    by_site = report["matrix"]["model.safetensors"]
    assert len(by_site) == 3
    weight = sum(m["n_samples"] for m in by_site.values())
    auc = sum(m["auc"] * m["n_samples"] for m in by_site.values()) / weight
    row = next(line for line in result.output.splitlines() if "scored model.safetensors" in line)
    assert f"auc={auc:.4f}" in row and "│ 3 " in row
    assert "3 virtual sites: evaluate" in result.output and "rounds" not in result.output.split("\n")[1]
    assert "no training (workflows: evaluate)" in result.output
    assert "(cross_site.json, cross_site.csv, cross_site.png, metrics.jsonl, record.json)" in result.output
