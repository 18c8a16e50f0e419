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
    # by hand: the bias never leaves a site, so the global bias stays at round 0's and each round trains
    # from it; the weights are FedAvg of the sites' w deltas
    model = {"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)}
    for _ in range(2):
        deltas = [{"w": gd_step(model, x, y, 0.1)["w"] - model["w"]} for x, y in _data()]
        model = {"w": model["w"] + _weighted(deltas)["w"], "b": model["b"]}
    np.testing.assert_allclose(filtered.global_model["w"], model["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(filtered.global_model.get("b", np.zeros(1, np.float32)), [0.0])

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
