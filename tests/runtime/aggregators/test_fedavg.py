"""runtime/aggregators/fedavg.py: the streaming fold equals a hand-computed weighted mean."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.aggregators import FedAvgAggregator, Update, WeightedSum, apply_server_step, fold, start_sum, weighted_mean
from runtime.aggregators.config import FedAvgConfig
from runtime.aggregators.fedavg import server_step


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_unequal_n_samples_give_the_weighted_mean() -> None:
    # Prepare
    model = {"w": _f32(0, 0)}
    acc = start_sum(model)
    # Execute
    fold(acc, {"w": _f32(1, 2)}, 1.0)
    fold(acc, {"w": _f32(4, 8)}, 3.0)
    mean = weighted_mean(acc, model)
    # Assert: (1*[1, 2] + 3*[4, 8]) / 4 = [3.25, 6.5]
    np.testing.assert_allclose(mean["w"], [3.25, 6.5], rtol=1e-6)
    assert acc.n_updates == 2


def test_a_single_site_mean_is_its_own_delta() -> None:
    model = {"w": _f32(5, 5, 5)}
    acc = start_sum(model)

    fold(acc, {"w": _f32(0.1, -0.2, 0.3)}, 7.0)
    mean = weighted_mean(acc, model)

    np.testing.assert_allclose(mean["w"], [0.1, -0.2, 0.3], rtol=1e-6)


def test_a_zero_weight_site_is_counted_but_changes_nothing() -> None:
    model = {"w": _f32(0, 0)}
    acc = start_sum(model)

    fold(acc, {"w": _f32(2, 4)}, 2.0)
    fold(acc, {"w": _f32(100, 100)}, 0.0)
    mean = weighted_mean(acc, model)

    np.testing.assert_allclose(mean["w"], [2, 4], rtol=1e-6)
    assert acc.n_updates == 2


def test_only_zero_weights_give_a_zero_delta() -> None:
    model = {"w": _f32(1, 1)}
    acc = start_sum(model)

    fold(acc, {"w": _f32(3, 3)}, 0.0)
    mean = weighted_mean(acc, model)

    np.testing.assert_array_equal(mean["w"], [0, 0])
    assert np.all(np.isfinite(mean["w"]))


def test_a_site_that_omits_a_tensor_does_not_dilute_it() -> None:
    # Prepare: site 1 sends both tensors (n=1); site 2 sends only "a" (n=3)
    model = {"a": _f32(0, 0), "b": _f32(0, 0)}
    acc = start_sum(model)
    # Execute
    fold(acc, {"a": _f32(4, 4), "b": _f32(2, -2)}, 1.0)
    fold(acc, {"a": _f32(0, 8)}, 3.0)
    mean = weighted_mean(acc, model)
    # Assert: "a" is averaged over both sites, "b" over the one site that sent it
    np.testing.assert_allclose(mean["a"], [1.0, 7.0], rtol=1e-6)
    np.testing.assert_allclose(mean["b"], [2.0, -2.0], rtol=1e-6)


def test_a_tensor_no_site_sent_gets_a_zero_delta() -> None:
    model = {"a": _f32(1), "b": _f32(9, 9)}
    acc = start_sum(model)

    fold(acc, {"a": _f32(2)}, 1.0)
    mean = weighted_mean(acc, model)

    np.testing.assert_array_equal(mean["b"], [0, 0])


def test_negative_weight_is_refused_and_leaves_the_sum_alone() -> None:
    model = {"w": _f32(0)}
    acc = start_sum(model)

    with pytest.raises(ValueError, match="weight"):
        fold(acc, {"w": _f32(1)}, -1.0)

    assert acc.n_updates == 0
    assert acc.totals["w"] == 0.0


def test_float32_in_gives_float32_out() -> None:
    model = {"w": _f32(1, 2)}
    acc = start_sum(model)
    fold(acc, {"w": _f32(0.5, 0.5)}, 3.0)

    mean = weighted_mean(acc, model)
    plain, _ = apply_server_step(model, mean)
    scaled, _ = apply_server_step(model, mean, lr=0.5)
    with_momentum, velocity = apply_server_step(model, mean, lr=0.5, momentum=0.9)

    assert mean["w"].dtype == np.float32
    assert plain["w"].dtype == np.float32
    assert scaled["w"].dtype == np.float32
    assert with_momentum["w"].dtype == np.float32
    assert velocity is not None and velocity["w"].dtype == np.float32


def test_plain_fedavg_adds_the_mean_delta() -> None:
    model = {"w": _f32(1, 2)}

    new_model, velocity = apply_server_step(model, {"w": _f32(0.5, -1)})

    np.testing.assert_allclose(new_model["w"], [1.5, 1.0], rtol=1e-6)
    assert velocity is None


def test_server_momentum_over_two_rounds_matches_hand_computation() -> None:
    # Prepare: FedAvgM with lr=0.5, momentum=0.5, starting at w0 = 1
    model = {"w": np.array([1.0])}
    lr, momentum = 0.5, 0.5
    # Execute
    model, velocity = apply_server_step(model, {"w": np.array([2.0])}, lr, momentum, None)
    after_round_1 = model["w"].copy()
    model, velocity = apply_server_step(model, {"w": np.array([4.0])}, lr, momentum, velocity)
    # Assert: v1 = 2, w1 = 1 + 0.5*2 = 2; v2 = 0.5*2 + 4 = 5, w2 = 2 + 0.5*5 = 4.5
    np.testing.assert_allclose(after_round_1, [2.0])
    np.testing.assert_allclose(velocity["w"], [5.0])
    np.testing.assert_allclose(model["w"], [4.5])


def test_server_step_does_not_mutate_the_old_model() -> None:
    model = {"w": _f32(1, 1)}

    apply_server_step(model, {"w": _f32(1, 1)})
    apply_server_step(model, {"w": _f32(1, 1)}, lr=0.5, momentum=0.5)

    np.testing.assert_array_equal(model["w"], [1, 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lr", [1.0, 0.7])
def test_a_step_written_over_the_sum_gives_the_same_bits_in_the_sum_memory(dtype, lr) -> None:
    """Closing a round in place (the server's memory: old model + sum, no third copy) changes no bit of
    the new model, leaves the old model alone, and keeps integer buffers and unsent tensors as before."""
    rng = np.random.default_rng(3)
    model = {"w": rng.normal(size=1000).astype(dtype), "b": rng.normal(size=7).astype(dtype),
             "steps": np.array([10], np.int64), "unsent": rng.normal(size=3).astype(dtype)}
    old = {k: v.copy() for k, v in model.items()}
    acc = start_sum(model)
    for n in (3.0, 5.0, 11.0):
        fold(acc, {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in model.items() if k != "unsent"}, n)
    spent = WeightedSum(sums={k: v.copy() for k, v in acc.sums.items()}, totals=dict(acc.totals))

    expected, _ = server_step(model, acc, lr, 0.0, {})
    stepped, _ = server_step(model, spent, lr, 0.0, {}, into_sum=True)

    for name in model:
        np.testing.assert_array_equal(stepped[name], expected[name], err_msg=name)
        assert stepped[name].dtype == model[name].dtype
        np.testing.assert_array_equal(model[name], old[name], err_msg=f"old model changed: {name}")
    assert np.shares_memory(stepped["w"], spent.sums["w"]), "the new float tensor is the sum's memory"
    assert stepped["unsent"] is model["unsent"], "a tensor no site sent stays the model's own array"


def test_fedavg_rounds_closed_in_place_match_the_hand_computed_means() -> None:
    """Round after round: a round's sum, spent on the new model, is never summed into again."""
    agg = FedAvgAggregator(FedAvgConfig())
    model = {"w": _f32(1, 1)}
    for delta in ([1, 3], [2, 2]):
        agg.begin_round(model)
        agg.fold(Update(site="a", delta={"w": _f32(*delta)}, n_samples=1, weight=1.0))
        agg.fold(Update(site="b", delta={"w": _f32(0, 0)}, n_samples=1, weight=1.0))
        model = agg.close_round(model)
    # round 1: 1 + [0.5, 1.5]; round 2: + [1, 1]
    np.testing.assert_array_equal(model["w"], [2.5, 3.5])
