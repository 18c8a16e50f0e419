"""The server's job loop (runtime/server/controller.py) with its workflows and aggregators, driven in
one process by runtime.simulate: no gRPC, every number recomputed by hand here."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from runtime.job_spec import load_job_spec
from runtime.server.controller import RoundFailed
from runtime.simulate import simulate
from runtime.weights import to_bytes
from tests.runtime.workflows.numpy_learner import gd_step, learners, mse, site_data

ZERO = {"w": np.zeros(3, dtype=np.float32), "b": np.zeros(1, dtype=np.float32)}


def _spec(server: str, meta: str = "min_clients: 2"):
    return load_job_spec({"meta.yml": f"name: sim\n{meta}", "config_fed_client.yml": "learner: {path: a:B}",
                          "config_fed_server.yml": server + "\nkey_metric: {name: mse, higher_is_better: false}"})


def _run(spec, sites, folder, **kwargs):
    return asyncio.run(simulate(spec, sites, folder, **kwargs))


def _by_hand_fedavg(sizes: dict[str, int], rounds: int, lr: float = 0.1) -> dict[str, np.ndarray]:
    data = [site_data(i, n, shift=float(i)) for i, n in enumerate(sizes.values())]
    model = {k: v.copy() for k, v in ZERO.items()}
    for _ in range(rounds):
        deltas = [{k: gd_step(model, x, y, lr)[k] - model[k] for k in model} for x, y in data]
        total = sum(sizes.values())
        model = {k: model[k] + sum(n * d[k] for n, d in zip(sizes.values(), deltas, strict=True)) / total
                 for k in model}
    return model


def test_fedavg_rounds_give_the_hand_computed_model_and_track_the_best(tmp_path: Path) -> None:
    sizes = {"site-a": 30, "site-b": 90}
    result = _run(_spec("rounds: 3"), learners(tmp_path / "sites", sizes), tmp_path / "server")
    expected = _by_hand_fedavg(sizes, 3)
    for name, value in expected.items():
        np.testing.assert_allclose(result.global_model[name], value, rtol=1e-5, atol=1e-6)
    assert result.record.rounds_done == 3
    assert result.record.sites == ["site-a", "site-b"]
    # validation of round r scores model r-1, the final validation model 3; mse falls every round here
    assert result.record.best_round == 3
    final = result.record.final_metrics["mse"]
    data = [site_data(i, n, shift=float(i)) for i, n in enumerate(sizes.values())]
    by_hand = sum(n * mse(expected, x, y) for n, (x, y) in zip(sizes.values(), data, strict=True)) / sum(sizes.values())
    assert final == pytest.approx(by_hand, rel=1e-5)
    kinds = [(e["type"], e.get("round", e.get("model_round"))) for e in result.metrics]
    assert ("round", 3) in kinds and kinds.count(("shared", 0)) == 1  # round 0 built by one site, once


def test_a_site_that_cannot_build_round_0_hands_it_to_the_next(tmp_path: Path) -> None:
    sites = learners(tmp_path / "sites", {"site-a": 10, "site-b": 10}, fail={"site-a": "init"})
    sites = dict(reversed(list(sites.items())))  # ... whichever the registry lists first
    result = _run(_spec("rounds: 1"), {"site-a": sites["site-a"], "site-b": sites["site-b"]}, tmp_path / "server")
    assert result.record.rounds_done == 1


def test_a_poisoned_update_is_refused_and_the_round_goes_on_with_the_others(tmp_path: Path) -> None:
    sites = learners(tmp_path / "sites", {"site-a": 10, "site-b": 20, "site-c": 30}, fail={"site-c": "nan"})
    result = _run(_spec("rounds: 1"), sites, tmp_path / "server")
    expected = _by_hand_fedavg({"site-a": 10, "site-b": 20}, 1)
    np.testing.assert_allclose(result.global_model["w"], expected["w"], rtol=1e-5)
    (entry,) = [e for e in result.metrics if e["type"] == "round"]
    assert "NaN" in entry["failed"]["site-c"] or "finite" in entry["failed"]["site-c"]
    # site-c scored model 0 before its training went wrong: that score counts for model 0 as the others' do
    (scored,) = [e for e in result.metrics if e["type"] == "validation" and e["model_round"] == 0]
    assert sorted(scored["sites"]) == ["site-a", "site-b", "site-c"]
    data = [site_data(i, n, shift=float(i)) for i, n in enumerate((10, 20, 30))]
    by_hand = sum(n * mse(ZERO, x, y) for n, (x, y) in zip((10, 20, 30), data, strict=True)) / 60
    assert scored["global"]["mse"] == pytest.approx(by_hand, rel=1e-5)


def test_too_few_answers_fail_the_round_with_each_sites_reason(tmp_path: Path) -> None:
    sites = learners(tmp_path / "sites", {"site-a": 10, "site-b": 20}, fail={"site-b": "nan"})
    with pytest.raises(RoundFailed, match=r"train round 1.*1 of min 2.*site-b: update rejected"):
        _run(_spec("rounds: 2"), sites, tmp_path / "server")
    # show_job's rows for the round that ended the job: who answered, and each other site's reason
    [metrics_file] = (tmp_path / "server").rglob("metrics.jsonl")
    entries = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    [failed] = [e for e in entries if e["type"] == "round_failed"]
    assert (failed["task"], failed["round"], failed["sites"]) == ("train", 1, ["site-a"])
    assert failed["n_samples"] == {"site-a": 10} and set(failed["train"]["site-a"]) == {"mse"}
    assert list(failed["failed"]) == ["site-b"] and "update rejected" in failed["failed"]["site-b"]


@pytest.mark.parametrize("aggregator", ["{name: fedopt, optimizer: adam, server_lr: 0.05}",
                                        "{name: fedavg, server_momentum: 0.9}"])
@pytest.mark.parametrize("crash_after", [1, 4, 5])
def test_a_server_killed_mid_job_resumes_to_the_uninterrupted_model(tmp_path: Path, aggregator: str,
                                                                    crash_after: int) -> None:
    spec = _spec(f"rounds: 4\naggregator: {aggregator}")
    sizes = {"site-a": 30, "site-b": 60}
    straight = _run(spec, learners(tmp_path / "s1", sizes), tmp_path / "straight")
    sites, states = learners(tmp_path / "s2", sizes), {}
    first = _run(spec, sites, tmp_path / "crashed", interrupt_after_results=crash_after, site_states=states)
    assert first.interrupted
    resumed = _run(spec, sites, tmp_path / "crashed", site_states=states)
    for name, value in straight.global_model.items():
        np.testing.assert_allclose(resumed.global_model[name], value, rtol=1e-6, atol=1e-7)
    assert resumed.record.best_round == straight.record.best_round
    rounds = [e["round"] for e in resumed.metrics if e["type"] == "round"]
    assert rounds == [1, 2, 3, 4]  # the round in flight at the crash ran again, recorded once
    # resumed, not restarted: at most the round in flight trained twice
    assert sum(s.train_calls for s in sites.values()) <= 4 * len(sizes) + len(sizes)


def test_evaluate_scores_each_given_model_on_every_site(tmp_path: Path) -> None:
    sizes = {"site-a": 10, "site-b": 20, "site-c": 15}
    model = {"w": np.array([1.0, -1.0, 0.0], np.float32), "b": np.array([0.5], np.float32)}
    spec = _spec("workflows: [evaluate]\nevaluate_models: [m1.safetensors, zero.safetensors]", "min_clients: 3")
    result = _run(spec, learners(tmp_path / "sites", sizes), tmp_path / "server",
                  job_files={"m1.safetensors": to_bytes(model), "zero.safetensors": to_bytes(ZERO)})
    report = result.cross_site
    assert report["models"] == ["m1.safetensors", "zero.safetensors"]
    for i, (site, n) in enumerate(sizes.items()):
        x, y = site_data(i, n, shift=float(i))
        assert report["matrix"]["m1.safetensors"][site]["mse"] == pytest.approx(mse(model, x, y), rel=1e-6)
        assert report["matrix"]["zero.safetensors"][site]["mse"] == pytest.approx(mse(ZERO, x, y), rel=1e-6)
    assert not (result.folder / "models" / "global.safetensors").exists()  # nothing was trained


def test_a_key_metric_no_site_reports_fails_the_job_with_the_names_they_do(tmp_path: Path) -> None:
    # it ran to "finished" with no best model and no word (found by a QA pass); `job check --data` refused it
    from runtime.workflows.fedavg import KeyMetricMissing

    spec = load_job_spec({"meta.yml": "name: sim\nmin_clients: 2", "config_fed_client.yml": "learner: {path: a:B}",
                          "config_fed_server.yml": "rounds: 3\nkey_metric: {name: f1}"})
    with pytest.raises(KeyMetricMissing, match=r"key_metric 'f1' is not among the metrics the sites' validate\(\) "
                                               r"returns \(mse\): set key_metric in config_fed_server.yml"):
        _run(spec, learners(tmp_path / "sites", {"site-a": 10, "site-b": 20}), tmp_path / "server")
