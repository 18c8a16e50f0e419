"""The site's privacy floor: raise vs refuse, each filter's minimums, always-applied exclusions, and a
malformed local/privacy.yml named in one line (file and field)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.client.privacy_policy import PrivacyPolicy
from runtime.errors import ConfigError, JobRejected
from runtime.job_spec import FilterConfig

DP_ACCOUNTING = {"delta": 1e-5, "sampling_rate": 1.0}  # gaussian_dp's defaults: epsilon is reported with them
FLOOR = {"gaussian_dp": {"noise_multiplier": 1.0, "clip_norm": 0.5}, "percentile": {"fraction": 0.2},
         "svt": {"epsilon": 0.5, "fraction": 0.3}}


def policy(**fields) -> PrivacyPolicy:
    return PrivacyPolicy.model_validate(fields)


def steps(chain) -> list[tuple[str, dict, str]]:
    return [(s.name, dict(s.args), s.source) for s in chain.steps]


def test_no_policy_runs_the_job_filters_as_asked() -> None:
    asked = [FilterConfig(name="percentile", args={"fraction": 0.5})]
    chain = PrivacyPolicy().chain_for("j", asked)
    assert steps(chain) == [("percentile", {"fraction": 0.5}, "job")]
    assert not chain.is_raised


def test_raise_adds_every_missing_filter_for_a_job_asking_for_none() -> None:
    chain = policy(exclude_vars=["^2\\.bias$"], **FLOOR).chain_for("j", [])
    assert steps(chain) == [
        ("exclude_vars", {"pattern": "^2\\.bias$"}, "site"),
        ("percentile", {"fraction": 0.2}, "site"),
        ("svt", {"epsilon": 0.5, "fraction": 0.3, "clip": 0.01}, "site"),
        ("gaussian_dp", {"noise_multiplier": 1.0, "clip_norm": 0.5, **DP_ACCOUNTING}, "site"),  # noise last
    ]
    assert chain.is_raised
    assert len(chain.build()) == 4


@pytest.mark.parametrize(("name", "asked", "expected"), [
    ("gaussian_dp", {"noise_multiplier": 0.1, "clip_norm": 5.0},
     {"noise_multiplier": 1.0, "clip_norm": 0.5, **DP_ACCOUNTING}),
    ("gaussian_dp", {"noise_multiplier": 0.1}, {"noise_multiplier": 1.0, "clip_norm": 0.5, **DP_ACCOUNTING}),
    ("percentile", {"fraction": 0.9}, {"fraction": 0.2}),
    ("svt", {"epsilon": 3.0, "fraction": 0.3}, {"epsilon": 0.5, "fraction": 0.3, "clip": 0.01}),
    ("svt", {"epsilon": 0.5, "fraction": 0.8, "clip": 0.1}, {"epsilon": 0.5, "fraction": 0.3, "clip": 0.1}),
])
def test_a_weaker_filter_is_raised_to_the_floor(name: str, asked: dict, expected: dict) -> None:
    chain = policy(**{name: FLOOR[name]}).chain_for("j", [FilterConfig(name=name, args=asked)])
    assert steps(chain) == [(name, expected, "raised")]


@pytest.mark.parametrize(("name", "asked"), [
    ("gaussian_dp", {"noise_multiplier": 2.0, "clip_norm": 0.1}),
    ("percentile", {"fraction": 0.05}),
    ("svt", {"epsilon": 0.1, "fraction": 0.1}),
])
def test_a_stronger_filter_is_kept_as_the_job_asked(name: str, asked: dict) -> None:
    chain = policy(on_weaker_job="refuse", **{name: FLOOR[name]}).chain_for("j", [FilterConfig(name=name, args=asked)])
    (step,) = chain.steps
    assert step.source == "job"
    assert {k: step.args[k] for k in asked} == asked


@pytest.mark.parametrize(("filters", "fragment"), [
    ([], "asks for no gaussian_dp; this site requires gaussian_dp with noise_multiplier >= 1, clip_norm <= 0.5"),
    ([{"name": "gaussian_dp", "args": {"noise_multiplier": 0.3, "clip_norm": 0.5}}],
     "gaussian_dp noise_multiplier=0.3 is below this site's minimum 1"),
    ([{"name": "gaussian_dp", "args": {"noise_multiplier": 1.0, "clip_norm": 2}}],
     "gaussian_dp clip_norm=2 is above this site's maximum 0.5"),
])
def test_refuse_names_what_the_job_lacks(filters: list, fragment: str) -> None:
    with pytest.raises(JobRejected) as err:
        policy(on_weaker_job="refuse", gaussian_dp=FLOOR["gaussian_dp"]).chain_for(
            "job-7", [FilterConfig.model_validate(f) for f in filters])
    assert "site privacy policy refuses job job-7" in str(err.value)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_refuse_applies_exclusions_without_refusing() -> None:
    chain = policy(on_weaker_job="refuse", exclude_vars=["secret"]).chain_for("j", [])
    assert steps(chain) == [("exclude_vars", {"pattern": "secret"}, "site")]


def test_an_unknown_job_filter_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown filter 'blur'"):
        PrivacyPolicy().chain_for("j", [FilterConfig(name="blur")])


@pytest.mark.parametrize(("text", "fragment"), [
    ("gaussian_dp: {noise_multiplier: 1.0}\n", "field 'gaussian_dp.clip_norm': Field required"),
    ("percentile: {fraction: 1.5}\n", "field 'percentile.fraction'"),
    ("on_weaker_job: ignore\n", "field 'on_weaker_job'"),
    ("exclude_vars: ['(']\n", "field 'exclude_vars'"),
    ("gaussian_dp: {noise_multiplier: 1.0, clip_norm: 1.0, delta: 2}\n", "field 'gaussian_dp.delta'"),
    ("gaussian_dp: {noise_multiplier: 1.0, clip_norm: 1.0, sampling_rate: 0}\n", "field 'gaussian_dp.sampling_rate'"),
    ("dp_budget: {epsilon: 8.0}\n", "field 'dp_budget.delta': Field required"),
    ("dp_budget: {epsilon: .inf, delta: 1.0e-5}\n", "field 'dp_budget.epsilon'"),
    ("svt: [1, 2\n", "not valid yml"),
])
def test_malformed_file_is_one_line_naming_file_and_field(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "privacy.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        PrivacyPolicy.load(path)
    message = str(err.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message


def test_missing_file_means_no_floor(tmp_path: Path) -> None:
    assert PrivacyPolicy.load(tmp_path / "privacy.yml") == PrivacyPolicy()
