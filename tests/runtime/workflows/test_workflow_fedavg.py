"""runtime/workflows/fedavg.py: folding checked results and closing a round.

(Named test_workflow_fedavg.py, not test_fedavg.py, so it does not collide with
tests/runtime/aggregators/test_fedavg.py without __init__.py files.)
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import UpdateRejected
from runtime.job_spec import AggregatorConfig, ServerJobConfig
from runtime.workflows import FedAvg, SiteResult, weighted_metrics


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def _workflow(server_lr: float = 1.0, server_momentum: float = 0.0, max_n_samples: int = 1000) -> FedAvg:
    config = ServerJobConfig(rounds=3, max_n_samples=max_n_samples,
                             aggregator=AggregatorConfig(server_lr=server_lr, server_momentum=server_momentum))
    return FedAvg(config, {"w": _f32(1, 2), "b": _f32(0)})


def _result(site: str, n_samples: int, w: np.ndarray | None = None, b: np.ndarray | None = None) -> SiteResult:
    delta = None if w is None else {"w": w} | ({"b": b} if b is not None else {})
    return SiteResult(site=site, n_samples=n_samples, delta=delta)


def test_close_round_applies_the_weighted_mean_delta() -> None:
    # Prepare
    fedavg = _workflow()
    fedavg.begin_round()
    # Execute
    fedavg.fold_result(_result("site-1", 1, _f32(1, 0), _f32(2)))
    fedavg.fold_result(_result("site-2", 3, _f32(0, 4), _f32(-2)))
    model = fedavg.close_round()
    # Assert: mean delta w = (1*[1, 0] + 3*[0, 4]) / 4 = [0.25, 3]; b = (2 - 6) / 4 = -1
    np.testing.assert_allclose(model["w"], [1.25, 5.0], rtol=1e-6)
    np.testing.assert_allclose(model["b"], [-1.0], rtol=1e-6)
    assert model["w"].dtype == np.float32
    assert fedavg.model is model


def test_begin_round_starts_a_fresh_sum() -> None:
    fedavg = _workflow()
    fedavg.begin_round()
    fedavg.fold_result(_result("site-1", 1, _f32(1, 1)))
    fedavg.close_round()

    fedavg.begin_round()
    fedavg.fold_result(_result("site-1", 1, _f32(0, -1)))
    model = fedavg.close_round()

    np.testing.assert_allclose(model["w"], [2.0, 2.0], rtol=1e-6)
    assert fedavg.n_folded == 1


def test_server_momentum_carries_over_rounds() -> None:
    # Prepare: FedAvgM, lr=1, momentum=0.5
    fedavg = _workflow(server_momentum=0.5)
    # Execute: each round one site sends w delta [1, 1]
    for _ in range(2):
        fedavg.begin_round()
        fedavg.fold_result(_result("site-1", 10, _f32(1, 1)))
        model = fedavg.close_round()
    # Assert: v1 = 1 -> w = [2, 3]; v2 = 0.5 + 1 = 1.5 -> w = [3.5, 4.5]
    np.testing.assert_allclose(model["w"], [3.5, 4.5], rtol=1e-6)


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        (_result("s", 0, _f32(1, 1)), "n_samples must be positive"),
        (_result("s", -5, _f32(1, 1)), "n_samples must be positive"),
        (_result("s", 1001, _f32(1, 1)), "exceeds the job's max_n_samples 1000"),
        (_result("s", 1), "carries no weights"),
        (_result("s", 1, _f32(1, np.nan)), "'w' holds NaN or Inf"),
        (_result("s", 1, _f32(1, 2, 3)), "'w' has shape"),
        (SiteResult("s", 1, delta={"w": np.array([1, 1], dtype=np.float64)}), "'w' has dtype"),
        (SiteResult("s", 1, delta={"extra": _f32(1)}), "unknown tensor 'extra'"),
    ],
    ids=["zero", "negative", "too-many", "no-delta", "nan", "shape", "dtype", "unknown"],
)
def test_fold_result_rejects_a_bad_result_and_leaves_the_round_untouched(result: SiteResult, reason: str) -> None:
    # Prepare: one good result already folded
    fedavg = _workflow()
    fedavg.begin_round()
    fedavg.fold_result(_result("good", 2, _f32(2, 2)))
    # Execute
    with pytest.raises(UpdateRejected, match=reason):
        fedavg.fold_result(result)
    model = fedavg.close_round()
    # Assert: only the good result counts
    assert fedavg.n_folded == 1
    np.testing.assert_allclose(model["w"], [3.0, 4.0], rtol=1e-6)


def test_max_n_samples_itself_is_accepted() -> None:
    fedavg = _workflow(max_n_samples=1000)
    fedavg.begin_round()

    fedavg.fold_result(_result("s", 1000, _f32(1, 1)))

    assert fedavg.n_folded == 1


def test_select_sites_keeps_the_wanted_alive_sites() -> None:
    fedavg = _workflow()

    assert fedavg.select_sites(["a", "b", "c"], "all") == ["a", "b", "c"]
    assert fedavg.select_sites(["a", "b", "c"], ["c", "a", "dead"]) == ["a", "c"]


def test_weighted_metrics_weight_by_n_samples() -> None:
    by_site = {
        "site-1": {"accuracy": 0.5, "loss": 2.0, "n_samples": 1},
        "site-2": {"accuracy": 1.0, "loss": 1.0, "n_samples": 3},
    }

    metrics = weighted_metrics(by_site)

    assert metrics == pytest.approx({"accuracy": 0.875, "loss": 1.25})


def test_weighted_metrics_weight_one_without_n_samples_and_skip_non_finite_values() -> None:
    by_site = {
        "site-1": {"auc": 0.6},
        "site-2": {"auc": 0.8, "f1": float("nan")},
        "site-3": {"auc": 1.0, "f1": 0.5},
    }

    metrics = weighted_metrics(by_site)

    assert metrics == pytest.approx({"auc": 0.8, "f1": 0.5})
