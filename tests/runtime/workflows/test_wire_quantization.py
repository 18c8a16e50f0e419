"""Quantized transfer (server.wire_dtype) through the real controller, FedAvg and the simulated sites'
edges: the global model goes out encoded and is decoded before a site trains on it; each delta comes
back encoded and is decoded before it is folded. The result must be the weighted mean of the decoded
deltas, recomputed here by hand, and each round's codec error must be in the job's metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from runtime.job_spec import load_job_spec
from runtime.quantize import decode, encode
from runtime.simulate import simulate
from tests.runtime.workflows.numpy_learner import gd_step, learners, site_data

SIZES = {"site-a": 30, "site-b": 90}


def _wire(weights, wire: str):
    return decode(encode(weights, wire)[0])


def _by_hand(wire: str, rounds: int) -> dict[str, np.ndarray]:
    data = [site_data(i, n, shift=float(i)) for i, n in enumerate(SIZES.values())]
    model = {"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)}
    total = sum(SIZES.values())
    for _ in range(rounds):
        received = _wire(model, wire)  # what every site trains on
        deltas = [_wire({k: gd_step(received, x, y, 0.1)[k] - received[k] for k in received}, wire)
                  for x, y in data]
        model = {k: model[k] + sum(n * d[k].astype(np.float64) for n, d in zip(SIZES.values(), deltas, strict=True))
                 / total for k in model}
    return model


@pytest.mark.parametrize("wire", ["int8", "bfloat16", "float16"])
def test_a_quantized_round_gives_the_weighted_mean_of_the_decoded_deltas(tmp_path: Path, wire: str) -> None:
    spec = load_job_spec({"meta.yml": "name: q\nmin_clients: 2", "config_fed_client.yml": "learner: {path: a:B}",
                          "config_fed_server.yml": f"rounds: 2\nwire_dtype: {wire}\n"
                                                   "key_metric: {name: mse, higher_is_better: false}"})
    result = asyncio.run(simulate(spec, learners(tmp_path / "sites", SIZES), tmp_path / "server"))
    expected, unquantized = _by_hand(wire, 2), _by_hand("float32", 2)
    for name, value in expected.items():
        np.testing.assert_allclose(result.global_model[name], value, rtol=1e-6, atol=1e-7)
    # the codec made a difference the test can see: a run without it would not pass the check above
    assert max(np.abs(expected[k] - unquantized[k]).max() for k in expected) > 1e-5
    wire_entries = [e for e in result.metrics if e["type"] == "wire"]
    train = [e for e in wire_entries if e["task"] == "train"]
    assert [e["round"] for e in train] == [1, 2]
    for entry in train:
        assert entry["wire_dtype"] == wire and sorted(entry["received"]) == sorted(SIZES)
        assert entry["bytes_sent"] > 0 and set(entry["sent"]) == {"max_abs_error", "rel_l2_error"}
        assert all(0 < site["rel_l2_error"] < 0.05 for site in entry["received"].values())
