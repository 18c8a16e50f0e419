"""While one site builds the round-0 model, every other eligible site is told to fetch the job and start its
worker (a `prepare` task), so round 1 does not wait for each site's worker to start after round 0. A
prepare is never answered: the round goes on without waiting for one, and round 1 is sent to every site.

Driven through the real FederationService and JobController in one process, with sites as coroutines
speaking the service's messages (test_event_loop_not_blocked.py's helpers)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import numpy as np

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
from runtime.weights import sha256_hex, to_bytes
from tests.runtime.server.test_event_loop_not_blocked import _answer, _data_chunks, _run_with_sites, _Runner, _stream

SITES = ["site-1", "site-2", "site-3", "site-4"]


async def _send_initial_model(service: FederationService, peer: Identity, session: str, task_id: str) -> None:
    model = to_bytes({"w": np.zeros(8, dtype=np.float32)})
    lease = (await service.reserve_upload(peer, pb.ReserveRequest(session_id=session, task_id=task_id,
                                                                  wait_s=5.0))).lease_id
    header = pb.ResultHeader(session_id=session, task_id=task_id, lease_id=lease, payload_bytes=len(model),
                             payload_sha256=sha256_hex(model), metrics_json=json.dumps({}))
    answer = await service.submit_result(peer, _stream([pb.ResultChunk(header=header), *_data_chunks(model)]))
    assert answer.accepted, answer.reason


async def _site(service: FederationService, name: str, done: asyncio.Event, seen: list[tuple[str, str, int]],
                job_bytes: dict[str, int], all_prepared: asyncio.Event) -> None:
    """A site that records every task it gets; builds the initial model, fetches the job when told to
    prepare (and answers nothing for it), and answers train and validate tasks. The builder takes as long as
    the others need to get their prepare (up to 10 s): a real one trains or loads a model meanwhile, and a
    prepare still unfetched when round 0 ends is withdrawn (the site then starts its worker in round 1)."""
    peer = Identity(name, f"org-{name}", Kind.CLIENT)
    session = (await service.register(peer, pb.RegisterRequest(host_info_json="{}"))).session_id
    while not done.is_set():
        messages = [m async for m in service.get_task(peer, pb.GetTaskRequest(session_id=session, wait_s=0.05))]
        if messages[0].WhichOneof("kind") != "header":
            continue
        header = messages[0].header
        seen.append((name, header.task_name, header.round))
        if header.task_name == "init":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_prepared.wait(), 10)
            await _send_initial_model(service, peer, session, header.task_id)
        elif header.task_name == "prepare":
            request = pb.GetJobRequest(session_id=session, job_id=header.job_id)
            job_bytes[name] = sum([len(c.data) async for c in service.get_job(peer, request)])
            if sum(task == "prepare" for _, task, _ in seen) == len(SITES) - 1:
                all_prepared.set()
        else:
            await _answer(service, peer, session, messages)


def test_the_other_sites_prepare_the_job_while_one_builds_the_initial_model(tmp_path: Path) -> None:
    spec = load_job_spec({"meta.yml": "name: prepare\nmin_clients: 4",
                          "config_fed_client.yml": "learner: {path: a:B}",
                          "config_fed_server.yml": "rounds: 2\nround_timeout_s: 60"})
    store = JobStore(tmp_path / "jobs")
    record = _job_record(store, spec, {})
    audit = AuditLog(tmp_path / "audit.jsonl")
    board, registry = TaskBoard(time.monotonic), Registry(30.0, time.monotonic)
    controller = JobController(record, spec, store, board, registry, audit, settings_max_update_factor=1.5)
    service = FederationService(registry, board, _Runner(controller, store), audit, heartbeat_interval_s=0.1,
                                max_concurrent_uploads=2, max_concurrent_downloads=4, controls=SiteControls())
    seen: list[tuple[str, str, int]] = []
    job_bytes: dict[str, int] = {}

    async def run() -> None:
        all_prepared = asyncio.Event()
        await _run_with_sites(controller, registry, SITES, lambda done: [
            _site(service, n, done, seen, job_bytes, all_prepared) for n in SITES], 60)

    asyncio.run(run())

    (builder,) = [site for site, task, _ in seen if task == "init"]
    prepared = sorted(site for site, task, _ in seen if task == "prepare")
    assert prepared == sorted(set(SITES) - {builder}), "every other site, once, and not the builder"
    assert all(rnd == 0 for _, task, rnd in seen if task == "prepare")
    first_train = next(i for i, (_, task, _) in enumerate(seen) if task == "train")
    assert all(i < first_train for i, (_, task, _) in enumerate(seen) if task == "prepare"), \
        "prepared during round 0, before round 1"
    assert all(n > 0 for n in job_bytes.values()) and sorted(job_bytes) == prepared, "a prepared site may fetch the job"
    rounds = [json.loads(line) for line in (store.job_dir(record.job_id) / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(m["sites"]) for m in rounds if m["type"] == "round"] == [SITES, SITES], \
        "unanswered prepares hold up no round, and every site trains"
