"""The server's event loop is never blocked by the heavy parts of a round: no fsync (audit records, the
model, the checkpoint) runs on it, and no single callback spends long on its CPU (serializing, hashing or
copying a whole model) while several sites download the model and upload their updates at once.

Driven through the real FederationService and JobController in one process (the gRPC adapter is left
out: it only turns RPCs into these calls). The sites here are coroutines that speak the service's
messages. The bound is on the loop thread's CPU time per callback (time.thread_time), not wall time,
so a busy machine does not make it flaky; a whole-model operation on the loop (a 32 MB model: 60-90
milliseconds of CPU) goes over it.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
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
from runtime.transport import CHUNK_BYTES
from runtime.weights import sha256_hex, to_bytes, view_bytes

P = 8_000_000  # float32: a 32 MB model
SITES = ["site-1", "site-2", "site-3"]
MAX_CALLBACK_CPU_S = 0.05  # serializing or hashing the 32 MB model in one callback takes 60-90 ms


class _Runner:
    """What FederationService asks of the job runner: the job that is running, and its store (where
    large updates are spooled)."""

    def __init__(self, controller: JobController, store: JobStore):
        self.current = controller
        self.store = store

    def controller_for(self, job_id: str) -> JobController:
        return self.current


class _LoopWatch:
    """The CPU time of every callback the loop runs, and every fsync made on the loop's thread."""

    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()
        self.worst_s, self.worst_what = 0.0, ""
        self.fsyncs_on_loop: list[str] = []
        self.active = True  # off once the job is over: the sites' teardown is not the server's work

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        run, fsync = asyncio.events.Handle._run, os.fsync

        def timed_run(handle: asyncio.events.Handle) -> None:
            started = time.thread_time()
            try:
                run(handle)
            finally:
                spent = time.thread_time() - started
                if self.active and spent > self.worst_s:
                    self.worst_s, self.worst_what = spent, _describe(handle)

        def watched_fsync(fd: int) -> None:
            if threading.get_ident() == self.loop_thread:
                self.fsyncs_on_loop.append(os.readlink(f"/proc/self/fd/{fd}"))
            fsync(fd)

        monkeypatch.setattr(asyncio.events.Handle, "_run", timed_run)
        monkeypatch.setattr(os, "fsync", watched_fsync)


def _describe(handle: asyncio.events.Handle) -> str:
    """The task a callback stepped, and where it stopped next (the await after the work)."""
    task = getattr(handle._callback, "__self__", None)
    if not isinstance(task, asyncio.Task):
        return repr(handle)[:200]
    where, coro = [], task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            where.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return f"task {task.get_name()}, stopped at " + " > ".join(where)


async def _site(service: FederationService, name: str, done: asyncio.Event) -> None:
    peer = Identity(name, f"org-{name}", Kind.CLIENT)
    session = (await service.register(peer, pb.RegisterRequest(host_info_json="{}"))).session_id
    while not done.is_set():
        messages = []
        async for m in service.get_task(peer, pb.GetTaskRequest(session_id=session, wait_s=0.2)):
            messages.append(m)
            await asyncio.sleep(0)  # as gRPC's writes do: the other sites' transfers interleave
        if messages[0].WhichOneof("kind") != "header":
            continue
        await _answer(service, peer, session, messages)


async def _answer(service: FederationService, peer: Identity, session: str, messages: list) -> None:
    """Answer the task in `messages` (its header, then the model): a validation score, or a train update of
    +0.5 on every weight, as a site would send them."""
    header = messages[0].header
    received = await asyncio.to_thread(_joined, messages[1:])
    if header.task_name != "train":
        reply = pb.ResultHeader(session_id=session, task_id=header.task_id,
                                metrics_json=json.dumps({"validation": {"accuracy": 0.5}}))
        await service.submit_result(peer, _stream([pb.ResultChunk(header=reply)]))
        return
    delta = await asyncio.to_thread(_half_delta, received)
    lease = (await service.reserve_upload(peer, pb.ReserveRequest(session_id=session, task_id=header.task_id,
                                                                  wait_s=5.0))).lease_id
    reply = pb.ResultHeader(session_id=session, task_id=header.task_id, n_samples=10, lease_id=lease,
                            metrics_json=json.dumps({"train": {"loss": 1.0}}), payload_bytes=len(delta))
    chunks = [pb.ResultChunk(header=reply), *await asyncio.to_thread(_data_chunks, delta)]
    answer = await service.submit_result(peer, _stream(chunks))
    assert answer.accepted, answer.reason


def _joined(messages: list[pb.TaskChunk]) -> bytes:
    return b"".join(m if isinstance(m, bytes) else m.data for m in messages)  # joining copies: not on the loop


def _half_delta(model: bytes) -> bytes:
    return to_bytes({k: np.full_like(v, 0.5) for k, v in view_bytes(model).items()})


def _data_chunks(delta: bytes) -> list[pb.ResultChunk]:
    chunks = [pb.ResultChunk(data=delta[i:i + CHUNK_BYTES]) for i in range(0, len(delta), CHUNK_BYTES)]
    return [*chunks, pb.ResultChunk(sha256=sha256_hex(delta))]


async def _stream(messages: list[pb.ResultChunk]) -> AsyncIterator[pb.ResultChunk]:
    for m in messages:
        yield m
        await asyncio.sleep(0)  # as a network stream would: the other sites' transfers interleave


def test_no_fsync_and_no_long_callback_on_the_loop_during_a_round(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    initial = to_bytes({"w": np.zeros(P, dtype=np.float32), "b": np.zeros(1, dtype=np.float32)})
    spec = load_job_spec({"meta.yml": f"name: loop\nmin_clients: {len(SITES)}",
                          "config_fed_client.yml": "learner: {path: a:B}",
                          "config_fed_server.yml": "rounds: 2\ninitial_model: init.safetensors"})
    store = JobStore(tmp_path / "jobs")
    record = _job_record(store, spec, {"init.safetensors": initial})
    audit = AuditLog(tmp_path / "audit.jsonl")
    board, registry = TaskBoard(time.monotonic), Registry(1e9, time.monotonic)
    controller = JobController(record, spec, store, board, registry, audit, settings_max_update_factor=1.5)
    service = FederationService(registry, board, _Runner(controller, store), audit, heartbeat_interval_s=5.0,
                                max_concurrent_uploads=2, max_concurrent_downloads=3, controls=SiteControls())
    watch = _LoopWatch()

    async def main() -> None:
        watch.loop_thread = threading.get_ident()
        done = asyncio.Event()
        sites = [asyncio.create_task(_site(service, name, done)) for name in SITES]
        try:
            for name in SITES:  # registered before the job starts
                await asyncio.wait_for(_until(lambda n=name: registry.is_alive(n)), 30)
            watch.install(monkeypatch)
            await asyncio.wait_for(controller.run(), 300)
        finally:
            watch.active = False
            done.set()
            await asyncio.gather(*sites, return_exceptions=True)

    asyncio.run(main())
    global_w = store.models_dir(record.job_id) / "global.safetensors"
    assert view_bytes(global_w.read_bytes())["w"][0] == pytest.approx(1.0)  # two rounds of +0.5: it ran
    accepted = [r["task"] for r in audit.tail(100) if r["event"] == "result_accepted"]
    assert accepted.count("train") == 2 * len(SITES) and accepted.count("validate") == len(SITES)
    assert watch.fsyncs_on_loop == [], f"fsync on the event loop: {watch.fsyncs_on_loop}"
    assert watch.worst_s < MAX_CALLBACK_CPU_S, (f"a loop callback spent {watch.worst_s * 1e3:.0f} ms of CPU "
                                                 f"(bound {MAX_CALLBACK_CPU_S * 1e3:.0f} ms): {watch.worst_what}")


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def _run_with_sites(controller: JobController, registry: Registry, sites: list[str],
                          start: Callable[[asyncio.Event], list[Coroutine]], timeout_s: float) -> None:
    """Start the site coroutines `start(done)` makes, wait until every site is registered, run the job
    within `timeout_s`, then stop the sites."""
    done = asyncio.Event()
    tasks = [asyncio.create_task(c) for c in start(done)]
    try:
        for name in sites:
            await asyncio.wait_for(_until(lambda n=name: registry.is_alive(n)), 30)
        await asyncio.wait_for(controller.run(), timeout_s)
    finally:
        done.set()
        await asyncio.gather(*tasks, return_exceptions=True)
