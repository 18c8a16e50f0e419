"""runtime.simulate with the job's client filters (apply_filters=True): what the server folds is what the
job's filters let through, recomputed by hand; without the option the same job folds the raw deltas."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import ConfigError
from runtime.job_spec import load_job_spec
from runtime.simulate import simulate
from tests.runtime.workflows.numpy_learner import gd_step, learners, site_data

SIZES = {"site-a": 30, "site-b": 90}


def _spec(filters: str, rounds: int = 2):
    return load_job_spec({"meta.yml": "name: sim\nmin_clients: 2",
                          "config_fed_client.yml": f"learner: {{path: a:B}}\nfilters: {filters}",
                          "config_fed_server.yml": f"rounds: {rounds}\n"
                                                   "key_metric: {name: mse, higher_is_better: false}"})


def _data() -> list[tuple[np.ndarray, np.ndarray]]:
    return [site_data(i, n, shift=float(i)) for i, n in enumerate(SIZES.values())]


def _weighted(deltas: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    total = sum(SIZES.values())
    return {k: sum(n * d[k] for n, d in zip(SIZES.values(), deltas, strict=True)) / total for k in deltas[0]}


def test_exclude_vars_keeps_a_tensor_out_of_what_the_server_folds(tmp_path: Path) -> None:
    spec = _spec("[{name: exclude_vars, args: {pattern: '^b$'}}]")
    filtered = asyncio.run(simulate(spec, learners(tmp_path / "s1", SIZES), tmp_path / "filtered", apply_filters=True))
    # by hand: the bias never leaves a site, in any task (not in the round-0 model either, as on a real
    # site), so each site keeps training its own; the weights are FedAvg of the sites' w deltas
    w = np.zeros(3, np.float32)
    local_b = [np.zeros(1, np.float32) for _ in SIZES]
    for _ in range(2):
        steps = [gd_step({"w": w, "b": b}, x, y, 0.1) for b, (x, y) in zip(local_b, _data(), strict=True)]
        local_b = [step["b"] for step in steps]
        w = w + _weighted([{"w": step["w"] - w} for step in steps])["w"]
    np.testing.assert_allclose(filtered.global_model["w"], w, rtol=1e-5, atol=1e-6)
    assert "b" not in filtered.global_model  # it never left a site
    [round_0] = [e for e in filtered.metrics if e["type"] == "shared"]  # the model one site built
    # as that site reports it: counted, not named (a round-0 model's names are the job's choice)
    assert [(r["excluded"], r["n_excluded"]) for r in round_0["privacy"].values()] == [([], 1)]

    plain = asyncio.run(simulate(spec, learners(tmp_path / "s2", SIZES), tmp_path / "plain"))
    assert abs(float(plain.global_model["b"][0])) > 1e-3  # the option is what kept it out


def test_gaussian_dp_clips_each_sites_delta_before_the_server_folds_it(tmp_path: Path) -> None:
    clip = 0.01
    spec = _spec(f"[{{name: gaussian_dp, args: {{clip_norm: {clip}, noise_multiplier: 0.0}}}}]", rounds=1)
    result = asyncio.run(simulate(spec, learners(tmp_path / "s", SIZES), tmp_path / "server", apply_filters=True))
    zero = {"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)}
    clipped = []
    for x, y in _data():
        delta = gd_step(zero, x, y, 0.1)
        norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in delta.values())))
        assert norm > clip  # so the clip does something here
        clipped.append({k: v * (clip / norm) for k, v in delta.items()})
    for name, value in _weighted(clipped).items():
        np.testing.assert_allclose(result.global_model[name], value, rtol=1e-5, atol=1e-7)


def test_an_unknown_filter_fails_before_any_round_with_one_line(tmp_path: Path) -> None:
    spec = _spec("[{name: blur, args: {}}]")
    with pytest.raises(ConfigError, match="unknown filter 'blur'"):
        asyncio.run(simulate(spec, learners(tmp_path / "s", SIZES), tmp_path / "server", apply_filters=True))


def test_gaussian_dp_runs_on_every_release_as_on_a_site_and_reports_its_epsilon(tmp_path: Path) -> None:
    # the simulator used to noise train deltas only: the round-0 model left clean and no epsilon was
    # reported, so a simulated DP study looked far better than the same study on real sites
    spec = _spec("[{name: gaussian_dp, args: {clip_norm: 1.0, noise_multiplier: 1.0}}]", rounds=2)
    result = asyncio.run(simulate(spec, learners(tmp_path / "s", SIZES), tmp_path / "server", apply_filters=True))
    [round_0] = [e for e in result.metrics if e["type"] == "shared"]
    [(builder, report)] = round_0["privacy"].items()
    assert report["applied_to"] == "whole_model" and report["dp"]["releases"] == 1
    rounds = [e for e in result.metrics if e["type"] == "round"]
    assert [sorted(e["privacy"]) for e in rounds] == [sorted(SIZES)] * 2
    for site in SIZES:
        releases = [e["privacy"][site]["dp"]["releases"] for e in rounds]
        epsilons = [e["privacy"][site]["dp"]["epsilon_total"] for e in rounds]
        assert releases == ([2, 3] if site == builder else [1, 2])  # the site that built round 0 spent one more
        assert 0 < epsilons[0] < epsilons[1]


@pytest.mark.parametrize("kind", ["init", "submit_model", "train"])
def test_a_simulated_site_encodes_for_the_wire_what_a_real_one_does(tmp_path: Path, kind: str) -> None:
    """A real site encodes its training updates only (its round-0 and cross-site models go in full
    precision); the simulator encoded everything, so with wire_dtype int8 the two ended on other models."""
    from runtime.client.dp_ledger import DpLedger
    from runtime.simulate import _result_payload
    from runtime.tasks import TaskKind
    from runtime.weights import save_file

    out = tmp_path / "out.safetensors"
    save_file({"w": np.linspace(-1, 1, 64, dtype=np.float32)}, out)
    payload, wire, _ = _result_payload(TaskKind(kind), out, tmp_path, None, np.random.default_rng(0),
                                       DpLedger(tmp_path / "dp", "j"), "int8")
    assert (bytes(payload) == out.read_bytes()) == (kind != "train")
    assert bool(wire) == (kind == "train")
