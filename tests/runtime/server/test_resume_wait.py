"""A server restarted mid-job comes back with no site online. Its first round waits (RESUME_WAIT_S) for
every site that took part to reconnect, even with `rejoin_wait_s: 0`; otherwise it started as soon as
`min_clients` sites were back, without the others, and the resumed job no longer ended with the model an
uninterrupted run would (README, "Workflows").

Driven as test_rejoin_wait.py drives a job: the real FederationService and JobController in one process,
sites as coroutines. The "restart" is a second controller, task board and registry over the same job store.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from runtime.audit import AuditLog
from runtime.job_spec import load_job_spec
from runtime.server.checkpoint import load_checkpoint
from runtime.server.controller import JobController
from runtime.server.federation import FederationService
from runtime.server.job_store import JobStore
from runtime.server.registry import Registry
from runtime.server.site_controls import SiteControls
from runtime.server.taskboard import TaskBoard
from runtime.simulate import _job_record
from runtime.weights import to_bytes
from tests.runtime.server.test_event_loop_not_blocked import _Runner, _until
from tests.runtime.server.test_rejoin_wait import HEARTBEAT_TIMEOUT_S, SITES, _rounds, _site

SPEC = {"meta.yml": "name: resume\nmin_clients: 2",
        "config_fed_client.yml": "learner: {path: a:B}",
        "config_fed_server.yml": "rounds: 2\ninitial_model: init.safetensors\nrejoin_wait_s: 0\nround_timeout_s: 120"}


class _Server:
    """One start of the server for the job: its own task board, registry and controller; the store is shared."""

    def __init__(self, store: JobStore, audit: AuditLog):
        spec = load_job_spec(SPEC)
        record = _job_record(store, spec, {"init.safetensors": to_bytes({"w": np.zeros(8, dtype=np.float32)})})
        self.registry = Registry(HEARTBEAT_TIMEOUT_S, time.monotonic)
        self.controller = JobController(record, spec, store, TaskBoard(time.monotonic), self.registry, audit,
                                        settings_max_update_factor=1.5)
        self.service = FederationService(self.registry, self.controller._board, _Runner(self.controller, store),
                                         audit, heartbeat_interval_s=0.1, max_concurrent_uploads=2,
                                         max_concurrent_downloads=3, controls=SiteControls())

    async def site(self, name: str, done: asyncio.Event, delay_s: float = 0.0, hold_round: int | None = None) -> None:
        """A site that connects after `delay_s` and answers every task, heartbeating all along; with
        `hold_round`, it holds that round's train task until `done` (so the server dies between rounds)."""
        await asyncio.sleep(delay_s)
        beats = asyncio.create_task(self._heartbeats(name, done))
        pauses = {("before", hold_round): done.wait} if hold_round is not None else {}
        try:
            await _site(self.service, name, done, pauses, set())
        finally:
            beats.cancel()

    async def _heartbeats(self, name: str, done: asyncio.Event) -> None:
        while not done.is_set():
            if (session := self.registry.session(name)) is not None:
                self.registry.touch(name, session.session_id)
            await asyncio.sleep(0.05)


def test_a_resumed_job_waits_for_every_site_that_took_part(tmp_path: Path) -> None:
    store, audit = JobStore(tmp_path / "jobs"), AuditLog(tmp_path / "audit.jsonl")

    async def until_round_1_is_checkpointed_then_the_server_dies() -> None:
        server, done = _Server(store, audit), asyncio.Event()
        # round 2 waits for the server's death: under load, the poll below once saw round 1's checkpoint only
        # after round 2 had closed too
        sites = [asyncio.create_task(server.site(name, done, hold_round=2)) for name in SITES]
        run = asyncio.create_task(server.controller.run())
        models = store.models_dir(server.controller.record.job_id)
        await asyncio.wait_for(_until(lambda: (c := load_checkpoint(models)) is not None
                                      and c.results.get("rounds_done", 0) >= 1), 60)
        run.cancel()
        done.set()
        await asyncio.gather(run, *sites, return_exceptions=True)

    async def restarted_with_site_3_back_later() -> None:
        server, done = _Server(store, audit), asyncio.Event()
        sites = [asyncio.create_task(server.site(name, done, 2.0 if name == "site-3" else 0.0)) for name in SITES]
        try:
            await asyncio.wait_for(server.controller.run(), 60)
        finally:
            done.set()
            await asyncio.gather(*sites, return_exceptions=True)

    asyncio.run(until_round_1_is_checkpointed_then_the_server_dies())
    assert _rounds(audit) == {1: SITES}
    asyncio.run(restarted_with_site_3_back_later())
    assert _rounds(audit) == {1: SITES, 2: SITES}
