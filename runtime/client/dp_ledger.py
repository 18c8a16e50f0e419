"""The site's count of a job's differentially private releases: workspace/jobs/<job>/dp_ledger.json.

Every upload that goes through gaussian_dp (train deltas, the round-0 model, a local model for cross-site
validation) is one release; the job's total epsilon on this site is the accountant's over all of them,
each with the noise and sampling rate it actually used (runtime.privacy_accounting). The ledger is what
makes that total survive a restart of the site: it is read and rewritten (atomically, fsynced) for every
release, *before* the weights are written for upload, so a release can be counted and not sent (a crash,
a refused upload) but never sent and not counted. A task the server re-sends after its own restart is
trained and released again, and counts again: it left the site again.

With a budget (local/privacy.yml dp_budget) a release that would take the total past it is refused before
anything is written to send, and the ledger is left as it was.

The file sits in the job's folder, next to code/, scratch/, inbox/ and outbox/, none of which it is in:
the job's worker never sees it. A ledger that cannot be read is never taken as zero: the job's DP uploads
fail with a line saying what to do, until site IT restores or removes the file.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import DpBudgetExhausted, JobRejected
from ..privacy_accounting import GaussianMechanism, epsilon
from ..privacy_report import MAX_RELEASES, DpSpend
from .privacy_policy import DpBudget

LEDGER_FILE = "dp_ledger.json"
_LOCK = threading.Lock()  # one writer per process; the daemon runs one task at a time anyway


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LedgerEntry(_Strict):
    noise_multiplier: float = Field(ge=0, allow_inf_nan=False)
    sampling_rate: float = Field(gt=0, le=1)
    count: int = Field(ge=1)


class LedgerFile(_Strict):
    format: Literal[1] = 1
    job_id: str
    releases: int = Field(0, ge=0, le=MAX_RELEASES)
    mechanisms: list[LedgerEntry] = Field(default_factory=list)

    def counts(self) -> Counter[GaussianMechanism]:
        return Counter({GaussianMechanism(e.noise_multiplier, e.sampling_rate): e.count for e in self.mechanisms})

    def plus(self, release: Sequence[GaussianMechanism]) -> LedgerFile:
        counts = self.counts() + Counter(release)
        return LedgerFile(job_id=self.job_id, releases=self.releases + 1, mechanisms=[
            LedgerEntry(noise_multiplier=m.noise_multiplier, sampling_rate=m.sampling_rate, count=n)
            for m, n in sorted(counts.items())])


class DpLedger:
    """One job's ledger on this site."""

    def __init__(self, job_root: Path, job_id: str) -> None:
        self.path = job_root / LEDGER_FILE
        self.job_id = job_id

    def read(self) -> LedgerFile:
        """The releases counted so far (none when the file does not exist). Raises JobRejected, one line,
        when the file exists and cannot be read or belongs to another job."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return LedgerFile(job_id=self.job_id)
        except OSError as e:
            raise self._unreadable(e.strerror or str(e)) from None
        try:
            ledger = LedgerFile.model_validate(json.loads(text))
        except (ValueError, ValidationError) as e:
            reason = str(e).splitlines()[0] if not isinstance(e, ValidationError) else \
                f"field '{'.'.join(str(p) for p in e.errors()[0]['loc'])}': {e.errors()[0]['msg']}"
            raise self._unreadable(reason) from None
        if ledger.job_id != self.job_id:
            raise self._unreadable(f"it is the ledger of job {ledger.job_id!r}")
        return ledger

    def charge(self, release: Sequence[GaussianMechanism], delta: float, budget: DpBudget | None) -> DpSpend:
        """Count one release (a mechanism per gaussian_dp step of the upload) and say what it cost, at
        `delta`. Raises DpBudgetExhausted, leaving the ledger as it was, when the total at the budget's
        delta would go past the budget."""
        if not release:
            raise ValueError("a DP release has at least one gaussian_dp step")
        with _LOCK:
            before = self.read()
            after = before.plus(release)
            if budget is not None:
                would_be = epsilon(after.counts(), budget.delta)
                if would_be > budget.epsilon:
                    spent = epsilon(before.counts(), budget.delta)
                    raise DpBudgetExhausted(
                        f"job {self.job_id}: DP budget exhausted on this site: this upload would bring the job's "
                        f"epsilon to {_fmt(would_be)} (at delta {budget.delta:g}, after {after.releases} "
                        f"releases), past this site's budget of {budget.epsilon:g} (local/privacy.yml dp_budget); "
                        f"spent so far {_fmt(spent)}; the update was not sent",
                        epsilon_spent=_json_epsilon(spent), epsilon_would_be=_json_epsilon(would_be),
                        budget_epsilon=budget.epsilon, delta=budget.delta, releases_so_far=before.releases)
            self._write(after)
        return DpSpend(epsilon_round=_json_epsilon(epsilon(Counter(release), delta)),
                       epsilon_total=_json_epsilon(epsilon(after.counts(), delta)), delta=delta,
                       noise_multiplier=min(m.noise_multiplier for m in release),
                       sampling_rate=max(m.sampling_rate for m in release), releases=after.releases)

    def _write(self, ledger: LedgerFile) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as f:
            f.write(ledger.model_dump_json(indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    def _unreadable(self, reason: str) -> JobRejected:
        return JobRejected(f"{self.path}: this job's DP ledger cannot be read ({reason}), so its epsilon on this "
                           "site is unknown and no DP upload is sent; restore the file from a backup, or delete "
                           "it only if you accept that the job's count of releases starts again from 0")


def _json_epsilon(value: float) -> float | Literal["inf"]:
    return "inf" if value == float("inf") else value


def _fmt(value: float) -> str:
    return "infinite (a release without noise)" if value == float("inf") else f"{value:.4g}"
