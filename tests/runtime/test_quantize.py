"""The wire codecs (runtime/quantize.py): what each one keeps of a model, the error it reports, and that a
hostile encoded upload is refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import UpdateRejected
from runtime.quantize import PREFIX, decode, encode
from runtime.weights import from_bytes, to_bytes


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.w": rng.normal(size=(7, 5, 3)).astype(np.float32) * 3,
            "fc.b": rng.normal(size=(1000,)).astype(np.float32),
            "steps": np.array([7], dtype=np.int64), "zeros": np.zeros(300, np.float32)}


def _round_trip(model, wire: str):
    encoded, error = encode(model, wire)
    return decode(from_bytes(to_bytes(encoded))), error, encoded


def test_float32_is_sent_as_is() -> None:
    model = _model()
    encoded, error = encode(model, "float32")
    assert encoded is model and error.max_abs == 0.0


@pytest.mark.parametrize("wire", ["float16", "bfloat16", "int8"])
def test_each_codec_decodes_to_the_models_names_shapes_and_dtypes_with_the_error_it_reports(wire: str) -> None:
    model = _model()
    decoded, error, _ = _round_trip(model, wire)
    assert sorted(decoded) == sorted(model)
    for name, arr in model.items():
        assert decoded[name].shape == arr.shape and decoded[name].dtype == arr.dtype
    np.testing.assert_array_equal(decoded["steps"], model["steps"])  # not a float: untouched
    np.testing.assert_array_equal(decoded["zeros"], model["zeros"])
    floats = [n for n in model if model[n].dtype.kind == "f"]
    diff = np.concatenate([(decoded[n].astype(np.float64) - model[n]).ravel() for n in floats])
    ref = np.concatenate([model[n].astype(np.float64).ravel() for n in floats])
    assert error.max_abs == pytest.approx(np.abs(diff).max())
    assert error.rel_l2 == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(ref))
    bound = {"float16": 1e-3, "bfloat16": 8e-3, "int8": 1e-2}[wire]
    assert 0 < error.rel_l2 < bound


def test_int8_error_is_at_most_half_a_step_of_each_blocks_absmax() -> None:
    x = np.random.default_rng(1).normal(size=10_000).astype(np.float32)
    x[:256] *= 1000  # one loud block does not cost the quiet ones their precision
    decoded, _, encoded = _round_trip({"x": x}, "int8")
    blocks = np.pad(x, (0, -len(x) % 256)).reshape(-1, 256)
    step = np.repeat(np.abs(blocks).max(axis=1) / 127, 256)[:len(x)]
    assert (np.abs(decoded["x"] - x) <= step / 2 * (1 + 1e-5)).all()
    assert sum(a.nbytes for a in encoded.values()) == 10_000 + 4 * 40  # codes + a scale per block


def test_bfloat16_rounds_to_nearest_even_and_keeps_float32_range() -> None:
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3e38, -2.5e-38], dtype=np.float32)
    decoded, _, _ = _round_trip({"x": x}, "bfloat16")
    np.testing.assert_array_equal(decoded["x"][:3], np.array([1.0, 1.0, 1.0 + 2 ** -6], np.float32))
    assert np.isfinite(decoded["x"]).all()
    np.testing.assert_allclose(decoded["x"][3:], x[3:], rtol=2 ** -8)


@pytest.mark.parametrize("tamper, message", [
    (lambda w: w.update({f"{PREFIX}scale.256/x": np.ones(3, np.float32)}), "scales for"),
    (lambda w: w.update({f"{PREFIX}scale.256/x": np.full(4, np.nan, np.float32)}), "finite"),
    (lambda w: w.pop(f"{PREFIX}scale.256/x"), "without their scales"),
    (lambda w: w.update({f"{PREFIX}int8.7/float32/y": np.zeros(3, np.int8)}), "block size"),
    (lambda w: w.update({f"{PREFIX}zip/float32/y": np.zeros(3, np.int8)}), "unknown wire codec"),
    (lambda w: w.update({f"{PREFIX}float16/int64/y": np.zeros(3, np.float16)}), "not a name"),
    (lambda w: w.update({f"{PREFIX}bfloat16/float32/y": np.zeros(3, np.float32)}), "dtype float32"),
    (lambda w: w.update({"x": np.zeros(1000, np.float32)}), "appears twice"),
])
def test_a_malformed_encoded_upload_is_refused_by_name(tamper, message: str) -> None:
    encoded, _ = encode({"x": np.ones(1000, np.float32)}, "int8")
    tamper(encoded)
    with pytest.raises(UpdateRejected, match=message):
        decode(encoded)
