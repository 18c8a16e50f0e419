"""A job's DP releases on a site: counted in its ledger for every upload through gaussian_dp, whatever the
task; the reported epsilon is dp-accounting's for the same noise, sampling rate, releases and delta; the
count survives a restart (new objects, same folder); and a release past the site's budget is refused
before anything is written to send."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from runtime.client.dp_ledger import LEDGER_FILE, SITE_LEDGER_FILE, DpLedger
from runtime.client.job_folders import JobFolders
from runtime.client.outgoing import prepare
from runtime.client.privacy_policy import PrivacyPolicy
from runtime.errors import DpBudgetExhausted, JobRejected, UpdateRejected
from runtime.job_spec import FilterConfig
from runtime.privacy_report import PrivacyReport
from runtime.weights import save_file


def accountant_epsilon(z: float, q: float, releases: int, delta: float) -> float:
    accountant = RdpAccountant()
    event = dp_accounting.GaussianDpEvent(z)
    accountant.compose(event if q == 1 else dp_accounting.PoissonSampledDpEvent(q, event), releases)
    return accountant.get_epsilon(delta)


def dp_filter(z: float, q: float = 1.0, delta: float = 1e-5) -> list[FilterConfig]:
    return [FilterConfig(name="gaussian_dp", args={"noise_multiplier": z, "clip_norm": 1.0, "delta": delta,
                                                   "sampling_rate": q})]


class Site:
    """What the daemon holds for one job: the policy, the job's folder; made anew to simulate a restart."""

    def __init__(self, root: Path, policy: PrivacyPolicy | None = None, job_id: str = "job-1") -> None:
        self.root, self.policy, self.job_id = root, policy or PrivacyPolicy(), job_id
        self.job_root = root / "jobs" / job_id
        self.raw = root / "raw.safetensors"
        self.out = root / "raw.sent.safetensors"
        if not self.raw.exists():
            save_file({"w": np.ones((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}, self.raw)

    def upload(self, filters: list[FilterConfig], task: str = "train") -> PrivacyReport:
        chain = self.policy.chain_for(self.job_id, filters)
        return prepare(task, self.raw, self.out, chain, np.random.default_rng(0), self.raw,  # as received
                       ledger=self.ledger())

    def ledger(self) -> DpLedger:
        return DpLedger(self.job_root, self.job_id, self.root / SITE_LEDGER_FILE)  # as the daemon makes it


@pytest.mark.parametrize(("z", "q", "delta"), [(1.0, 1.0, 1e-5), (0.7, 0.05, 1e-6)])
def test_reported_epsilon_is_the_accountants_after_n_releases(tmp_path: Path, z: float, q: float,
                                                              delta: float) -> None:
    site = Site(tmp_path)
    for n in range(1, 5):
        dp = site.upload(dp_filter(z, q, delta)).dp
        assert dp is not None and dp.releases == n
        assert dp.epsilon_total == pytest.approx(accountant_epsilon(z, q, n, delta), rel=1e-9)
        assert dp.epsilon_round == pytest.approx(accountant_epsilon(z, q, 1, delta), rel=1e-9)
        assert (dp.delta, dp.noise_multiplier, dp.sampling_rate) == (delta, z, q)


def test_every_task_that_uploads_weights_is_a_release(tmp_path: Path) -> None:
    site = Site(tmp_path)
    releases = [site.upload(dp_filter(1.0), task).dp.releases for task in ("init", "train", "train", "submit_model")]
    assert releases == [1, 2, 3, 4]


def test_uploads_without_gaussian_dp_are_not_releases(tmp_path: Path) -> None:
    site = Site(tmp_path)
    report = site.upload([FilterConfig(name="percentile", args={"fraction": 0.5})])
    assert report.dp is None and "dp" not in report.model_dump(mode="json", exclude_none=True)
    assert not (site.job_root / LEDGER_FILE).exists()


def test_the_count_survives_a_restart_and_composes_changed_parameters(tmp_path: Path) -> None:
    """Two releases at noise 1.0; the site restarts with a floor of noise 2.0; a third at 2.0: the total
    composes the releases as they were."""
    Site(tmp_path).upload(dp_filter(1.0))
    Site(tmp_path).upload(dp_filter(1.0))
    restarted = Site(tmp_path, PrivacyPolicy(gaussian_dp={"noise_multiplier": 2.0, "clip_norm": 1.0}))
    dp = restarted.upload(dp_filter(1.0)).dp
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.0), 2)
    accountant.compose(dp_accounting.GaussianDpEvent(2.0), 1)
    assert dp.releases == 3 and dp.noise_multiplier == 2.0
    assert dp.epsilon_total == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    on_disk = json.loads((tmp_path / "jobs" / "job-1" / LEDGER_FILE).read_text())
    assert on_disk["releases"] == 3 and {(m["noise_multiplier"], m["count"]) for m in on_disk["mechanisms"]} == \
        {(1.0, 2), (2.0, 1)}


def test_another_job_has_its_own_count(tmp_path: Path) -> None:
    Site(tmp_path).upload(dp_filter(1.0))
    assert Site(tmp_path, job_id="job-2").upload(dp_filter(1.0)).dp.releases == 1


def test_a_release_past_the_budget_is_not_written_and_not_counted(tmp_path: Path) -> None:
    """Budget: between the epsilon of 2 and of 3 releases at noise 1.0 (delta 1e-5): the third is refused,
    a stale file in the upload's place is gone, the ledger still says 2, and the line names the spend."""
    two, three = accountant_epsilon(1.0, 1.0, 2, 1e-5), accountant_epsilon(1.0, 1.0, 3, 1e-5)
    budget = (two + three) / 2
    site = Site(tmp_path, PrivacyPolicy(dp_budget={"epsilon": budget, "delta": 1e-5}))
    site.upload(dp_filter(1.0))
    site.upload(dp_filter(1.0))
    site.out.write_bytes(b"an earlier attempt")
    with pytest.raises(DpBudgetExhausted) as err:
        site.upload(dp_filter(1.0))
    message = str(err.value)
    assert not site.out.exists()
    assert site.ledger().read().releases == 2 and site.ledger().read_site().releases == 2
    assert f"{three:.4g}" in message and f"budget of {budget:g}" in message and f"{two:.4g}" in message
    assert "local/privacy.yml dp_budget" in message and "\n" not in message
    assert err.value.details["releases_so_far"] == 2 and err.value.details["budget_epsilon"] == budget
    with pytest.raises(DpBudgetExhausted):  # and it stays refused
        site.upload(dp_filter(1.0), "submit_model")


def test_budget_is_checked_at_its_own_delta(tmp_path: Path) -> None:
    """The job reports at delta 1e-3; the site's budget is at 1e-8, where the same release costs more."""
    one_at_budget_delta = accountant_epsilon(1.0, 1.0, 1, 1e-8)
    site = Site(tmp_path, PrivacyPolicy(dp_budget={"epsilon": one_at_budget_delta * 0.99, "delta": 1e-8}))
    assert accountant_epsilon(1.0, 1.0, 1, 1e-3) < one_at_budget_delta * 0.99
    with pytest.raises(DpBudgetExhausted):
        site.upload(dp_filter(1.0, delta=1e-3))


def test_no_noise_is_reported_infinite_and_refused_under_a_budget(tmp_path: Path) -> None:
    dp = Site(tmp_path).upload(dp_filter(0.0)).dp
    assert dp.epsilon_round == "inf" and dp.epsilon_total == "inf"
    assert dp.model_dump(mode="json")["epsilon_total"] == "inf"
    budgeted = Site(tmp_path, PrivacyPolicy(dp_budget={"epsilon": 8.0, "delta": 1e-5}), job_id="job-2")
    for filters in (dp_filter(0.0), [], [FilterConfig(name="percentile")]):
        with pytest.raises(JobRejected, match="has a DP budget .* no gaussian_dp noise"):
            budgeted.upload(filters)
    assert not (budgeted.job_root / LEDGER_FILE).exists()


@pytest.mark.parametrize(("text", "fragment"), [
    ("{not json", "cannot be read"),
    ('{"format": 1, "job_id": "job-1", "releases": -1}', "field 'releases'"),
    ('{"format": 1, "job_id": "someone-else", "releases": 1}', "ledger of job 'someone-else'"),
])
def test_an_unreadable_ledger_is_never_taken_as_zero(tmp_path: Path, text: str, fragment: str) -> None:
    site = Site(tmp_path)
    site.job_root.mkdir(parents=True)
    (site.job_root / LEDGER_FILE).write_text(text)
    with pytest.raises(JobRejected) as err:
        site.upload(dp_filter(1.0))
    assert fragment in str(err.value) and str(site.job_root / LEDGER_FILE) in str(err.value)
    assert "\n" not in str(err.value) and not site.out.exists()


def test_the_worker_never_sees_the_ledger(tmp_path: Path) -> None:
    folders = JobFolders(tmp_path / "jobs" / "job-1")
    ledger = Site(tmp_path).ledger()
    for exposed in (folders.code, folders.scratch, folders.inbox, folders.outbox):
        assert not ledger.path.is_relative_to(exposed) and not ledger.site_file.is_relative_to(exposed)


def test_a_site_budget_counts_every_job_together(tmp_path: Path) -> None:
    """Budget: between the epsilon of 3 and of 4 releases. Job 1 releases twice, job 2 once (its own count
    1, the site's 3); job 2's next release is refused, though a per-job budget of the same size would have
    let it through: a clone or a resubmission does not start the site's count again."""
    three, four = accountant_epsilon(1.0, 1.0, 3, 1e-5), accountant_epsilon(1.0, 1.0, 4, 1e-5)
    budget = {"epsilon": (three + four) / 2, "delta": 1e-5}
    site_wide = PrivacyPolicy(dp_site_budget=budget)
    first = Site(tmp_path, site_wide)
    first.upload(dp_filter(1.0))
    first.upload(dp_filter(1.0))
    second = Site(tmp_path, site_wide, job_id="job-2")
    dp = second.upload(dp_filter(1.0)).dp
    assert (dp.releases, dp.site_releases) == (1, 3)
    assert dp.epsilon_total == pytest.approx(accountant_epsilon(1.0, 1.0, 1, 1e-5), rel=1e-9)
    assert dp.epsilon_site_total == pytest.approx(three, rel=1e-9)
    with pytest.raises(DpBudgetExhausted) as err:
        second.upload(dp_filter(1.0))
    message = str(err.value)
    assert "this site's DP budget for all jobs is exhausted" in message
    assert "local/privacy.yml dp_site_budget" in message
    assert f"{four:.4g}" in message and f"{three:.4g}" in message and "\n" not in message
    assert err.value.details["budget"] == "dp_site_budget" and err.value.details["releases_so_far"] == 3
    # neither ledger counted the refused release, and the site's says where the spend came from
    assert second.ledger().read().releases == 1
    on_disk = json.loads((tmp_path / SITE_LEDGER_FILE).read_text())
    assert on_disk["releases"] == 3 and on_disk["jobs"] == {"job-1": 2, "job-2": 1}
    # the same epsilon as a per-job budget: job 2 (1 release so far) may go on
    assert Site(tmp_path, PrivacyPolicy(dp_budget=budget), job_id="job-2").upload(dp_filter(1.0)).dp.releases == 2


def test_the_site_total_is_reported_at_the_site_budgets_delta(tmp_path: Path) -> None:
    """The job reports at delta 1e-5; the site's total is shown at its budget's delta, where it is checked."""
    dp = Site(tmp_path, PrivacyPolicy(dp_site_budget={"epsilon": 100.0, "delta": 1e-8})).upload(dp_filter(1.0)).dp
    assert dp.epsilon_total == pytest.approx(accountant_epsilon(1.0, 1.0, 1, 1e-5), rel=1e-9)
    assert dp.epsilon_site_total == pytest.approx(accountant_epsilon(1.0, 1.0, 1, 1e-8), rel=1e-9)
    assert dp.site_delta == 1e-8


def test_the_site_counts_before_it_has_a_budget(tmp_path: Path) -> None:
    """Releases made while the site had no site budget count once site IT sets one."""
    Site(tmp_path).upload(dp_filter(1.0))
    Site(tmp_path, job_id="job-2").upload(dp_filter(1.0))
    budget = {"epsilon": accountant_epsilon(1.0, 1.0, 2, 1e-5) * 1.01, "delta": 1e-5}
    with pytest.raises(DpBudgetExhausted, match="dp_site_budget"):
        Site(tmp_path, PrivacyPolicy(dp_site_budget=budget), job_id="job-3").upload(dp_filter(1.0))


def test_without_a_site_budget_the_report_carries_no_site_total(tmp_path: Path) -> None:
    """A report without the new fields stays readable by a server that predates them."""
    dp = Site(tmp_path, PrivacyPolicy(dp_budget={"epsilon": 50.0, "delta": 1e-5})).upload(dp_filter(1.0)).dp
    assert dp.epsilon_site_total is None and dp.site_releases is None
    assert "epsilon_site_total" not in dp.model_dump(mode="json", exclude_none=True)


@pytest.mark.parametrize("text", ["{not json", '{"format": 1, "releases": -1}', '{"format": 2}'])
def test_an_unreadable_site_ledger_is_never_taken_as_zero(tmp_path: Path, text: str) -> None:
    (tmp_path / SITE_LEDGER_FILE).write_text(text)
    site = Site(tmp_path)
    with pytest.raises(JobRejected) as err:
        site.upload(dp_filter(1.0))
    assert str(tmp_path / SITE_LEDGER_FILE) in str(err.value) and "of all jobs cannot be read" in str(err.value)
    assert "\n" not in str(err.value) and not site.out.exists() and not (site.job_root / LEDGER_FILE).exists()


def test_weights_the_site_cannot_read_spend_nothing(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.raw.write_bytes(b"not safetensors")
    with pytest.raises(UpdateRejected):
        site.upload(dp_filter(1.0))
    assert not (site.job_root / LEDGER_FILE).exists() and not site.out.exists()


@pytest.mark.parametrize("setting", ["dp_budget", "dp_site_budget"])
def test_a_spent_budget_is_seen_before_the_job_runs(tmp_path: Path, setting: str) -> None:
    """check_room answers whether one more release fits, without counting it: the daemon asks before a
    task runs any of the job's code."""
    two, three = accountant_epsilon(1.0, 1.0, 2, 1e-5), accountant_epsilon(1.0, 1.0, 3, 1e-5)
    budget = {"epsilon": (two + three) / 2, "delta": 1e-5}
    site = Site(tmp_path, PrivacyPolicy(**{setting: budget}))
    chain = site.policy.chain_for("job-1", dp_filter(1.0))
    mechanisms, _ = chain.dp_release()
    for _ in range(2):
        site.ledger().check_room(mechanisms, chain.dp_budget, chain.dp_site_budget)  # fits: no error
        site.upload(dp_filter(1.0))
    with pytest.raises(DpBudgetExhausted, match=f"local/privacy.yml {setting}.*nothing of the job ran"):
        site.ledger().check_room(mechanisms, chain.dp_budget, chain.dp_site_budget)
    assert site.ledger().read().releases == 2 and site.ledger().read_site().releases == 2
