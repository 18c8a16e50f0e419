"""Every model dtype crosses the wire unchanged: bfloat16, float16, float32, float64 and integer buffers,
through safetensors bytes and files, the server's zero-copy parser, torch modules both ways, the update
checks, the privacy filters and the worker's delta."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load as torch_load
from safetensors.torch import save as torch_save

from runtime.client.worker import _delta
from runtime.errors import UpdateRejected
from runtime.filters import gaussian_dp, percentile, svt
from runtime.torch_weights import load_module_weights, module_weights
from runtime.weights import (
    BFLOAT16,
    check_update,
    from_bytes,
    is_float_dtype,
    load_file,
    save_file,
    to_bytes,
    view_bytes,
)

DTYPES = {"bfloat16": BFLOAT16, "float16": np.float16, "float32": np.float32, "float64": np.float64,
          "int64": np.int64, "int32": np.int32, "uint8": np.uint8, "bool": np.bool_}
TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def _tensor(dtype: np.dtype, shape: tuple[int, ...] = (3, 5)) -> np.ndarray:
    values = np.asarray(np.random.default_rng(3).normal(size=shape)) * 40
    return np.asarray(values).astype(dtype)  # 0-d stays an array


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_each_dtype_round_trips_bit_for_bit_through_bytes_views_and_files(dtype: type, tmp_path) -> None:
    weights = {"t": _tensor(np.dtype(dtype)), "scalar": _tensor(np.dtype(dtype), ()), "empty": _tensor(dtype, (0, 4))}
    data = to_bytes(weights)
    save_file(weights, tmp_path / "m.safetensors")

    for got in (from_bytes(data), view_bytes(bytearray(data)), load_file(tmp_path / "m.safetensors")):
        assert got.keys() == weights.keys()
        assert all(_same(got[k], weights[k]) for k in weights)
    assert from_bytes(data)["t"].flags.writeable  # a learner may train in place in what it was sent


def test_bfloat16_is_written_as_safetensors_bf16_and_reads_back_as_torch_writes_it() -> None:
    """The wire format is standard safetensors: what torch writes, fedkit reads, and the other way round."""
    t = torch.linspace(-2, 2, 9, dtype=torch.bfloat16)
    ours = from_bytes(torch_save({"t": t}))["t"]
    assert ours.dtype == BFLOAT16
    assert np.array_equal(ours.astype(np.float32), t.float().numpy())
    back = torch_load(to_bytes({"t": ours}))["t"]
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)


@pytest.mark.parametrize("name", TORCH, ids=TORCH.keys())
def test_a_torch_module_round_trips_in_each_float_dtype_with_its_integer_buffers(name: str) -> None:
    def make() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).to(TORCH[name])

    torch.manual_seed(0)
    source = make()
    source.train()
    source(torch.randn(8, 4, dtype=TORCH[name]))  # running stats and num_batches_tracked move
    weights = from_bytes(to_bytes(module_weights(source)))
    assert weights["0.weight"].dtype == np.dtype(DTYPES[name])
    assert weights["1.num_batches_tracked"].dtype == np.int64 and weights["1.num_batches_tracked"].shape == ()

    target = make()
    load_module_weights(target, weights)
    for key, value in source.state_dict().items():
        got = target.state_dict()[key]
        assert got.dtype == value.dtype and torch.equal(got, value), key


def test_module_weights_of_a_bfloat16_module_are_views_not_copies() -> None:
    module = torch.nn.Linear(3, 2).to(torch.bfloat16)
    weights = module_weights(module)
    with torch.no_grad():
        module.weight.fill_(1.5)
    assert np.all(weights["weight"].astype(np.float32) == 1.5)


@pytest.mark.parametrize("dtype", [BFLOAT16, np.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_update_refuses_nan_and_inf_in_half_types(dtype: np.dtype, bad: float) -> None:
    model = {"w": np.zeros((2, 3), dtype)}
    update = {"w": np.zeros((2, 3), dtype)}
    check_update(update, model)
    update["w"][1, 2] = bad
    with pytest.raises(UpdateRejected, match="tensor 'w' holds NaN or Inf"):
        check_update(update, model)


def test_check_update_refuses_a_half_update_for_a_float32_model() -> None:
    with pytest.raises(UpdateRejected, match="dtype bfloat16, model has float32"):
        check_update({"w": np.zeros(3, BFLOAT16)}, {"w": np.zeros(3, np.float32)})


def test_only_float_dtypes_count_as_float() -> None:
    assert all(is_float_dtype(np.dtype(d)) for d in (BFLOAT16, np.float16, np.float32, np.float64))
    assert not any(is_float_dtype(np.dtype(d)) for d in (np.int64, np.uint8, np.bool_, np.int16))


@pytest.mark.parametrize("dtype", [BFLOAT16, np.float16], ids=["bfloat16", "float16"])
def test_privacy_filters_protect_half_tensors_and_keep_their_dtype(dtype: np.dtype) -> None:
    rng = np.random.default_rng(0)
    delta = {"w": (rng.normal(size=(20, 50)) * 0.01).astype(dtype), "n": np.array(4, np.int64)}

    clipped = gaussian_dp(clip_norm=0.05, noise_multiplier=0.0)(delta, rng)
    norm = np.sqrt(np.sum(np.square(clipped["w"].astype(np.float64))))
    assert clipped["w"].dtype == dtype and 0.049 < norm < 0.051  # clipped from about 0.3, in the half type
    noised = gaussian_dp(clip_norm=0.05, noise_multiplier=1.0)(delta, rng)["w"]
    assert noised.dtype == dtype and np.std(noised.astype(np.float64)) > 0.04  # sigma 0.05 of noise added

    kept = percentile(0.1)(delta, rng)["w"]
    assert kept.dtype == dtype and np.count_nonzero(kept) == 100
    assert np.array_equal(kept[kept != 0], delta["w"][kept != 0])  # survivors are the sent values, unchanged

    released = svt(fraction=0.1, epsilon=1.0, clip=0.01)(delta, rng)["w"]
    assert released.dtype == dtype and 0 < np.count_nonzero(released) <= 100
    assert all(f(delta, rng)["n"] is delta["n"] for f in (percentile(0.1), svt(), gaussian_dp()))


@pytest.mark.parametrize("dtype", [BFLOAT16, np.float16, np.float32], ids=["bfloat16", "float16", "float32"])
def test_the_worker_sends_a_delta_for_half_tensors_and_integer_buffers_as_they_are(dtype: np.dtype) -> None:
    received = {"w": np.linspace(-1, 1, 6).astype(dtype), "n": np.array(10, np.int64)}
    trained = {"w": (received["w"].astype(np.float32) + 0.25).astype(dtype), "n": np.array(12, np.int64)}
    delta = _delta(trained, received)
    assert delta["w"].dtype == dtype
    np.testing.assert_allclose(delta["w"].astype(np.float32), 0.25, atol=0.02)
    assert delta["n"] is trained["n"]
