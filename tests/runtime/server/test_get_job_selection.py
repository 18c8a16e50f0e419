"""runtime/server/federation.py GetJob: the running job's archive goes only to the sites the job selected,
not to every registered site."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from runtime.audit import AuditLog
from runtime.errors import JobRejected
from runtime.identity import Identity, Kind
from runtime.proto import fedkit_pb2 as pb
from runtime.server.federation import FederationService
from runtime.server.job_store import JobStore
from runtime.server.registry import Registry
from runtime.server.site_controls import SiteControls
from runtime.server.taskboard import TaskBoard

JOB = "20260101-000000-abcdef"


class _Controller:
    """The parts of a running JobController GetJob looks at."""

    def __init__(self, selected: set[str]):
        self.record = SimpleNamespace(job_id=JOB)
        self._selected = selected

    def is_selected(self, site: str) -> bool:
        return site in self._selected


def _service(tmp_path: Path, selected: set[str]) -> tuple[FederationService, Registry]:
    registry = Registry(30.0, lambda: 0.0)
    store = JobStore(tmp_path / "jobs")
    store.job_dir(JOB).mkdir()
    (store.job_dir(JOB) / "job.zip").write_bytes(b"PK-the-archive")
    runner = SimpleNamespace(current=_Controller(selected), store=store)
    service = FederationService(registry, TaskBoard(clock=lambda: 0.0), runner, AuditLog(tmp_path / "a.jsonl"),
                                1.0, 2, 2, SiteControls())
    return service, registry


async def _fetch(service: FederationService, registry: Registry, site: str) -> bytes:
    peer = Identity(site, f"org-{site}", Kind.CLIENT)
    session, _ = registry.register(peer)
    chunks = [c.data async for c in service.get_job(peer, pb.GetJobRequest(session_id=session.session_id,
                                                                           job_id=JOB))]
    return b"".join(chunks)


def test_a_selected_site_gets_the_archive(tmp_path: Path) -> None:
    service, registry = _service(tmp_path, {"site-1"})

    assert asyncio.run(_fetch(service, registry, "site-1")) == b"PK-the-archive"


def test_a_registered_site_the_job_did_not_select_is_refused(tmp_path: Path) -> None:
    service, registry = _service(tmp_path, {"site-1"})

    with pytest.raises(JobRejected, match="site-9 is not one of the sites job .* runs on"):
        asyncio.run(_fetch(service, registry, "site-9"))
