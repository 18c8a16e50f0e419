"""FedAvgAggregator: weighted by n_samples, by the job's site weights and uniformly, and FedAvgM over two
rounds, each against a mean written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.aggregators import FedAvgAggregator, Update, update_weight
from runtime.aggregators.config import FedAvgConfig
from runtime.errors import UpdateRejected


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


MODEL = {"w": _f32(1, 2), "b": _f32(0.5), "n": np.array(10, dtype=np.int64)}
# site A trained on 1 sample, site B on 3
DELTAS = {"A": {"w": _f32(1, 0), "b": _f32(2), "n": np.array(2, dtype=np.int64)},
          "B": {"w": _f32(3, 4), "b": _f32(-2), "n": np.array(2, dtype=np.int64)}}
N_SAMPLES = {"A": 1, "B": 3}


def _one_round(config: FedAvgConfig) -> dict[str, np.ndarray]:
    agg = FedAvgAggregator(config)
    agg.begin_round(MODEL)
    for site, delta in DELTAS.items():
        weight = update_weight(config.weighting, site, N_SAMPLES[site])
        agg.fold(Update(site=site, delta=delta, n_samples=N_SAMPLES[site], weight=weight))
    assert agg.n_folded == 2
    return agg.close_round(MODEL)


def test_weighted_by_n_samples() -> None:
    new = _one_round(FedAvgConfig())
    # w: (1*[1, 0] + 3*[3, 4]) / 4 = [2.5, 3];  b: (1*2 + 3*-2) / 4 = -1;  n: 2
    np.testing.assert_allclose(new["w"], [3.5, 5.0], rtol=1e-6)
    np.testing.assert_allclose(new["b"], [-0.5], rtol=1e-6)
    assert new["n"] == 12 and new["n"].dtype == np.int64
    assert new["w"].dtype == np.float32 and new["b"].dtype == np.float32


def test_weighted_by_the_jobs_site_weights() -> None:
    new = _one_round(FedAvgConfig(weighting={"A": 3.0, "B": 1.0}))
    # w: (3*[1, 0] + 1*[3, 4]) / 4 = [1.5, 1];  b: (3*2 + 1*-2) / 4 = 1
    np.testing.assert_allclose(new["w"], [2.5, 3.0], rtol=1e-6)
    np.testing.assert_allclose(new["b"], [1.5], rtol=1e-6)
    assert new["n"] == 12


def test_uniform_weighting_ignores_n_samples() -> None:
    new = _one_round(FedAvgConfig(weighting="uniform"))
    # w: ([1, 0] + [3, 4]) / 2 = [2, 2];  b: (2 - 2) / 2 = 0
    np.testing.assert_allclose(new["w"], [3.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(new["b"], [0.5], rtol=1e-6)


def test_a_site_missing_from_the_weight_map_is_refused() -> None:
    with pytest.raises(UpdateRejected, match=r"^no weight for site C in aggregator.weighting$"):
        update_weight({"A": 1.0}, "C", 5)


def test_server_momentum_over_two_rounds() -> None:
    # Prepare: FedAvgM, lr 0.5, momentum 0.5, one site; the int buffer takes the plain delta
    agg = FedAvgAggregator(FedAvgConfig(server_lr=0.5, server_momentum=0.5))
    model = {"w": _f32(1.0), "n": np.array(10, dtype=np.int64)}
    # Execute
    for delta_w in (2.0, 4.0):
        agg.begin_round(model)
        agg.fold(Update(site="A", delta={"w": _f32(delta_w), "n": np.array(2, dtype=np.int64)}, n_samples=1,
                        weight=1.0))
        model = agg.close_round(model)
        if delta_w == 2.0:
            # v1 = 2, w1 = 1 + 0.5*2 = 2
            np.testing.assert_allclose(model["w"], [2.0])
    # Assert: v2 = 0.5*2 + 4 = 5, w2 = 2 + 0.5*5 = 4.5; n = 10 + 2 + 2
    np.testing.assert_allclose(model["w"], [4.5])
    np.testing.assert_allclose(agg.state()["velocity"]["w"], [5.0])
    assert model["n"] == 14
    assert "n" not in agg.state()["velocity"]


def test_a_tensor_no_site_sent_keeps_its_value_and_its_velocity() -> None:
    agg = FedAvgAggregator(FedAvgConfig(server_momentum=0.5))
    model = {"a": _f32(0.0), "b": _f32(0.0)}
    agg.begin_round(model)
    agg.fold(Update(site="A", delta={"a": _f32(1.0), "b": _f32(1.0)}, n_samples=1, weight=1.0))
    model = agg.close_round(model)                       # a = b = 1, velocity a = b = 1

    agg.begin_round(model)
    agg.fold(Update(site="A", delta={"a": _f32(1.0)}, n_samples=1, weight=1.0))  # "b" filtered out
    model = agg.close_round(model)

    np.testing.assert_allclose(model["a"], [2.5])        # v = 0.5*1 + 1 = 1.5
    np.testing.assert_allclose(model["b"], [1.0])        # no delta: no momentum step either
    np.testing.assert_allclose(agg.state()["velocity"]["b"], [1.0])


def test_plain_fedavg_keeps_no_state() -> None:
    agg = FedAvgAggregator(FedAvgConfig())
    agg.begin_round(MODEL)
    agg.fold(Update(site="A", delta=DELTAS["A"], n_samples=1, weight=1.0))
    agg.close_round(MODEL)

    assert agg.state() == {}
    assert agg.task_extras() == {} and agg.local_algorithm() is None
