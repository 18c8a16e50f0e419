"""The site's count of its differentially private releases: one ledger per job,
workspace/jobs/<job>/dp_ledger.json, and one for all jobs together, workspace/dp_site_ledger.json.

Every upload that goes through gaussian_dp (train deltas, the round-0 model, a local model for cross-site
validation) is one release; a total epsilon is the accountant's over the releases it covers, each with the
noise and sampling rate it actually used (runtime.privacy_accounting). The job's ledger bounds what one job
takes (local/privacy.yml `dp_budget`); the site's ledger bounds what every job of the study takes from this
site's data together (`dp_site_budget`), so a lead cannot reset the count by cloning or resubmitting a job.
The site's ledger counts every release, budget or not, so a budget set later counts what went before.

The ledgers are what make the totals survive a restart of the site: they are read and rewritten
(atomically, fsynced) for every release, *before* the weights are written for upload, so a release can be
counted and not sent (a crash, a refused upload) but never sent and not counted. The site's ledger is
written first: a crash between the two writes over-counts the site, never under-counts it. A task the
server re-sends after its own restart is trained and released again, and counts again: it left the site
again.

A release that would take a total past its budget is refused before anything is written to send, and both
ledgers are left as they were.

The files sit in the workspace, outside a job's code/, scratch/, inbox/ and outbox/: the job's worker never
sees them. A ledger that cannot be read is never taken as zero: DP uploads fail with a line saying what to
do, until site IT restores or removes the file.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import DpBudgetExhausted, JobRejected
from ..privacy_accounting import GaussianMechanism, epsilon
from ..privacy_report import MAX_RELEASES, DpSpend
from .durable import write_durably
from .privacy_policy import DpBudget

LEDGER_FILE = "dp_ledger.json"
SITE_LEDGER_FILE = "dp_site_ledger.json"  # in the site's workspace
_LOCK = threading.Lock()  # one writer per process; the daemon runs one task at a time anyway


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LedgerEntry(_Strict):
    noise_multiplier: float = Field(ge=0, allow_inf_nan=False)
    sampling_rate: float = Field(gt=0, le=1)
    count: int = Field(ge=1)


class _Releases(_Strict):
    format: Literal[1] = 1
    releases: int = Field(0, ge=0, le=MAX_RELEASES)
    mechanisms: list[LedgerEntry] = Field(default_factory=list)

    def counts(self) -> Counter[GaussianMechanism]:
        return Counter({GaussianMechanism(e.noise_multiplier, e.sampling_rate): e.count for e in self.mechanisms})

    def _added(self, release: Sequence[GaussianMechanism]) -> dict:
        counts = self.counts() + Counter(release)
        return {"releases": self.releases + 1, "mechanisms": [
            LedgerEntry(noise_multiplier=m.noise_multiplier, sampling_rate=m.sampling_rate, count=n)
            for m, n in sorted(counts.items())]}


_R = TypeVar("_R", bound=_Releases)


class LedgerFile(_Releases):
    """One job's releases on this site."""

    job_id: str

    def plus(self, release: Sequence[GaussianMechanism]) -> LedgerFile:
        return LedgerFile(job_id=self.job_id, **self._added(release))


class SiteLedgerFile(_Releases):
    """Every job's releases on this site, composed together; `jobs`: how many came from each job."""

    jobs: dict[str, int] = Field(default_factory=dict)

    def plus(self, release: Sequence[GaussianMechanism], job_id: str) -> SiteLedgerFile:
        return SiteLedgerFile(jobs={**self.jobs, job_id: self.jobs.get(job_id, 0) + 1}, **self._added(release))


class DpLedger:
    """One job's ledger on this site, and (when `site_file` is given) the site's ledger of all jobs."""

    def __init__(self, job_root: Path, job_id: str, site_file: Path | None = None) -> None:
        self.path = job_root / LEDGER_FILE
        self.job_id = job_id
        self.site_file = site_file

    def read(self) -> LedgerFile:
        """The job's releases counted so far (none when the file does not exist). Raises JobRejected, one
        line, when the file exists and cannot be read or belongs to another job."""
        ledger = _read(self.path, LedgerFile, self._unreadable) or LedgerFile(job_id=self.job_id)
        if ledger.job_id != self.job_id:
            raise self._unreadable(f"it is the ledger of job {ledger.job_id!r}")
        return ledger

    def read_site(self) -> SiteLedgerFile:
        """Every job's releases on this site so far; raises JobRejected, one line, when unreadable."""
        if self.site_file is None:
            raise ValueError("this ledger was made without the site's ledger file")
        return _read(self.site_file, SiteLedgerFile, self._site_unreadable) or SiteLedgerFile()

    def check_room(self, release: Sequence[GaussianMechanism], budget: DpBudget | None,
                   site_budget: DpBudget | None = None) -> None:
        """Raise DpBudgetExhausted when one more such release would go past a budget: checked before a
        task runs any of the job's code, so a spent budget stops training too, not only the upload."""
        with _LOCK:
            self._check_budgets(*self._with(release), budget, site_budget, "nothing of the job ran for this task")

    def charge(self, release: Sequence[GaussianMechanism], delta: float, budget: DpBudget | None,
               site_budget: DpBudget | None = None) -> DpSpend:
        """Count one release (a mechanism per gaussian_dp step of the upload) and say what it cost, at
        `delta`. Raises DpBudgetExhausted, leaving both ledgers as they were, when the job's total at
        `budget`'s delta would go past `budget`, or the site's total over all jobs past `site_budget`."""
        if not release:
            raise ValueError("a DP release has at least one gaussian_dp step")
        with _LOCK:
            before, after, site_before, site_after = self._with(release)
            self._check_budgets(before, after, site_before, site_after, budget, site_budget,
                                "the update was not sent")
            if site_after is not None:  # first: a crash before the job's write over-counts, never under-counts
                _write(self.site_file, site_after)
            _write(self.path, after)
        site_total = {} if site_budget is None else {  # at the site budget's delta: what it is checked against
            "epsilon_site_total": _json_epsilon(epsilon(site_after.counts(), site_budget.delta)),
            "site_delta": site_budget.delta, "site_releases": site_after.releases}
        return DpSpend(epsilon_round=_json_epsilon(epsilon(Counter(release), delta)),
                       epsilon_total=_json_epsilon(epsilon(after.counts(), delta)), delta=delta,
                       noise_multiplier=min(m.noise_multiplier for m in release),
                       sampling_rate=max(m.sampling_rate for m in release), releases=after.releases, **site_total)

    def _with(self, release: Sequence[GaussianMechanism]) -> tuple[LedgerFile, LedgerFile, SiteLedgerFile | None,
                                                                     SiteLedgerFile | None]:
        """The job's and the site's ledgers as they are, and as they would be with `release` counted."""
        before = self.read()
        site_before = self.read_site() if self.site_file is not None else None
        return (before, before.plus(release), site_before,
                site_before.plus(release, self.job_id) if site_before is not None else None)

    def _check_budgets(self, before: LedgerFile, after: LedgerFile, site_before: SiteLedgerFile | None,
                       site_after: SiteLedgerFile | None, budget: DpBudget | None, site_budget: DpBudget | None,
                       outcome: str) -> None:
        if budget is not None:
            _check(budget, before, after, "the job's", f"job {self.job_id}: DP budget exhausted on this site",
                   "dp_budget", outcome)
        if site_budget is not None:
            if site_before is None or site_after is None:
                raise ValueError("a site budget needs the site's ledger file")
            _check(site_budget, site_before, site_after, "this site's, all jobs together,",
                   f"job {self.job_id}: this site's DP budget for all jobs is exhausted", "dp_site_budget", outcome)

    def _unreadable(self, reason: str) -> JobRejected:
        return JobRejected(f"{self.path}: this job's DP ledger cannot be read ({reason}), so its epsilon on this "
                           "site is unknown and no DP upload is sent; restore the file from a backup, or delete "
                           "it only if you accept that the job's count of releases starts again from 0")

    def _site_unreadable(self, reason: str) -> JobRejected:
        return JobRejected(f"{self.site_file}: this site's DP ledger of all jobs cannot be read ({reason}), so the "
                           "epsilon spent on this site is unknown and no DP upload is sent; restore the file from "
                           "a backup, or delete it only if you accept that the count of every job's releases "
                           "starts again from 0 (for instance, when the site's data is entirely new)")


def _check(budget: DpBudget, before: _Releases, after: _Releases, whose: str, headline: str, setting: str,
           outcome: str) -> None:
    """Raise DpBudgetExhausted, saying `outcome`, when `after` goes past `budget` (at its delta)."""
    would_be = epsilon(after.counts(), budget.delta)
    if would_be <= budget.epsilon:
        return
    spent = epsilon(before.counts(), budget.delta)
    raise DpBudgetExhausted(
        f"{headline}: this upload would bring {whose} epsilon to {_fmt(would_be)} (at delta {budget.delta:g}, "
        f"after {after.releases} releases), past this site's budget of {budget.epsilon:g} (local/privacy.yml "
        f"{setting}); spent so far {_fmt(spent)}; {outcome}",
        budget=setting, epsilon_spent=_json_epsilon(spent), epsilon_would_be=_json_epsilon(would_be),
        budget_epsilon=budget.epsilon, delta=budget.delta, releases_so_far=before.releases)


def _read(path: Path, model: type[_R], unreadable: Callable[[str], JobRejected]) -> _R | None:
    """The ledger in `path`, None when there is none; `unreadable(reason)` is raised when it cannot be read."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise unreadable(e.strerror or str(e)) from None
    try:
        return model.model_validate(json.loads(text))
    except (ValueError, ValidationError) as e:
        reason = str(e).splitlines()[0] if not isinstance(e, ValidationError) else \
            f"field '{'.'.join(str(p) for p in e.errors()[0]['loc'])}': {e.errors()[0]['msg']}"
        raise unreadable(reason) from None


def _write(path: Path, ledger: _Releases) -> None:
    write_durably(path, ledger.model_dump_json(indent=1) + "\n")


def _json_epsilon(value: float) -> float | Literal["inf"]:
    return "inf" if value == float("inf") else value


def _fmt(value: float) -> str:
    return "infinite (a release without noise)" if value == float("inf") else f"{value:.4g}"
