"""Per-admin limits on stored jobs: how many, and how many bytes (archives plus outputs), counted over
every job the admin submitted that is still on disk, queued or finished. Without them one admin's
submissions fill the server's disk for everyone. Pure counting over the job store; no state kept."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import JobRejected
from .job_store import JobStore

FREE_HINT = "free it with delete_job JOB_ID on jobs you no longer need (list_jobs shows them)"


@dataclass(frozen=True)
class JobQuota:
    max_jobs: int = 100
    max_bytes: int = 20 << 30

    def check(self, store: JobStore, submitter: str, new_bytes: int) -> None:
        """Raise JobRejected if storing one more job of `new_bytes` would pass a limit of `submitter`'s.
        With new_bytes 0 only the job count is checked (before an upload is even read)."""
        own = [r for r in store.all() if r.submitter == submitter]
        if len(own) >= self.max_jobs:
            raise JobRejected(f"quota: {submitter} has {len(own)} jobs stored (limit {self.max_jobs} per admin); "
                              f"{FREE_HINT}")
        if not new_bytes:
            return
        used = sum(store.stored_bytes(r.job_id) for r in own)
        if used + new_bytes > self.max_bytes:
            raise JobRejected(f"quota: {submitter}'s jobs use {used} bytes and this one {new_bytes} more (limit "
                              f"{self.max_bytes} bytes per admin); {FREE_HINT}")
