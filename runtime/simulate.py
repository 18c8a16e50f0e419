"""A study simulated in one process: the real server controller, workflows and aggregators, with each
site's learner run in-process on its own data through the training worker's own command handler.

What is left out is everything between the two: no TLS, kits, sandbox, site privacy policy or network (the
job's own filters run on each train delta with `apply_filters=True`). It is
for trying an algorithm on local data splits before a real study, for the workflow and controller tests
(no gRPC), and for the guide's measured tables (bench/workflows.py). It is not a security boundary: the
job's learner runs in this process.

    result = asyncio.run(simulate(spec, {"site-1": learner_1, "site-2": learner_2}, Path("sim")))
    result.record.final_metrics, result.global_model, result.cross_site

Calling it again on the same folder after an interruption (`interrupt_after_results`) resumes the job
from its checkpoint, as a restarted server does; the sites' learners and their files live on, as a real
site's worker would.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import tempfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .audit import AuditLog
from .client.worker import SiteState, handle
from .errors import FedkitError
from .filters import Filter, build_filters
from .filters import apply_filters as run_filters
from .identity import Identity, Kind
from .job_spec import JobSpec, spec_to_json
from .learner import Learner
from .quantize import decode, encode
from .server.controller import JobController
from .server.job_store import JobRecord, JobState, JobStore
from .server.registry import Registry
from .server.taskboard import Task, TaskBoard
from .server.tracker import draw_curves
from .task_config import TaskConfig
from .tasks import RESULT_WEIGHTS, TaskKind, train_fields
from .weights import Weights, from_bytes, load_file, save_file, to_bytes

JOB_ID = "simulated"
POLL_S = 1.0  # a site wakes on the board's event when a task comes; this only bounds each wait
# FedProx/SCAFFOLD hook torch.optim process-wide while a site trains (runtime/client/local_algorithms.py); a
# real site is its own process, here the sites share one, so a train task with an algorithm runs alone
_ALGORITHM_TRAINING = threading.Lock()


class SiteTaskFailed(FedkitError):
    """A site's learner failed a task in a pool process; the message is the worker's one line."""


@dataclass
class SimulationResult:
    record: JobRecord
    folder: Path                      # the job's folder, as on a server: models/, metrics.jsonl, cross_site.*
    interrupted: bool = False

    @property
    def global_model(self) -> Weights:
        return load_file(self.folder / "models" / "global.safetensors")

    @property
    def cross_site(self) -> dict[str, Any] | None:
        path = self.folder / "cross_site.json"
        return json.loads(path.read_text()) if path.exists() else None

    @property
    def metrics(self) -> list[dict[str, Any]]:
        path = self.folder / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def simulate(spec: JobSpec, learners: dict[str, Learner] | SitePool, folder: Path, *,
                   job_files: dict[str, bytes] | None = None, interrupt_after_results: int | None = None,
                   site_states: dict[str, SiteState] | None = None, apply_filters: bool = False,
                   filter_seed: int = 0) -> SimulationResult:
    """Run (or resume) the job in `folder` with one in-process site per learner, or with the sites of a
    `SitePool` (runtime/simulate_pool.py: the learners live in worker processes). `job_files`: files of the
    job folder (initial_model, evaluate_models). `interrupt_after_results`: stop the server abruptly once
    this many results were accepted (a crash mid-round), leaving the job resumable. `site_states`: the
    sites' worker state, kept by the caller across an interruption (as a site's worker outlives a server
    restart; in-process learners only, a pool keeps its own). `apply_filters`: run the job's client filters
    (config_fed_client.yml `filters:`) on each train delta before the server gets it, with a NumPy generator
    seeded by `filter_seed` and the site's name. These are the job's filters only; a real site's privacy
    floor (its privacy policy) may add more, and a real site also filters the models it submits for
    cross-site validation, which this does not.

    Results are folded in arrival order, as on a real server: with several sites training at once the
    order varies between runs, so the global model is reproducible to float tolerance, not bit for bit."""
    filters = build_filters(spec.client.filters) if apply_filters else []  # a bad filter fails here, once
    store = JobStore(folder)
    record = _job_record(store, spec, job_files or {})
    record.started_at = record.started_at or time.time()  # as the server's runner records it
    audit = AuditLog(folder / "audit.jsonl")
    board, registry = TaskBoard(time.monotonic), Registry(1e9, time.monotonic)
    states = site_states if site_states is not None else {}
    pool = learners if isinstance(learners, SitePool) else InProcessSites(learners, states)
    for site in pool.sites:
        registry.register(Identity(site, "simulated", Kind.CLIENT))
    controller = JobController(record, spec, store, board, registry, audit, settings_max_update_factor=1.5)
    accepted = asyncio.Event()
    counter = {"results": 0}

    async def serve(site: str) -> None:
        rng = np.random.default_rng([filter_seed, zlib.crc32(site.encode())])
        with tempfile.TemporaryDirectory(prefix=f"fedkit-sim-{site}-") as tmp:
            while True:
                task = await board.next_for(site, POLL_S)
                if task is None or task.name == TaskKind.PREPARE:  # in-process learners need no start
                    continue
                board.claim(task.task_id, site)
                running = asyncio.ensure_future(_run_task(pool, site, task, Path(tmp), filters, rng))
                try:
                    n_samples, metrics, error, payload = await asyncio.shield(running)
                except asyncio.CancelledError:
                    # the learner runs in a thread, which a cancel does not stop: let it finish writing
                    # into `tmp` before the folder goes, or a file it writes late outlives the simulation
                    await asyncio.wait([running])
                    raise
                with contextlib.suppress(FedkitError):  # a refused update fails only that site's round
                    await controller.accept_result(task, n_samples, metrics, error, payload)
                counter["results"] += 1
                if interrupt_after_results is not None and counter["results"] >= interrupt_after_results:
                    accepted.set()

    sites = [asyncio.create_task(serve(site)) for site in pool.sites]
    run = asyncio.create_task(controller.run())
    interrupt = asyncio.create_task(accepted.wait())
    try:
        await asyncio.wait({run, interrupt}, return_when=asyncio.FIRST_COMPLETED)
        if not run.done():  # the "server" dies here, mid-round, as a killed process would
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            return SimulationResult(record, store.job_dir(JOB_ID), interrupted=True)
        run.result()  # raises the job's failure
        record.state, record.finished_at = JobState.FINISHED, time.time()
        store.save(record)
        await asyncio.to_thread(draw_curves, store.job_dir(JOB_ID), spec.server.key_metric.name)
        return SimulationResult(record, store.job_dir(JOB_ID))
    finally:
        for task in [*sites, interrupt]:
            task.cancel()
        await asyncio.gather(*sites, interrupt, return_exceptions=True)


def _job_record(store: JobStore, spec: JobSpec, job_files: dict[str, bytes]) -> JobRecord:
    if (store.job_dir(JOB_ID) / "record.json").exists():
        return store.load(JOB_ID)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in job_files.items():
            zf.writestr(name, data)
    record = JobRecord(job_id=JOB_ID, name=spec.meta.name, state=JobState.RUNNING, submitter="simulation",
                       submitter_org="", submitter_role="", submitted_at=time.time(), job_sha256="",
                       config_hash="", rounds_total=spec.server.rounds)
    return store.create(archive.getvalue(), spec_to_json(spec), record)


@runtime_checkable
class SitePool(Protocol):
    """Where the sites' learners run: `run` carries out one worker command (runtime/client/worker.py's ops
    and reply) for one site, and raises with the learner's error as its message."""

    @property
    def sites(self) -> list[str]: ...

    async def run(self, site: str, command: dict[str, Any]) -> dict[str, Any]: ...


class InProcessSites:
    """The learners in this process, each task in a thread (the event loop stays free for the controller)."""

    def __init__(self, learners: dict[str, Learner], states: dict[str, SiteState]):
        self._learners, self._states = learners, states

    @property
    def sites(self) -> list[str]:
        return list(self._learners)

    async def run(self, site: str, command: dict[str, Any]) -> dict[str, Any]:
        state = self._states.setdefault(site, SiteState())
        return await asyncio.to_thread(_handle, self._learners[site], command, state)


def _handle(learner: Learner, command: dict[str, Any], state: SiteState) -> dict[str, Any]:
    with _ALGORITHM_TRAINING if command.get("algorithm") is not None else contextlib.nullcontext():
        return handle(learner, command, state)


def task_command(task: Task, tmp: Path) -> dict[str, Any]:
    """The worker command for `task`, as a site daemon sends it: weights in and out through files in `tmp`."""
    kind, config = TaskKind(task.name), TaskConfig.model_validate(task.config)
    received, out = tmp / "received.safetensors", tmp / "out.safetensors"
    out.unlink(missing_ok=True)
    if task.payload.nbytes:
        received.write_bytes(task.payload.read_all())
        if config.wire_dtype != "float32":  # as the daemon does before its worker sees the model
            save_file(decode(load_file(received)), received)
    return {"op": kind.value, "weights": str(received), "out": str(out), "round": task.round,
            **train_fields(config.algorithm, config.key_metric, config.keep_best_local)}


async def _run_task(pool: SitePool, site: str, task: Task, tmp: Path, filters: list[Filter],
                    rng: np.random.Generator) -> tuple[int, dict[str, Any], str, bytearray | None]:
    """One task on one site, as the site daemon and its worker do it (`filters` on train deltas only)."""
    kind = TaskKind(task.name)
    command = await asyncio.to_thread(task_command, task, tmp)
    try:
        reply = await pool.run(site, command)
    except Exception as e:  # the learner is researcher code: its failure is the site's answer
        return 0, {}, str(e) if isinstance(e, SiteTaskFailed) else f"{type(e).__name__}: {e}", None
    if kind is TaskKind.VALIDATE:
        return 0, {"validation": reply["metrics"]}, "", None
    metrics = {k: reply[k] for k in ("validation", "local", "local_validation", "scalars") if reply.get(k)}
    if "metrics" in reply and kind is TaskKind.TRAIN:
        metrics["train"] = reply["metrics"]
    wire_dtype = TaskConfig.model_validate(task.config).wire_dtype
    payload, wire = await asyncio.to_thread(_result_payload, kind, Path(command["out"]), filters, rng, wire_dtype)
    if wire:
        metrics["wire"] = wire
    return int(reply.get("n_samples", 0)), metrics, "", payload


def _result_payload(kind: TaskKind, out: Path, filters: list[Filter], rng: np.random.Generator,
                    wire_dtype: str = "float32") -> tuple[bytearray | None, dict[str, float]]:
    """What a site sends back: its job's filters on a train delta, then the wire codec; and the codec's error."""
    payload = bytearray(out.read_bytes()) if RESULT_WEIGHTS[kind] and out.exists() else None
    if payload is not None and filters and kind is TaskKind.TRAIN:
        payload = bytearray(to_bytes(run_filters(load_file(out), filters, rng)))
    if payload is None or wire_dtype == "float32":
        return payload, {}
    encoded, error = encode(from_bytes(payload), wire_dtype)
    return bytearray(to_bytes(encoded)), error.as_metrics()


__all__ = ["InProcessSites", "SimulationResult", "SitePool", "SiteTaskFailed", "simulate"]
