"""The global validation figures: each site's metrics weighted by its validation count (`n_samples`)."""

from __future__ import annotations

import pytest

from runtime.workflows import weighted_metrics


def test_sites_weigh_by_their_validation_count() -> None:
    got = weighted_metrics({"a": {"auc": 0.9, "n_samples": 30}, "b": {"auc": 0.6, "n_samples": 10}, "c": {"auc": 0.3}})
    assert got == pytest.approx({"auc": (0.9 * 30 + 0.6 * 10 + 0.3) / 41})


@pytest.mark.parametrize("count", [-40.0, float("inf"), 1e308])
def test_a_count_that_is_no_count_weighs_nothing(count: float) -> None:
    # refused where it arrives (worker_replies, metrics_check); a negative weight made an accuracy of 1.77
    got = weighted_metrics({"a": {"acc": 0.8, "n_samples": 100}, "b": {"acc": 0.1, "n_samples": count}})
    assert got == {"acc": 0.8}
