"""ScaffoldAggregator: one round worked by hand, the refusal of updates without a usable lr_sum, and a
site-side simulation: the server's c stays the mean of the sites' c_i, with and without every site."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.aggregators import ScaffoldAggregator, Update
from runtime.aggregators.config import ScaffoldConfig
from runtime.errors import UpdateRejected
from runtime.tasks import Scaffold


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_one_round_by_hand() -> None:
    # Prepare: x, c = [0.1, -0.1] and N = 4 (the most sites seen in a round) from an earlier round
    model = {"w": _f32(1.0, 2.0), "n": np.array(5, dtype=np.int64)}
    agg = ScaffoldAggregator(ScaffoldConfig(server_lr=0.5))
    agg.load_state({"c": {"w": _f32(0.1, -0.1)}, "sites": {"max_per_round": np.array(4, dtype=np.int64)}})
    agg.begin_round(model)
    assert np.array_equal(agg.task_extras()["w"], _f32(0.1, -0.1))
    # Execute: site A (1 sample, lr_sum 0.5), site B (3 samples, lr_sum 2.0)
    agg.fold(Update(site="A", delta={"w": _f32(0.2, 0.4), "n": np.array(2, dtype=np.int64)}, n_samples=1,
                    weight=1.0, local={"lr_sum": 0.5}))
    agg.fold(Update(site="B", delta={"w": _f32(-0.2, 0.0), "n": np.array(2, dtype=np.int64)}, n_samples=3,
                    weight=3.0, local={"lr_sum": 2.0}))
    new = agg.close_round(model)
    # Assert:
    # x: mean delta (1*[0.2, 0.4] + 3*[-0.2, 0]) / 4 = [-0.1, 0.1];  x + 0.5 * that = [0.95, 2.05]
    np.testing.assert_allclose(new["w"], [0.95, 2.05], rtol=1e-6)
    assert new["n"] == 7  # integer buffer: plain mean delta, no lr
    # dc_A = -c - delta_A / 0.5 = [-0.1, 0.1] - [0.4, 0.8] = [-0.5, -0.7]
    # dc_B = -c - delta_B / 2.0 = [-0.1, 0.1] - [-0.1, 0.0] = [0.0, 0.1]
    # c + (|S| / N) * mean(dc) = [0.1, -0.1] + (2/4) * [-0.25, -0.3] = [-0.025, -0.25]
    np.testing.assert_allclose(agg.task_extras()["w"], [-0.025, -0.25], rtol=1e-6)
    assert agg.task_extras()["w"].dtype == np.float32
    assert set(agg.task_extras()) == {"w"}  # only float tensors have a control variate
    assert int(agg.state()["sites"]["max_per_round"]) == 4
    assert agg.local_algorithm() == Scaffold()


def test_c_is_zero_before_the_first_round() -> None:
    agg = ScaffoldAggregator(ScaffoldConfig())
    agg.begin_round({"w": _f32(1, 2, 3), "n": np.array(1)})

    extras = agg.task_extras()

    assert set(extras) == {"w"}
    np.testing.assert_array_equal(extras["w"], [0, 0, 0])


@pytest.mark.parametrize("local, why", [({}, "needs local\\['lr_sum'\\]"),
                                        ({"lr_sum": float("nan")}, "finite number > 0"),
                                        ({"lr_sum": float("inf")}, "finite number > 0"),
                                        ({"lr_sum": 0.0}, "finite number > 0"),
                                        ({"lr_sum": -1.0}, "finite number > 0"),
                                        ({"lr_sum": "fast"}, "must be a number")])
def test_an_update_without_a_usable_lr_sum_is_refused(local: dict, why: str) -> None:
    model = {"w": _f32(0.0)}
    agg = ScaffoldAggregator(ScaffoldConfig())
    agg.begin_round(model)

    with pytest.raises(UpdateRejected, match=why) as info:
        agg.fold(Update(site="A", delta={"w": _f32(1.0)}, n_samples=1, weight=1.0, local=local))

    assert "\n" not in str(info.value) and "site A" in str(info.value)
    assert agg.n_folded == 0


class _Site:
    """The site side as fixed in the aggregator's docstring: c_i+ = c_i - c - delta / lr_sum."""

    def __init__(self, name: str, rng: np.random.Generator, shape: tuple[int, ...]):
        self.name, self.rng = name, rng
        self.c = np.zeros(shape, np.float64)

    def train(self, c_server: np.ndarray) -> Update:
        delta = self.rng.normal(size=self.c.shape).astype(np.float32)
        lr_sum = float(self.rng.uniform(0.05, 2.0))
        self.c = self.c - c_server - delta.astype(np.float64) / lr_sum
        return Update(site=self.name, delta={"w": delta}, n_samples=int(self.rng.integers(1, 100)), weight=1.0,
                      local={"lr_sum": lr_sum})


def test_server_c_stays_the_mean_of_the_sites_c() -> None:
    rng = np.random.default_rng(7)
    sites = [_Site(f"site-{i}", rng, (3, 2)) for i in range(3)]
    model = {"w": np.zeros((3, 2), np.float32)}
    agg = ScaffoldAggregator(ScaffoldConfig())
    # round 1 every site takes part, round 2 two of three, round 3 every site again
    for taking_part in (sites, sites[:2], sites):
        agg.begin_round(model)
        c_sent = agg.task_extras()["w"].astype(np.float64)
        for site in taking_part:
            agg.fold(site.train(c_sent))
        model = agg.close_round(model)

        mean_site_c = sum(s.c for s in sites) / len(sites)
        np.testing.assert_allclose(agg.task_extras()["w"], mean_site_c, rtol=1e-5, atol=1e-6)


def test_a_tensor_a_site_left_out_moves_c_by_the_sites_that_sent_it() -> None:
    # Prepare: c = 0, two sites; site B's privacy filter leaves "b" out
    model = {"a": _f32(0.0), "b": _f32(0.0)}
    agg = ScaffoldAggregator(ScaffoldConfig())
    agg.begin_round(model)
    # Execute
    agg.fold(Update(site="A", delta={"a": _f32(1.0), "b": _f32(2.0)}, n_samples=1, weight=1.0,
                    local={"lr_sum": 1.0}))
    agg.fold(Update(site="B", delta={"a": _f32(3.0)}, n_samples=1, weight=1.0, local={"lr_sum": 0.5}))
    new = agg.close_round(model)
    # Assert: N = 2.  a: dc_A = -1, dc_B = -6, c = (2/2) * -3.5;  b: only A, c = (1/2) * -2 = -1
    np.testing.assert_allclose(agg.task_extras()["a"], [-3.5])
    np.testing.assert_allclose(agg.task_extras()["b"], [-1.0])
    # x: "a" averages both sites, "b" is A's delta alone
    np.testing.assert_allclose(new["a"], [2.0])
    np.testing.assert_allclose(new["b"], [2.0])
