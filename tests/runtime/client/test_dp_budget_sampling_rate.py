"""A job's gaussian_dp sampling_rate is its claim, which the site cannot check: a site with a dp_budget or a
gaussian_dp floor accounts at least its floor's sampling_rate, else 1.0, never a job's lower claim, and says
so (the step is marked raised); a higher claim stands; a site with neither leaves the claim to the job."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.client.dp_ledger import LEDGER_FILE, DpLedger
from runtime.errors import DpBudgetExhausted, JobRejected
from runtime.job_spec import FilterConfig
from tests.runtime.client.test_dp_ledger import Site, accountant_epsilon
from tests.runtime.client.test_privacy_policy import policy, steps

DELTA = 1e-5
BUDGET = {"epsilon": 20.0, "delta": DELTA}  # the site-IT check's local/privacy.yml
LOW_CLAIM = {"noise_multiplier": 0.3, "clip_norm": 1.0, "sampling_rate": 0.001}  # the job's gaussian_dp args


def asked(**args: float) -> list[FilterConfig]:
    return [FilterConfig(name="gaussian_dp", args={**LOW_CLAIM, **args})]


def test_a_low_claim_does_not_get_a_job_past_the_budget(tmp_path: Path) -> None:
    """The repro: at the claimed 0.001 three releases cost 9.49, under the budget of 20; at the honest 1.0 one
    release alone costs 20.39, so the first upload is refused and nothing is counted."""
    assert accountant_epsilon(0.3, 0.001, 3, DELTA) < BUDGET["epsilon"] < accountant_epsilon(0.3, 1.0, 1, DELTA)
    site = Site(tmp_path, policy(dp_budget=BUDGET))
    with pytest.raises(DpBudgetExhausted) as err:
        site.upload(asked())
    assert err.value.details["releases_so_far"] == 0
    assert f"{accountant_epsilon(0.3, 1.0, 1, DELTA):.4g}" in str(err.value)
    assert not site.out.exists() and not (site.job_root / LEDGER_FILE).exists()


@pytest.mark.parametrize("site_policy", [
    {"dp_budget": BUDGET},
    {"gaussian_dp": {"noise_multiplier": 0.1, "clip_norm": 1.0}},  # a floor without its own sampling_rate
    {"gaussian_dp": {"noise_multiplier": 0.1, "clip_norm": 1.0}, "dp_budget": BUDGET},
], ids=["budget", "floor", "floor-and-budget"])
def test_the_chain_says_the_site_raised_the_sampling_rate_to_1(site_policy: dict) -> None:
    chain = policy(**site_policy).chain_for("j", asked())
    assert steps(chain) == [("gaussian_dp", {"noise_multiplier": 0.3, "clip_norm": 1.0, "delta": DELTA,
                                             "sampling_rate": 1.0}, "raised")]
    assert chain.is_raised
    (mechanism,), delta = chain.dp_release()
    assert (mechanism.noise_multiplier, mechanism.sampling_rate, delta) == (0.3, 1.0, DELTA)


def test_the_report_accounts_what_the_site_raised_and_the_noise_is_the_same(tmp_path: Path) -> None:
    """What is accounted is what the site reports (raised, at 1.0); the bytes sent are exactly those of the
    same job honestly claiming 1.0 with the same seed: the rate changes the accounting, never the noise."""
    roomy = policy(dp_budget={"epsilon": 1000.0, "delta": DELTA})
    report = Site(tmp_path, roomy).upload(asked())
    assert report.raised and report.chain[-1].source == "raised" and report.chain[-1].args["sampling_rate"] == 1.0
    assert report.dp.sampling_rate == 1.0 and report.dp.noise_multiplier == 0.3
    assert report.dp.epsilon_round == pytest.approx(accountant_epsilon(0.3, 1.0, 1, DELTA), rel=1e-9)
    honest = Site(tmp_path, job_id="job-2").upload(asked(sampling_rate=1.0))
    assert honest.chain[-1].source == "job" and honest.payload_sha256 == report.payload_sha256


def test_the_sites_own_floor_rate_is_used_instead_of_1(tmp_path: Path) -> None:
    """The same budget alone accounts a job's low claim at 1.0; with gaussian_dp.sampling_rate 0.5 the site
    accounts it at 0.5 instead (and so does the step the site adds for a job without gaussian_dp), and its
    budget, between one release's epsilon at 0.5 and at 1.0, is checked at 0.5 too."""
    floor = {"noise_multiplier": 1.0, "clip_norm": 1.0, "sampling_rate": 0.5}
    at_half, at_one = accountant_epsilon(1.0, 0.5, 1, DELTA), accountant_epsilon(1.0, 1.0, 1, DELTA)
    budget = {"epsilon": (at_half + at_one) / 2, "delta": DELTA}
    job = asked(noise_multiplier=1.0)
    assert steps(policy(dp_budget=budget).chain_for("j", job))[0][1]["sampling_rate"] == 1.0
    with pytest.raises(DpBudgetExhausted):
        Site(tmp_path, policy(dp_budget=budget), job_id="job-2").upload(job)
    site_policy = policy(gaussian_dp=floor, dp_budget=budget)
    assert steps(site_policy.chain_for("j", job)) == [
        ("gaussian_dp", {"noise_multiplier": 1.0, "clip_norm": 1.0, "delta": DELTA, "sampling_rate": 0.5}, "raised")]
    assert steps(site_policy.chain_for("j", []))[0][1]["sampling_rate"] == 0.5
    dp = Site(tmp_path, site_policy).upload(job).dp
    assert dp.sampling_rate == 0.5 and dp.epsilon_round == pytest.approx(at_half, rel=1e-9)


@pytest.mark.parametrize(("site_policy", "claim"), [
    ({"dp_budget": BUDGET}, 1.0),
    ({"gaussian_dp": {"noise_multiplier": 0.3, "clip_norm": 1.0, "sampling_rate": 0.5}, "dp_budget": BUDGET}, 0.8),
    ({"gaussian_dp": {"noise_multiplier": 0.3, "clip_norm": 1.0, "sampling_rate": 0.5}}, 0.5),
], ids=["budget-claim-1", "floor-0.5-claim-0.8", "floor-0.5-claim-0.5"])
def test_a_higher_claim_stands(site_policy: dict, claim: float) -> None:
    chain = policy(on_weaker_job="refuse", **site_policy).chain_for("j", asked(sampling_rate=claim))
    assert steps(chain) == [("gaussian_dp", {**LOW_CLAIM, "delta": DELTA, "sampling_rate": claim}, "job")]
    assert chain.dp_release()[0][0].sampling_rate == claim and not chain.is_raised


def test_refuse_refuses_a_low_claim_under_a_budget_saying_why() -> None:
    with pytest.raises(JobRejected) as err:
        policy(on_weaker_job="refuse", dp_budget=BUDGET).chain_for("job-7", asked())
    message = str(err.value)
    assert "site privacy policy refuses job job-7: gaussian_dp sampling_rate=0.001 is below this site's minimum 1 " \
           "(this site credits no amplification by a job's sampling" in message
    assert "gaussian_dp.sampling_rate in local/privacy.yml" in message and "\n" not in message


@pytest.mark.parametrize("site_policy", [
    {},
    {"exclude_vars": ["secret"], "percentile": {"fraction": 0.5}, "svt": {"epsilon": 1.0}},
], ids=["no-policy", "no-dp-floor"])
def test_without_a_dp_floor_or_budget_the_claim_is_the_jobs_own(tmp_path: Path, site_policy: dict) -> None:
    chain = policy(**site_policy).chain_for("j", asked())
    (dp_step,) = [s for s in chain.steps if s.name == "gaussian_dp"]
    assert dp_step.source == "job" and dp_step.args["sampling_rate"] == 0.001
    dp = Site(tmp_path, policy(**site_policy)).upload(asked()).dp
    assert dp.sampling_rate == 0.001 and dp.epsilon_round == pytest.approx(accountant_epsilon(0.3, 0.001, 1, DELTA),
                                                                           rel=1e-9)
    assert DpLedger(tmp_path / "jobs" / "job-1", "job-1").read().mechanisms[0].sampling_rate == 0.001
