"""What every aggregator promises the workflow: resume from state() gives exactly the uninterrupted run
(through a safetensors checkpoint, as the server keeps it), an empty round is refused, a refused fold
changes nothing, begin_round starts the round's sums afresh, and a round closes once."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import TypeAdapter

from runtime.aggregators import Aggregator, Update, build_aggregator
from runtime.aggregators.config import AggregatorConfig
from runtime.errors import ConfigError, UpdateRejected
from runtime.weights import from_bytes, to_bytes

CONFIGS = {
    "fedavg": {"name": "fedavg"},
    "fedavgm": {"name": "fedavg", "server_lr": 0.7, "server_momentum": 0.9},
    "fedopt-sgdm": {"name": "fedopt", "optimizer": "sgdm", "server_lr": 0.5},
    "fedopt-adam": {"name": "fedopt", "optimizer": "adam", "server_lr": 0.01},
    "fedopt-adagrad": {"name": "fedopt", "optimizer": "adagrad", "server_lr": 0.01},
    "fedopt-yogi": {"name": "fedopt", "optimizer": "yogi", "server_lr": 0.01},
    "scaffold": {"name": "scaffold", "server_lr": 0.8},
    "median": {"name": "median"},
    "trimmed_mean": {"name": "trimmed_mean", "trim_fraction": 0.2},
}


def _build(key: str) -> Aggregator:
    return build_aggregator(TypeAdapter(AggregatorConfig).validate_python(CONFIGS[key]))


def _model() -> dict[str, np.ndarray]:
    return {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.zeros(4, np.float32),
            "n": np.array(0, dtype=np.int64)}


def _updates(round_no: int) -> list[Update]:
    rng = np.random.default_rng(round_no)
    updates = []
    for i in range(4):
        delta = {"w": rng.normal(scale=0.1, size=(3, 4)).astype(np.float32),
                 "b": rng.normal(scale=0.1, size=4).astype(np.float32), "n": np.array(5, dtype=np.int64)}
        if i == 3 and round_no == 2:
            del delta["b"]  # a site's filter drops a tensor in one round
        updates.append(Update(site=f"site-{i}", delta=delta, n_samples=10 + i, weight=float(10 + i),
                              local={"lr_sum": 0.1 * (i + 1)}))
    if round_no == 3:
        updates = updates[:3]  # a site misses a round
    return updates


def _run_rounds(agg: Aggregator, model: dict, rounds: range) -> dict:
    for round_no in rounds:
        agg.begin_round(model)
        for update in _updates(round_no):
            agg.fold(update)
        model = agg.close_round(model)
    return model


def _through_checkpoint(state: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    return {group: from_bytes(to_bytes(tensors)) for group, tensors in state.items()}


@pytest.mark.parametrize("key", CONFIGS)
def test_resume_from_state_continues_exactly(key: str) -> None:
    # Prepare: an uninterrupted run of three rounds
    straight = _build(key)
    expected = _run_rounds(straight, _model(), range(1, 4))
    # Execute: one round, then a "server restart": a new aggregator from the checkpointed state
    first = _build(key)
    model = _run_rounds(first, _model(), range(1, 2))
    resumed = _build(key)
    resumed.load_state(_through_checkpoint(first.state()))
    got = _run_rounds(resumed, model, range(2, 4))
    # Assert: bit-identical
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert got.keys() == expected.keys()
    final_state = _through_checkpoint(resumed.state())
    for group, tensors in _through_checkpoint(straight.state()).items():
        for name, arr in tensors.items():
            np.testing.assert_array_equal(final_state[group][name], arr)
    for name, arr in straight.task_extras().items():
        np.testing.assert_array_equal(resumed.task_extras()[name], arr)


@pytest.mark.parametrize("key", CONFIGS)
def test_a_round_with_nothing_folded_is_refused(key: str) -> None:
    agg = _build(key)
    agg.begin_round(_model())

    with pytest.raises(UpdateRejected, match="^no usable update this round$"):
        agg.close_round(_model())


def _bad_updates() -> list[Update]:
    good = {"w": np.zeros((3, 4), np.float32)}
    return [
        Update(site="x", delta={**good, "zzz": np.zeros(1, np.float32)}, n_samples=1, weight=1.0,
               local={"lr_sum": 1.0}),                                               # unknown tensor, last
        Update(site="x", delta={**good, "b": np.zeros(5, np.float32)}, n_samples=1, weight=1.0,
               local={"lr_sum": 1.0}),                                               # wrong shape
        Update(site="x", delta={**good, "b": np.zeros(4, np.float64)}, n_samples=1, weight=1.0,
               local={"lr_sum": 1.0}),                                               # wrong dtype
        Update(site="x", delta={}, n_samples=1, weight=1.0, local={"lr_sum": 1.0}),  # nothing
    ]


@pytest.mark.parametrize("key", CONFIGS)
def test_a_refused_fold_leaves_the_aggregator_as_it_was(key: str) -> None:
    # Prepare: the same round, once clean, once with refused updates in between
    clean = _build(key)
    expected = _run_rounds(clean, _model(), range(1, 2))
    agg = _build(key)
    agg.begin_round(_model())
    good = _updates(1)
    agg.fold(good[0])
    bad = _bad_updates()
    if key.startswith("fedavg") or key.startswith("fedopt") or key == "scaffold":
        bad.append(Update(site="x", delta=good[1].delta, n_samples=1, weight=-1.0, local={"lr_sum": 1.0}))
    if key == "scaffold":
        bad.append(Update(site="x", delta=good[1].delta, n_samples=1, weight=1.0, local={"lr_sum": 0.0}))
    # Execute
    for update in bad:
        with pytest.raises(UpdateRejected):
            agg.fold(update)
        assert agg.n_folded == 1
    for update in good[1:]:
        agg.fold(update)
    got = agg.close_round(_model())
    # Assert
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.parametrize("key", CONFIGS)
def test_begin_round_starts_the_rounds_sums_afresh(key: str) -> None:
    clean = _build(key)
    expected = _run_rounds(clean, _model(), range(1, 2))
    agg = _build(key)
    agg.begin_round(_model())
    for update in _updates(7):   # a round abandoned before closing
        agg.fold(update)

    got = _run_rounds(agg, _model(), range(1, 2))

    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.parametrize("key", CONFIGS)
def test_a_round_closes_once(key: str) -> None:
    agg = _build(key)
    model = _run_rounds(agg, _model(), range(1, 2))

    with pytest.raises(RuntimeError, match="begin_round"):
        agg.close_round(model)
    with pytest.raises(RuntimeError, match="begin_round"):
        agg.fold(_updates(2)[0])


@pytest.mark.parametrize("key", ["fedavgm", "fedopt-adam", "scaffold"])
def test_a_state_from_another_model_is_refused(key: str) -> None:
    agg = _build(key)
    _run_rounds(agg, _model(), range(1, 2))
    other = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(4, np.float32), "n": np.array(0, np.int64)}
    resumed = _build(key)
    resumed.load_state(agg.state())

    with pytest.raises(ConfigError, match="tensor 'w' has shape \\[3, 4\\]"):
        resumed.begin_round(other)


def test_a_state_from_another_aggregator_is_refused() -> None:
    scaffold = _build("scaffold")
    _run_rounds(scaffold, _model(), range(1, 2))

    with pytest.raises(ConfigError, match="groups \\['c', 'sites'\\] this aggregator does not keep"):
        _build("fedopt-adam").load_state(scaffold.state())
