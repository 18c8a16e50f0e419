"""Median and trimmed mean against np.median and scipy.stats.trim_mean on the stacked deltas, including a
tensor one site's privacy filter left out, and a receive buffer reused after fold."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import trim_mean

from runtime.aggregators import MedianAggregator, TrimmedMeanAggregator, Update
from runtime.aggregators.config import TrimmedMeanConfig

N_SITES = 5
LEFT_OUT_BY = 2  # this site's privacy filter drops tensor "b"


def _round() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(3)
    model = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32),
             "n": np.array(100, dtype=np.int64)}
    deltas = []
    for i in range(N_SITES):
        delta = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32),
                 "n": np.array(int(rng.integers(1, 20)), dtype=np.int64)}
        if i == 0:
            delta["w"] *= 1000  # one wild site
        if i == LEFT_OUT_BY:
            del delta["b"]
        deltas.append(delta)
    return model, deltas


def _aggregate(agg: MedianAggregator | TrimmedMeanAggregator) -> tuple[dict, dict, list[dict]]:
    model, deltas = _round()
    agg.begin_round(model)
    buffer = {k: np.empty_like(v) for k, v in model.items()}
    for i, delta in enumerate(deltas):
        # the workflow's receive buffer: reused for the next site once fold returns
        view = {k: buffer[k] for k in delta}
        for k, v in delta.items():
            view[k][...] = v
        agg.fold(Update(site=f"site-{i}", delta=view, n_samples=10, weight=float(i)))  # weights are ignored
    return model, agg.close_round(model), deltas


def _stacked(deltas: list[dict], name: str) -> np.ndarray:
    return np.stack([d[name] for d in deltas if name in d])


def test_median_is_the_coordinate_wise_median() -> None:
    model, new, deltas = _aggregate(MedianAggregator())

    np.testing.assert_allclose(new["w"], model["w"] + np.median(_stacked(deltas, "w"), axis=0), rtol=1e-6)
    assert _stacked(deltas, "b").shape[0] == N_SITES - 1  # "b" over the four sites that sent it
    np.testing.assert_allclose(new["b"], model["b"] + np.median(_stacked(deltas, "b"), axis=0), rtol=1e-6)
    assert new["n"] == 100 + int(np.median(_stacked(deltas, "n")))
    assert {k: v.dtype for k, v in new.items()} == {k: v.dtype for k, v in model.items()}
    assert np.abs(new["w"] - model["w"]).max() < 10  # the wild site did not drag the model


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.25, 0.4])
def test_trimmed_mean_is_scipys_trim_mean(fraction: float) -> None:
    model, new, deltas = _aggregate(TrimmedMeanAggregator(TrimmedMeanConfig(trim_fraction=fraction)))

    for name in ("w", "b"):
        expected = model[name] + trim_mean(_stacked(deltas, name), fraction, axis=0).astype(np.float32)
        np.testing.assert_allclose(new[name], expected, rtol=1e-6)
    assert new["n"] == 100 + int(trim_mean(_stacked(deltas, "n"), fraction))


def test_a_tensor_no_site_sent_stays_as_it_is() -> None:
    model = {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}
    agg = MedianAggregator()
    agg.begin_round(model)
    agg.fold(Update(site="s", delta={"a": np.full(2, 0.5, np.float32)}, n_samples=1, weight=1.0))

    new = agg.close_round(model)

    np.testing.assert_array_equal(new["b"], model["b"])
    np.testing.assert_array_equal(new["a"], [1.5, 1.5])
