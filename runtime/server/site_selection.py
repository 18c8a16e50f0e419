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


def waiting_for(meta: JobMeta, alive: Iterable[str], known: Iterable[str]) -> str:
    """Why a job cannot start now, for a person ("" when it can): how many of its sites it needs, which are
    online, and which of the sites it names this server has never heard of (`known`: its roster and every
    site that ever registered), since a misspelt name keeps a job queued until someone notices."""
    online = eligible_sites(meta, alive)
    if len(online) >= meta.min_clients:
        return ""
    which = "site" if meta.min_clients == 1 else "sites"
    text = (f"needs {meta.min_clients} {which} online, {len(online)} "
            f"{'is' if len(online) == 1 else 'are'}{': ' + ', '.join(online) if online else ''}")
    if meta.sites == "all":
        return text
    unknown = unknown_sites(meta, known)
    offline = [s for s in meta.sites if s not in unknown and s not in online]
    if offline:
        text += f"; offline: {', '.join(offline)}"
    if unknown:
        text += f"; never seen by this server (check the names): {', '.join(unknown)}"
    return text


def unknown_sites(meta: JobMeta, known: Iterable[str]) -> list[str]:
    """The sites a job names that this server has never heard of (`known`: its roster and every site that
    ever registered): most likely misspelt, and a job that can start without them would never say so."""
    if meta.sites == "all":
        return []
    seen = set(known)
    return [s for s in meta.sites if s not in seen]
