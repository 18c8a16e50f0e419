"""Privacy filters applied on the site to the delta before it leaves. Pure NumPy; no torch.

    exclude_vars        drop named tensors (an RE2 regex: runtime/name_patterns.py) from what is sent
    percentile          send only the largest-magnitude fraction of each tensor's entries (rest zeroed)
    gaussian_dp         clip the whole delta to an L2 norm, then add Gaussian noise (sigma * clip); its
                        epsilon is accounted on the site (runtime.privacy_accounting)
    svt                 sparse vector technique: noisy threshold selection of a fraction of entries

Each filter is a function (delta, rng) -> delta; `build_filters` turns config_fed_client.yml entries
into them and rejects unknown names or arguments with a one-line error.

Every float tensor is filtered, float16 and bfloat16 included (a tensor a filter skipped would leave the
site unprotected); the arithmetic runs in float32 or better (`weights.wide_dtype`) and the result is
rounded once back to the tensor's dtype. Integer buffers pass through the filters themselves; the site's
privacy step (runtime.client.outgoing) sends them blank under any chain that changes values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import ConfigError, UpdateRejected
from .name_patterns import check_names_matchable, tensor_name_pattern
from .weights import Weights, is_float_dtype, wide_dtype

Filter = Callable[[Weights, np.random.Generator], Weights]


def exclude_vars(pattern: str) -> Filter:
    regex = tensor_name_pattern(pattern)  # RE2: it runs in the site's daemon over names the job chose

    def apply(delta: Weights, rng: np.random.Generator) -> Weights:
        check_names_matchable(list(delta))
        return {k: v for k, v in delta.items() if not regex.search(k)}

    return apply


def percentile(fraction: float = 0.1) -> Filter:
    if not 0 < fraction <= 1:
        raise ConfigError(f"percentile filter: fraction must be in (0, 1], got {fraction}")

    def apply(delta: Weights, rng: np.random.Generator) -> Weights:
        out = {}
        for k, v in delta.items():
            if not is_float_dtype(v.dtype) or v.size == 0:
                out[k] = v
                continue
            keep = max(1, int(np.ceil(fraction * v.size)))
            magnitude = np.abs(v.astype(wide_dtype(v.dtype), copy=False))
            threshold = np.partition(magnitude.ravel(), v.size - keep)[v.size - keep]
            out[k] = np.where(magnitude >= threshold, v, np.zeros((), v.dtype)).astype(v.dtype, copy=False)
        return out

    return apply


def gaussian_dp(clip_norm: float = 1.0, noise_multiplier: float = 1.0, delta: float = 1e-5,
                sampling_rate: float = 1.0) -> Filter:
    """Clip the whole delta to L2 norm clip_norm, add N(0, (noise_multiplier * clip_norm)^2) to every entry.

    `delta` and `sampling_rate` change nothing in what is sent: they are what the site's accounting
    (runtime.privacy_accounting) reports epsilon with. `sampling_rate` is the probability with which the
    job's sampling includes the protected data in a release (1.0: every release, no amplification); the
    site cannot check it, so its privacy policy may insist on a minimum."""
    clip_norm, noise_multiplier = _number("clip_norm", clip_norm), _number("noise_multiplier", noise_multiplier)
    delta, sampling_rate = _number("delta", delta), _number("sampling_rate", sampling_rate)
    if not (0 < clip_norm < math.inf and 0 <= noise_multiplier < math.inf):  # inf clipping: noise of scale NaN
        raise ConfigError("gaussian_dp filter: clip_norm must be a finite number > 0 and noise_multiplier a finite "
                          "number >= 0")
    if not (0 < delta < 1 and 0 < sampling_rate <= 1):
        raise ConfigError(f"gaussian_dp filter: delta must be in (0, 1) and sampling_rate in (0, 1], got "
                          f"delta={delta}, sampling_rate={sampling_rate}")

    def apply(delta: Weights, rng: np.random.Generator) -> Weights:
        floats = [v for v in delta.values() if is_float_dtype(v.dtype)]
        norm = float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in floats)))
        if not math.isfinite(norm):  # a NaN norm compared false and clipped nothing: raw values left noised lightly
            raise UpdateRejected("gaussian_dp: the weights' L2 norm is not finite (NaN, Inf or overflow); "
                                 "nothing was sent")
        scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        sigma = noise_multiplier * clip_norm
        # float64 noise and scaling, rounded once to the tensor's dtype
        return {k: (v.astype(np.float64) * scale + rng.normal(0.0, sigma, v.shape)).astype(v.dtype)
                if is_float_dtype(v.dtype) else v for k, v in delta.items()}

    return apply


def _number(name: str, value: object) -> float:
    """YAML reads `1e-5` (no dot) as a string: accept any number written as one, refuse anything else."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"gaussian_dp filter: {name} must be a number, got {value!r}") from None


def svt(fraction: float = 0.1, epsilon: float = 1.0, clip: float = 0.01) -> Filter:
    """Sparse vector technique, simplified: clip each entry to [-clip, clip], score it by its magnitude
    plus Laplace noise, release at most `fraction` of the entries (the best noisy scores above a noisy
    threshold) with Laplace noise added, and zero the rest."""
    # written so that NaN fails too: with epsilon NaN every entry was withheld and the job trained nothing
    if not (0 < fraction <= 1 and 0 < epsilon < math.inf and 0 < clip < math.inf):
        raise ConfigError("svt filter: need 0 < fraction <= 1, and epsilon and clip finite numbers > 0")

    def apply(delta: Weights, rng: np.random.Generator) -> Weights:
        out = {}
        for k, v in delta.items():
            if not is_float_dtype(v.dtype) or v.size == 0:
                out[k] = v
                continue
            c = np.clip(v.astype(wide_dtype(v.dtype), copy=False), -clip, clip).ravel()
            b = 2 * clip / epsilon
            scores = np.abs(c) + rng.laplace(0, 2 * b, c.shape)
            threshold = np.quantile(np.abs(c), 1 - fraction) + rng.laplace(0, b)
            k_max = max(1, int(np.ceil(fraction * c.size)))
            top = np.argpartition(scores, c.size - k_max)[c.size - k_max:]
            top = top[scores[top] >= threshold]
            released = np.zeros_like(c)
            released[top] = c[top] + rng.laplace(0, b, top.shape)
            out[k] = released.reshape(v.shape).astype(v.dtype)
        return out

    return apply


FILTERS: dict[str, Callable[..., Filter]] = {
    "exclude_vars": exclude_vars, "percentile": percentile, "gaussian_dp": gaussian_dp, "svt": svt,
}


def build_filters(entries: list[Any]) -> list[Filter]:
    built = []
    for entry in entries:
        factory = FILTERS.get(entry.name)
        if factory is None:
            raise ConfigError(f"config_fed_client.yml: unknown filter '{entry.name}' (known: {', '.join(FILTERS)})")
        try:
            built.append(factory(**entry.args))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config_fed_client.yml: filter '{entry.name}': {e}") from None
    return built


def apply_filters(delta: Weights, filters: list[Filter], rng: np.random.Generator) -> Weights:
    for f in filters:
        delta = f(delta, rng)
    return delta
