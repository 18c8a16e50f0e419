"""Which sites a job runs on: the one place that decides it (the scheduler, to start a job, and the
controller, for every round)."""

from __future__ import annotations

from collections.abc import Iterable

from ..job_spec import JobMeta


def eligible_sites(meta: JobMeta, alive: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    """The online sites the job may task, in the registry's order: named by meta.sites (or any, for
    "all"), minus `exclude`."""
    skip = set(exclude)
    return [s for s in alive if (meta.sites == "all" or s in meta.sites) and s not in skip]


def enough_sites(meta: JobMeta, alive: Iterable[str]) -> bool:
    """Whether a job could start now: at least meta.min_clients of its sites are online."""
    return len(eligible_sites(meta, alive)) >= meta.min_clients
