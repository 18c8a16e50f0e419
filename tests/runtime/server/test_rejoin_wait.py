"""`server.rejoin_wait_s`: a round waits that long for a site of the job that went offline (a reboot, a
reconnect) instead of going on without it, both during the round (the site went silent before answering)
and at the next round's start (it took part before and is offline now). Which sites answer a round is then
the study's doing, not the machine's speed: a restarted site that is back within the wait takes part.

Driven through the real FederationService and JobController in one process, with sites as coroutines
speaking the service's messages (test_event_loop_not_blocked.py's helpers), and a registry that counts a
site dead 0.3 s after its last sign of life.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from runtime.audit import AuditLog
from runtime.identity import Identity, Kind
from runtime.job_spec import load_job_spec
from runtime.proto import fedkit_pb2 as pb
from runtime.server.controller import JobController
from runtime.server.federation import FederationService
from runtime.server.job_store import JobStore
from runtime.server.registry import Registry
from runtime.server.site_controls import SiteControls
from runtime.server.taskboard import TaskBoard
from runtime.simulate import _job_record
from runtime.weights import to_bytes
from tests.runtime.server.test_event_loop_not_blocked import _answer, _run_with_sites, _Runner, _until

SITES = ["site-1", "site-2", "site-3"]
HEARTBEAT_TIMEOUT_S = 0.3
# When the coming-and-going site goes away: ("before" | "after" answering, train round) -> returns once it
# may come back (it then registers again, as a restarted daemon does)
Pauses = dict[tuple[str, int], Callable[[], Awaitable[None]]]


async def _site(service: FederationService, name: str, done: asyncio.Event, pauses: Pauses, silent: set[str],
                declines: bool = False) -> None:
    """A site that answers every task, and goes silent where `pauses` says: before answering a train task
    (its task is then re-sent when it registers again) or after. One that `declines` takes part in round 1,
    then refuses the whole job (restarted with a stricter policy): its later tasks get a declining failure."""
    peer = Identity(name, f"org-{name}", Kind.CLIENT)
    session = (await service.register(peer, pb.RegisterRequest(host_info_json="{}"))).session_id

    async def away(when: str, round_: int) -> bool:
        pause = pauses.pop((when, round_), None)
        if pause is not None:
            silent.add(name)
            await pause()
            silent.discard(name)
        return pause is not None

    while not done.is_set():
        messages = [m async for m in service.get_task(peer, pb.GetTaskRequest(session_id=session, wait_s=0.05))]
        if messages[0].WhichOneof("kind") != "header":
            continue
        header = messages[0].header
        if declines and header.round > 1:
            await _decline(service, peer, session, header)
            continue
        if header.task_name == "train" and await away("before", header.round):
            session = (await service.register(peer, pb.RegisterRequest(host_info_json="{}"))).session_id
            continue  # its unanswered task is sent again
        await _answer(service, peer, session, messages)
        if header.task_name == "train" and await away("after", header.round):
            session = (await service.register(peer, pb.RegisterRequest(host_info_json="{}"))).session_id


async def _decline(service: FederationService, peer: Identity, session: str, header: pb.TaskHeader) -> None:
    reply = pb.ResultHeader(session_id=session, task_id=header.task_id, metrics_json="{}", declines_job=True,
                            error="site policy refuses job: its code hash is not in approved_hashes")

    async def one():
        yield pb.ResultChunk(header=reply)
    await service.submit_result(peer, one())


def _run_job(tmp_path: Path, rejoin_wait_s: float, make_pauses: Callable[[Registry, AuditLog], Pauses],
             rounds: int = 2, declining: str = "") -> AuditLog:
    initial = to_bytes({"w": np.zeros(8, dtype=np.float32)})
    spec = load_job_spec({"meta.yml": "name: rejoin\nmin_clients: 2",
                          "config_fed_client.yml": "learner: {path: a:B}",
                          "config_fed_server.yml": f"rounds: {rounds}\ninitial_model: init.safetensors\n"
                                                   f"rejoin_wait_s: {rejoin_wait_s}\nround_timeout_s: 120"})
    store = JobStore(tmp_path / "jobs")
    record = _job_record(store, spec, {"init.safetensors": initial})
    audit = AuditLog(tmp_path / "audit.jsonl")
    board, registry = TaskBoard(time.monotonic), Registry(HEARTBEAT_TIMEOUT_S, time.monotonic)
    controller = JobController(record, spec, store, board, registry, audit, settings_max_update_factor=1.5)
    service = FederationService(registry, board, _Runner(controller, store), audit, heartbeat_interval_s=0.1,
                                max_concurrent_uploads=2, max_concurrent_downloads=3, controls=SiteControls())
    pauses = make_pauses(registry, audit)

    silent: set[str] = set()

    async def keep_alive(name: str, done: asyncio.Event) -> None:
        """A site's heartbeats while it is not away (its polls alone leave gaps while it answers)."""
        while not done.is_set():
            session = registry.session(name)
            if session is not None and name not in silent:
                registry.touch(name, session.session_id)
            await asyncio.sleep(0.05)

    asyncio.run(_run_with_sites(controller, registry, SITES, lambda done: [
        *(_site(service, n, done, pauses if n == "site-3" else {}, silent, declines=n == declining) for n in SITES),
        *(keep_alive(n, done) for n in SITES)], 120))
    return audit


def _rounds(audit: AuditLog) -> dict[int, list[str]]:
    return {r["round"]: r["sites"] for r in audit.tail(500) if r["event"] == "round_done"}


def _accepted_trains(audit: AuditLog) -> int:
    return sum(1 for r in audit.tail(500) if r["event"] == "result_accepted" and r.get("task") == "train")


def _dead_and(registry: Registry, condition: Callable[[], bool]) -> Callable[[], Awaitable[None]]:
    async def pause() -> None:
        await _until(lambda: not registry.is_alive("site-3") and condition())
        await asyncio.sleep(1.0)  # > the controller's tick: it has looked at the round again meanwhile
    return pause


def test_a_site_silent_mid_round_is_waited_for_and_answers_the_same_round(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runtime.server.controller")
    # silent until it counts dead and both other sites' updates are in: without the wait, round 1 would
    # close now, without it
    audit = _run_job(tmp_path, rejoin_wait_s=60, make_pauses=lambda registry, audit: {
        ("before", 1): _dead_and(registry, lambda: _accepted_trains(audit) >= 2)})
    assert _rounds(audit) == {1: SITES, 2: SITES}
    assert not [r for r in audit.tail(500) if r["event"] == "site_timed_out"]
    # the server's log says so while it waits (the audit records only a site that never came back)
    gone = [r.getMessage() for r in caplog.records if " is gone " in r.getMessage()]
    assert len(gone) == 1 and "site-3 is gone (it went silent (no heartbeat for" in gone[0], gone
    assert "it has 60 s to come back" in gone[0]


def test_a_round_starts_once_a_site_that_took_part_is_back(tmp_path: Path) -> None:
    # offline from the end of round 1 until round 2 would have started without it
    audit = _run_job(tmp_path, rejoin_wait_s=60, make_pauses=lambda registry, audit: {
        ("after", 1): _dead_and(registry, lambda: 1 in _rounds(audit))})
    assert _rounds(audit) == {1: SITES, 2: SITES}


def test_without_a_rejoin_wait_a_round_goes_on_without_a_silent_site(tmp_path: Path) -> None:
    audits: list[AuditLog] = []

    async def back_after_round_1() -> None:
        await _until(lambda: 1 in _rounds(audits[0]))

    def pauses(registry: Registry, audit: AuditLog) -> Pauses:
        audits.append(audit)
        return {("before", 1): back_after_round_1}

    audit = _run_job(tmp_path, rejoin_wait_s=0, make_pauses=pauses)
    rounds = _rounds(audit)
    assert rounds[1] == SITES[:2]
    assert set(SITES[:2]) <= set(rounds[2])  # site-3 is in round 2 only if it registered before it started
    assert [(r["site"], r["round"]) for r in audit.tail(500) if r["event"] == "site_timed_out"] == [("site-3", 1)]


def test_a_site_gone_for_good_is_waited_for_once_not_every_round(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runtime.server.controller")
    audit = _run_job(tmp_path, rejoin_wait_s=2, rounds=4, make_pauses=lambda registry, audit: {
        ("after", 1): _dead_and(registry, lambda: 4 in _rounds(audit))})
    assert _rounds(audit) == {1: SITES, 2: SITES[:2], 3: SITES[:2], 4: SITES[:2]}
    went_on = [r.getMessage() for r in caplog.records if "goes on without" in r.getMessage()]
    # one round's start waited for it (round 2, or round 3 when it was still counted alive at round 2's
    # start and went silent in it); rounds 4 (and 3) started without waiting
    assert len(went_on) == 1 and "site-3" in went_on[0], went_on


def test_a_site_that_declined_the_job_is_not_waited_for_as_offline(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    # it took part, then refused the job while online: later rounds leave it out at once, neither waiting
    # rejoin_wait_s for it as if it were away nor saying it is offline
    caplog.set_level(logging.INFO, logger="runtime.server.controller")
    audit = _run_job(tmp_path, rejoin_wait_s=60, rounds=3, make_pauses=lambda registry, audit: {},
                     declining="site-3")
    assert _rounds(audit) == {1: SITES, 2: SITES[:2], 3: SITES[:2]}
    assert [(r["site"]) for r in audit.tail(500) if r["event"] == "site_declined"] == ["site-3"]
    assert not [r.getMessage() for r in caplog.records if "goes on without" in r.getMessage()]
