"""FedOptAggregator (Reddi et al. 2021, Algorithm 2): one step of each optimizer by hand, and two steps
against a per-coordinate scalar reference written from the paper's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.aggregators import FedOptAggregator, Update
from runtime.aggregators.config import FedOptConfig


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


MODEL = {"w": _f32(1.0, -1.0), "n": np.array(10, dtype=np.int64)}
# two sites, equal weight: D = mean delta = [0.1, -0.2]
ROUND_1 = [{"w": _f32(0.2, 0.0), "n": np.array(3, dtype=np.int64)},
           {"w": _f32(0.0, -0.4), "n": np.array(3, dtype=np.int64)}]
# second round: a smaller pseudo-gradient, so yogi's v falls (v > D^2) in coordinate 0
ROUND_2 = [{"w": _f32(0.01, 0.3)}, {"w": _f32(0.01, 0.1)}]


def _run(config: FedOptConfig, rounds: list[list[dict[str, np.ndarray]]]) -> tuple[FedOptAggregator, dict]:
    agg = FedOptAggregator(config)
    model = MODEL
    for deltas in rounds:
        agg.begin_round(model)
        for i, delta in enumerate(deltas):
            agg.fold(Update(site=f"site-{i}", delta=delta, n_samples=10, weight=1.0))
        model = agg.close_round(model)
    return agg, model


def _config(optimizer: str) -> FedOptConfig:
    return FedOptConfig(optimizer=optimizer, server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)


def test_adam_one_step_by_hand() -> None:
    agg, model = _run(_config("adam"), [ROUND_1])
    # coordinate 0: D = 0.1;  m = 0.1*0.1 = 0.01;  v = 0.99*1e-6 + 0.01*0.01 = 1.0099e-4
    #   x = 1 + 0.1 * 0.01 / (sqrt(1.0099e-4) + 1e-3) = 1 + 0.1 * 0.01 / 0.0110493781 = 1.0905028
    # coordinate 1: D = -0.2; m = -0.02;  v = 0.99e-6 + 0.01*0.04 = 4.0099e-4
    #   x = -1 + 0.1 * -0.02 / (0.0200247347 + 1e-3) = -1.0951261
    np.testing.assert_allclose(model["w"], [1.0905028, -1.0951261], rtol=1e-6)
    np.testing.assert_allclose(agg.state()["m"]["w"], [0.01, -0.02], rtol=1e-6)
    np.testing.assert_allclose(agg.state()["v"]["w"], [1.0099e-4, 4.0099e-4], rtol=1e-6)
    assert model["w"].dtype == np.float32
    assert model["n"] == 13 and model["n"].dtype == np.int64  # integer buffer: mean delta, no optimizer


def test_adagrad_one_step_by_hand() -> None:
    _, model = _run(_config("adagrad"), [ROUND_1])
    # v = 1e-6 + D^2 = [0.010001, 0.040001];  x = x + 0.1 * m / (sqrt(v) + 1e-3)
    #   = [1 + 0.001 / 0.1010050, -1 - 0.002 / 0.2010025] = [1.0099005, -1.0099501]
    np.testing.assert_allclose(model["w"], [1.0099005, -1.0099501], rtol=1e-6)


def test_yogi_one_step_by_hand() -> None:
    agg, model = _run(_config("yogi"), [ROUND_1])
    # v0 = 1e-6 < D^2, sign(v0 - D^2) = -1:  v = 1e-6 + 0.01 * D^2 = [1.01e-4, 4.01e-4]
    np.testing.assert_allclose(agg.state()["v"]["w"], [1.01e-4, 4.01e-4], rtol=1e-6)
    np.testing.assert_allclose(model["w"], [1.0904988, -1.0951249], rtol=1e-6)


def test_sgdm_one_step_by_hand() -> None:
    agg, model = _run(_config("sgdm"), [ROUND_1])
    # m = 0.9*0 + D = D;  x = x + 0.1 * D = [1.01, -1.02];  no second moment
    np.testing.assert_allclose(model["w"], [1.01, -1.02], rtol=1e-6)
    assert set(agg.state()) == {"m"}


def _reference(optimizer: str, x: float, pseudo_gradients: list[float], lr: float = 0.1, beta1: float = 0.9,
               beta2: float = 0.99, tau: float = 1e-3) -> float:
    """Algorithm 2 of the paper for one coordinate, in plain Python floats."""
    m, v = 0.0, tau * tau
    for d in pseudo_gradients:
        if optimizer == "sgdm":
            m = beta1 * m + d
            x = x + lr * m
            continue
        m = beta1 * m + (1 - beta1) * d
        if optimizer == "adagrad":
            v = v + d * d
        elif optimizer == "adam":
            v = beta2 * v + (1 - beta2) * d * d
        else:
            v = v - (1 - beta2) * d * d * math.copysign(1.0, v - d * d) * (v != d * d)
        x = x + lr * m / (math.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("optimizer", ["sgdm", "adam", "adagrad", "yogi"])
def test_two_steps_match_the_papers_formulas(optimizer: str) -> None:
    _, model = _run(_config(optimizer), [ROUND_1, ROUND_2])
    # D1 = [0.1, -0.2], D2 = [0.01, 0.2]
    expected = [_reference(optimizer, 1.0, [0.1, 0.01]), _reference(optimizer, -1.0, [-0.2, 0.2])]
    np.testing.assert_allclose(model["w"], expected, rtol=1e-5)


def test_weights_shape_the_pseudo_gradient() -> None:
    agg = FedOptAggregator(_config("sgdm"))
    agg.begin_round(MODEL)
    agg.fold(Update(site="a", delta={"w": _f32(0.4, 0.0)}, n_samples=3, weight=3.0))
    agg.fold(Update(site="b", delta={"w": _f32(0.0, 0.4)}, n_samples=1, weight=1.0))
    model = agg.close_round(MODEL)
    # D = (3*[0.4, 0] + [0, 0.4]) / 4 = [0.3, 0.1]; x = x + 0.1*D
    np.testing.assert_allclose(model["w"], [1.03, -0.99], rtol=1e-6)


def test_a_tensor_no_site_sent_keeps_its_value_and_moments() -> None:
    model = {"a": _f32(0.0), "b": _f32(0.0)}
    agg = FedOptAggregator(_config("adam"))
    agg.begin_round(model)
    agg.fold(Update(site="s", delta={"a": _f32(0.1), "b": _f32(0.1)}, n_samples=1, weight=1.0))
    model = agg.close_round(model)
    before = agg.state()

    agg.begin_round(model)
    agg.fold(Update(site="s", delta={"a": _f32(0.1)}, n_samples=1, weight=1.0))
    after_model = agg.close_round(model)

    np.testing.assert_array_equal(after_model["b"], model["b"])
    np.testing.assert_array_equal(agg.state()["m"]["b"], before["m"]["b"])
    np.testing.assert_array_equal(agg.state()["v"]["b"], before["v"]["b"])
    assert after_model["a"] != model["a"]
