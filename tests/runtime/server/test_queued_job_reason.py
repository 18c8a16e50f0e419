"""Why a queued job has not started (runtime/server/site_selection.py waiting_for, JobRunner.waiting_for): a
job whose sites are offline or misspelt says so in show_job, instead of sitting in the queue in silence."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from runtime.audit import AuditLog
from runtime.identity import Identity, Kind, Role
from runtime.job_spec import JobMeta, zip_folder
from runtime.server.job_store import JobState, JobStore
from runtime.server.registry import Registry
from runtime.server.runner import JobRunner
from runtime.server.site_selection import waiting_for
from runtime.server.taskboard import TaskBoard
from runtime.server.upload_spool import spool

TEMPLATE = Path(__file__).resolve().parents[3] / "templates" / "jobs" / "tabular_classifier"
LEAD = Identity("lead@x.org", "x", Kind.ADMIN, Role.LEAD)


def _site(name: str) -> Identity:
    return Identity(name, "x", Kind.CLIENT)


def test_a_job_that_can_start_waits_for_nothing() -> None:
    assert waiting_for(JobMeta(name="j", min_clients=2), ["a", "b"], ["a", "b"]) == ""
    assert waiting_for(JobMeta(name="j", sites=["b"]), ["a", "b"], ["a", "b"]) == ""


def test_a_job_for_any_site_says_how_many_it_needs_and_which_are_online() -> None:
    reason = waiting_for(JobMeta(name="j", min_clients=3), ["a", "b"], ["a", "b", "c"])

    assert reason == "needs 3 sites online, 2 are: a, b"


def test_a_job_naming_its_sites_says_which_are_offline_and_which_this_server_never_saw() -> None:
    meta = JobMeta(name="j", sites=["a", "c", "hopsital-2"], min_clients=3)

    reason = waiting_for(meta, ["a", "b"], ["a", "b", "c"])

    assert reason == ("needs 3 sites online, 1 is: a; offline: c; "
                      "never seen by this server (check the names): hopsital-2")


async def _submit(runner: JobRunner, tmp_path: Path, overrides: list[str]):
    job = tmp_path / "job"
    if not job.exists():
        shutil.copytree(TEMPLATE, job)

    async def data() -> AsyncIterator[bytes]:
        yield zip_folder(job)

    spooled = await spool(data(), runner.store.incoming_dir, 1 << 30)
    return await runner.submit(LEAD, spooled.path, overrides)


def test_the_runner_counts_its_roster_and_every_registered_site_as_known(tmp_path: Path) -> None:
    async def scenario() -> tuple[str, str, str]:
        registry = Registry(30.0, lambda: 0.0)
        runner = JobRunner(JobStore(tmp_path / "jobs"), TaskBoard(clock=lambda: 0.0), registry,
                           AuditLog(tmp_path / "audit.jsonl"), 1.5, roster=["site-1", "site-2"])
        record = await _submit(runner, tmp_path, ["meta.sites=[site-1,site-3,site-9]", "meta.min_clients=2"])
        before = await runner.waiting_for(record)
        registry.register(_site("site-3"))  # added with add-site: not in the server's roster, but it came
        after = await runner.waiting_for(record)
        registry.register(_site("site-1"))
        ready = await runner.waiting_for(record)
        assert record.state is JobState.QUEUED
        # the job can start now, so it waits for nothing: the misspelt name is still named (submit_job says it)
        assert await runner.unknown_sites(record) == ["site-9"]
        return before, after, ready

    before, after, ready = asyncio.run(scenario())

    assert before == ("needs 2 sites online, 0 are; offline: site-1; "
                      "never seen by this server (check the names): site-3, site-9")
    assert after == "needs 2 sites online, 1 is: site-3; offline: site-1; " \
                    "never seen by this server (check the names): site-9"
    assert ready == ""


def test_an_aborted_job_says_how_it_ended_without_repeating_its_state(tmp_path: Path) -> None:
    # wait_job printed "job J aborted: job J aborted"
    async def scenario() -> str:
        runner = JobRunner(JobStore(tmp_path / "jobs"), TaskBoard(clock=lambda: 0.0), Registry(30.0, lambda: 0.0),
                           AuditLog(tmp_path / "audit.jsonl"), 1.5, roster=["site-1"])
        record = await _submit(runner, tmp_path, [])
        return runner.abort(record.job_id).error

    assert asyncio.run(scenario()) == "stopped by abort_job before it started"
