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
    ("svt: [1, 2\n", "not valid YAML at line 2: "),
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


def test_a_floor_on_the_accounting_raises_delta_and_sampling_rate() -> None:
    """The site's floor: epsilon reported at a delta no larger than its own, and no more amplification by
    sampling credited than it allows (a larger sampling rate is the more cautious account)."""
    floor = {"noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-6, "sampling_rate": 0.5}
    asked = [FilterConfig(name="gaussian_dp", args={"noise_multiplier": 1.5, "delta": 1e-3, "sampling_rate": 0.01})]
    chain = policy(gaussian_dp=floor).chain_for("j", asked)
    assert steps(chain) == [("gaussian_dp", {"noise_multiplier": 1.5, "clip_norm": 1.0, "delta": 1e-6,
                                             "sampling_rate": 0.5}, "raised")]
    assert chain.dp_release()[1] == 1e-6 and chain.dp_release()[0][0].sampling_rate == 0.5
    stricter = [FilterConfig(name="gaussian_dp", args={"noise_multiplier": 1.5, "delta": 1e-8, "sampling_rate": 1.0})]
    assert policy(gaussian_dp=floor).chain_for("j", stricter).steps[0].source == "job"
    with pytest.raises(JobRejected, match="gaussian_dp delta=0.001 is above this site's maximum 1e-06; gaussian_dp "
                                          "sampling_rate=0.01 is below this site's minimum 0.5"):
        policy(on_weaker_job="refuse", gaussian_dp=floor).chain_for("j", asked)
    with pytest.raises(JobRejected, match="delta <= 1e-06, sampling_rate >= 0.5"):
        policy(on_weaker_job="refuse", gaussian_dp=floor).chain_for("j", [])


@pytest.mark.parametrize("setting", ["dp_budget", "dp_site_budget"])
def test_a_dp_budget_needs_noise_on_every_upload(setting: str) -> None:
    budget = {"epsilon": 8.0, "delta": 1e-5}
    with pytest.raises(JobRejected) as err:
        policy(**{setting: budget}).chain_for("job-7", [FilterConfig(name="percentile")])
    assert f"refuses job job-7: this site has a DP budget ({setting}: epsilon 8 at delta 1e-05)" in str(err.value)
    chain = policy(**{setting: budget}, gaussian_dp=FLOOR["gaussian_dp"]).chain_for("j", [])  # the floor adds noise
    assert getattr(chain, setting) is not None and chain.is_differentially_private


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path: Path) -> None:
    """YAML 1.1 reads 1e-5 as a string; a site writing it that way still gets its budget and floor."""
    path = tmp_path / "privacy.yml"
    path.write_text("dp_budget: {epsilon: 8, delta: 1e-5}\ngaussian_dp: {noise_multiplier: 1, clip_norm: 1, "
                    "delta: 1e-6}\n")
    loaded = PrivacyPolicy.load(path)
    assert loaded.dp_budget.delta == 1e-5 and loaded.gaussian_dp.delta == 1e-6
    chain = loaded.chain_for("j", [FilterConfig(name="gaussian_dp", args={"delta": "1e-5"})])
    assert chain.dp_release()[1] == 1e-6
    assert policy().chain_for("j", [FilterConfig(name="gaussian_dp", args={"delta": "1e-5"})]).steps[0].args["delta"] \
        == 1e-5


def test_an_exclusion_the_filters_engine_cannot_run_is_refused_at_load(tmp_path: Path) -> None:
    # exclude_vars patterns are RE2's (linear time over names a job chose): a look-ahead is named at start,
    # not found at the first job
    (tmp_path / "privacy.yml").write_text("exclude_vars: ['^(?!conv).*bias$']\n")
    with pytest.raises(ConfigError) as refused:
        PrivacyPolicy.load(tmp_path / "privacy.yml")
    line = str(refused.value)
    assert "privacy.yml" in line and "field 'exclude_vars'" in line and "RE2" in line and "\n" not in line, line
