"""runtime/filters.py: what each privacy filter lets leave the site, and how bad filter config is refused."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import ConfigError
from runtime.filters import apply_filters, build_filters, exclude_vars, gaussian_dp, percentile, svt
from runtime.job_spec import FilterConfig


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_exclude_vars_drops_matching_names_only() -> None:
    delta = {"head.weight": _f32(1), "head.bias": _f32(2), "body.head_count": _f32(3), "body.weight": _f32(4)}

    out = exclude_vars(r"^head\.")(delta, _rng())

    assert sorted(out) == ["body.head_count", "body.weight"]
    np.testing.assert_array_equal(out["body.weight"], [4])


def test_percentile_keeps_the_largest_magnitudes_and_zeros_the_rest() -> None:
    delta = {"w": _f32(1, -4, 2, -3), "m": _f32(0.1, 0.5, -0.2, 0.3, -0.9, 0.0, 0.4, 0.6, -0.7, 0.8)}

    out = percentile(fraction=0.5)(delta, _rng())

    np.testing.assert_array_equal(out["w"], [0, -4, 0, -3])
    np.testing.assert_array_equal(out["m"], _f32(0, 0.5, 0, 0, -0.9, 0, 0, 0.6, -0.7, 0.8))
    assert out["w"].dtype == np.float32


def test_percentile_keeps_at_least_one_entry_and_leaves_integers_alone() -> None:
    delta = {"w": _f32(0.1, -0.3, 0.2), "steps": np.array([5, 6], dtype=np.int64)}

    out = percentile(fraction=0.01)(delta, _rng())

    np.testing.assert_array_equal(out["w"], _f32(0, -0.3, 0))
    np.testing.assert_array_equal(out["steps"], [5, 6])


def test_gaussian_dp_without_noise_clips_the_global_norm_exactly() -> None:
    # Prepare: the whole delta has L2 norm 5 (3-4-5 across two tensors)
    delta = {"a": _f32(3, 0), "b": np.array([[4.0]], dtype=np.float32), "steps": np.array([9], dtype=np.int64)}
    # Execute
    out = gaussian_dp(clip_norm=1.0, noise_multiplier=0.0)(delta, _rng())
    # Assert: scaled by 1/5 together, so the direction is kept and the norm is the clip
    np.testing.assert_allclose(out["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [[0.8]], rtol=1e-6)
    norm = np.sqrt(np.sum(out["a"].astype(np.float64) ** 2) + np.sum(out["b"].astype(np.float64) ** 2))
    assert norm == pytest.approx(1.0, rel=1e-6)
    assert out["a"].dtype == np.float32
    np.testing.assert_array_equal(out["steps"], [9])


def test_gaussian_dp_leaves_a_delta_inside_the_clip_unchanged_without_noise() -> None:
    delta = {"a": _f32(0.3, -0.4)}

    out = gaussian_dp(clip_norm=1.0, noise_multiplier=0.0)(delta, _rng())

    np.testing.assert_allclose(out["a"], [0.3, -0.4], rtol=1e-6)


def test_gaussian_dp_adds_noise_of_sigma_times_clip() -> None:
    delta = {"a": np.zeros(20_000, dtype=np.float32)}

    out = gaussian_dp(clip_norm=0.5, noise_multiplier=2.0)(delta, _rng(1))

    assert float(np.std(out["a"])) == pytest.approx(1.0, rel=0.05)


def test_svt_preserves_shape_and_dtype() -> None:
    delta = {"w": _rng(0).normal(0, 0.01, (20, 30)).astype(np.float32), "steps": np.array([3], dtype=np.int64)}

    out = svt(fraction=0.1)(delta, _rng(1))

    assert out["w"].shape == (20, 30) and out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["steps"], [3])


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_svt_releases_roughly_the_configured_fraction(fraction: float) -> None:
    # Prepare: a typical small delta, default epsilon and clip
    delta = {"w": _rng(0).normal(0, 0.01, (100, 100)).astype(np.float32)}
    # Execute
    out = svt(fraction=fraction)(delta, _rng(1))
    # Assert: sparsity is what the site asked for, within a generous margin
    released = float(np.count_nonzero(out["w"])) / out["w"].size
    assert fraction / 2 <= released <= fraction * 1.5


def test_svt_is_reproducible_with_a_seeded_rng() -> None:
    delta = {"w": _rng(0).normal(0, 0.01, 50).astype(np.float32)}

    first = svt(fraction=0.2)(delta, _rng(7))
    second = svt(fraction=0.2)(delta, _rng(7))

    np.testing.assert_array_equal(first["w"], second["w"])


def test_apply_filters_runs_them_in_order() -> None:
    delta = {"head.w": _f32(10, 0), "body.w": _f32(3, 4)}
    filters = build_filters([
        FilterConfig(name="exclude_vars", args={"pattern": "^head"}),
        FilterConfig(name="gaussian_dp", args={"clip_norm": 1.0, "noise_multiplier": 0.0}),
    ])

    out = apply_filters(delta, filters, _rng())

    assert list(out) == ["body.w"]
    np.testing.assert_allclose(out["body.w"], [0.6, 0.8], rtol=1e-6)


def test_build_filters_rejects_an_unknown_name() -> None:
    with pytest.raises(ConfigError, match="unknown filter 'blur'"):
        build_filters([FilterConfig(name="blur")])


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("percentile", {"frac": 0.1}),
        ("percentile", {"fraction": 0}),
        ("percentile", {"fraction": 1.5}),
        ("percentile", {"fraction": "half"}),
        ("gaussian_dp", {"clip_norm": 0}),
        ("gaussian_dp", {"noise_multiplier": -1}),
        ("svt", {"epsilon": 0}),
        ("svt", {"fraction": 2}),
        ("exclude_vars", {}),
        ("exclude_vars", {"pattern": "(unclosed"}),
        ("exclude_vars", {"pattern": 7}),
        # not finite: svt withheld every entry (the job trained nothing); inf clipping made NaN noise
        ("svt", {"epsilon": float("nan")}),
        ("svt", {"clip": float("nan")}),
        ("svt", {"clip": float("inf")}),
        ("gaussian_dp", {"clip_norm": float("inf"), "noise_multiplier": 0}),
        ("gaussian_dp", {"clip_norm": float("nan")}),
    ],
    ids=["unknown-arg", "fraction-0", "fraction-big", "fraction-text", "clip-0", "noise-neg", "eps-0",
         "svt-fraction", "pattern-missing", "pattern-bad-regex", "pattern-number", "svt-eps-nan", "svt-clip-nan",
         "svt-clip-inf", "dp-clip-inf", "dp-clip-nan"],
)
def test_build_filters_rejects_bad_arguments(name: str, args: dict) -> None:
    with pytest.raises(ConfigError, match=name):
        build_filters([FilterConfig(name=name, args=args)])


def test_a_pattern_that_backtracks_forever_in_python_matches_at_once() -> None:
    # a job's exclude_vars runs in the site's daemon over tensor names the job chose: Python's `re` took
    # hours on this (2^40 ways to split the a's), holding the daemon, its heartbeats and SIGTERM
    name = "a" * 40 + "!"
    delta = {name: np.ones(2, dtype=np.float32), "a": np.ones(2, dtype=np.float32)}
    assert list(apply_filters(delta, build_filters([FilterConfig(name="exclude_vars", args={
        "pattern": "^(a+)+$"})]), np.random.default_rng(0))) == [name]


def test_a_pattern_re2_cannot_run_is_refused_saying_why() -> None:
    with pytest.raises(ConfigError) as refused:
        build_filters([FilterConfig(name="exclude_vars", args={"pattern": "^(?!bias).*"})])
    assert str(refused.value) == ("config_fed_client.yml: filter 'exclude_vars': '^(?!bias).*' is not a regular "
                                  "expression RE2 accepts (invalid perl operator: (?!; it has no look-arounds or "
                                  "back-references)")


def test_a_pattern_too_costly_to_run_is_refused() -> None:
    # linear, but at 14 s a MiB of names: 900 of them over a 50 MB name were days of the daemon's CPU
    with pytest.raises(ConfigError, match="is too complex .* RE2 instructions, at most 200"):
        build_filters([FilterConfig(name="exclude_vars", args={"pattern": "(?:[ab]{0,999}a){1}[ab]{999}c"})])
    build_filters([FilterConfig(name="exclude_vars", args={
        "pattern": r"^(model\.)?(encoder|decoder)\.layers\.[0-9]+\.(self_attn|mlp)\.(q|k|v|o)_proj\.(weight|bias)$"})])


def test_names_too_long_to_match_fail_the_update_not_the_site() -> None:
    from runtime.errors import UpdateRejected
    from runtime.name_patterns import MAX_MATCHED_CHARS

    chain = build_filters([FilterConfig(name="exclude_vars", args={"pattern": "bias$"})])
    long_name = "a" * (MAX_MATCHED_CHARS + 1)
    with pytest.raises(UpdateRejected, match=f"more than the {MAX_MATCHED_CHARS} this site matches"):
        apply_filters({long_name: np.ones(1, np.float32)}, chain, np.random.default_rng(0))


def test_a_job_asks_for_at_most_16_filters() -> None:
    from runtime.errors import JobRejected
    from runtime.job_spec import load_job_spec

    many = "filters: [" + ", ".join(["{name: exclude_vars, args: {pattern: x}}"] * 17) + "]"
    with pytest.raises(JobRejected, match="filters"):
        load_job_spec({"meta.yml": "name: j", "config_fed_server.yml": "rounds: 1",
                       "config_fed_client.yml": "learner: {path: 'a:B'}\n" + many})
