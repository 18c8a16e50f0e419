"""A study simulated in one process: the real server controller, workflows and aggregators, with each
site's learner run in-process on its own data through the training worker's own command handler.

What is left out is everything between the two: no TLS, kits, sandbox, site privacy policy or network. With
`apply_filters=True` the job's own filters run as a site without a privacy policy runs them
(runtime.client.outgoing): on every train delta, on the round-0 model a site builds, on the local models it
submits for cross-site validation, with each release counted in a DP ledger per site and its report (epsilon
included) in the job's metrics. It is
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
import shutil
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .audit import AuditLog
from .client import outgoing
from .client.dp_ledger import DpLedger
from .client.privacy_policy import EffectiveChain, PrivacyPolicy
from .client.worker import SiteState, handle
from .errors import FedkitError
from .identity import Identity, Kind
from .job_spec import JobSpec, sha256_hex, spec_to_json
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
                   filter_seed: int = 0, overrides: list[str] | None = None,
                   load_aggregator: Callable[[Any], Any] | None = None) -> SimulationResult:
    """Run (or resume) the job in `folder` with one in-process site per learner, or with the sites of a
    `SitePool` (runtime/simulate_pool.py: the learners live in worker processes). `job_files`: files of the
    job folder (initial_model, evaluate_models). `interrupt_after_results`: stop the server abruptly once
    this many results were accepted (a crash mid-round), leaving the job resumable. `site_states`: the
    sites' worker state, kept by the caller across an interruption (as a site's worker outlives a server
    restart; in-process learners only, a pool keeps its own). `apply_filters`: run the job's client filters
    (config_fed_client.yml `filters:`) on everything a site sends, as a real site does (runtime.client.outgoing:
    train deltas, the round-0 model, models submitted for cross-site validation), with a NumPy generator seeded
    by `filter_seed` and the site's name, DP releases counted per site (under `folder`/dp/). These are the
    job's filters only; a real site's privacy floor (its privacy policy) may add more. `overrides`: the
    `--set` lines the spec was built with, kept in the record with the config hash, as submit_job keeps
    them. `load_aggregator`: builds the job's custom aggregator (the person's own code, on their machine).

    Results are folded in arrival order, as on a real server: with several sites training at once the
    order varies between runs, so the global model is reproducible to float tolerance, not bit for bit."""
    # a bad filter fails here, once; a site without a privacy policy applies the job's filters as they are
    chain = PrivacyPolicy().chain_for(JOB_ID, spec.client.filters) if apply_filters else None
    store = JobStore(folder)
    record = _job_record(store, spec, job_files or {}, overrides or [])
    record.started_at = record.started_at or time.time()  # as the server's runner records it
    audit = AuditLog(folder / "audit.jsonl")
    board, registry = TaskBoard(time.monotonic), Registry(1e9, time.monotonic)
    states = site_states if site_states is not None else {}
    pool = learners if isinstance(learners, SitePool) else InProcessSites(learners, states)
    for site in pool.sites:
        registry.register(Identity(site, "simulated", Kind.CLIENT))
    controller = JobController(record, spec, store, board, registry, audit, settings_max_update_factor=1.5,
                               load_aggregator=load_aggregator)
    accepted = asyncio.Event()
    counter = {"results": 0}

    async def serve(site: str) -> None:
        rng = np.random.default_rng([filter_seed, zlib.crc32(site.encode())])
        dp_dir = folder / "dp" / site  # kept across a resume, as a site's ledger is
        ledger = DpLedger(dp_dir, JOB_ID, dp_dir / "all_jobs.json")
        if chain is not None:
            dp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"fedkit-sim-{site}-") as tmp:
            while True:
                task = await board.next_for(site, POLL_S)
                if task is None or task.name == TaskKind.PREPARE:  # in-process learners need no start
                    continue
                board.claim(task.task_id, site)
                running = asyncio.ensure_future(_run_task(pool, site, task, Path(tmp), chain, rng, ledger))
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
        try:
            run.result()  # raises the job's failure
        except Exception as e:  # the record says so, as a real server's does ('running' was left behind)
            record.state, record.error, record.finished_at = JobState.FAILED, str(e), time.time()
            store.save(record)
            raise
        record.state, record.finished_at = JobState.FINISHED, time.time()
        store.save(record)
        await asyncio.to_thread(draw_curves, store.job_dir(JOB_ID), spec.server.key_metric.name)
        return SimulationResult(record, store.job_dir(JOB_ID))
    finally:
        for task in [*sites, interrupt]:
            task.cancel()
        await asyncio.gather(*sites, interrupt, return_exceptions=True)


def _job_record(store: JobStore, spec: JobSpec, job_files: dict[str, bytes],
                overrides: list[str] | None = None) -> JobRecord:
    if (store.job_dir(JOB_ID) / "record.json").exists():
        return store.load(JOB_ID)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in job_files.items():
            zf.writestr(name, data)
    spec_json = spec_to_json(spec)  # the same hash a server gives the same settings (runtime.server.runner)
    record = JobRecord(job_id=JOB_ID, name=spec.meta.name, state=JobState.RUNNING, submitter="simulation",
                       submitter_org="", submitter_role="", submitted_at=time.time(), job_sha256="",
                       config_hash=sha256_hex(spec_json.encode())[:16], overrides=list(overrides or []),
                       rounds_total=spec.server.rounds)
    return store.create(archive.getvalue(), spec_json, record)


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


async def _run_task(pool: SitePool, site: str, task: Task, tmp: Path, chain: EffectiveChain | None,
                    rng: np.random.Generator, ledger: DpLedger) -> tuple[int, dict[str, Any], str, bytearray | None]:
    """One task on one site, as the site daemon and its worker do it (`chain`: the job's filters, on every
    upload, or None)."""
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
    if kind is TaskKind.TRAIN and Path(command["weights"]).exists():  # the reference a submitted model is
        await asyncio.to_thread(shutil.copyfile, command["weights"], tmp / LAST_GLOBAL)  # filtered against
    wire_dtype = TaskConfig.model_validate(task.config).wire_dtype
    try:
        payload, wire, privacy = await asyncio.to_thread(_result_payload, kind, Path(command["out"]), tmp, chain,
                                                         rng, ledger, wire_dtype)
    except FedkitError as e:  # weights the privacy step cannot read, a spent budget: this task fails
        return 0, {}, str(e), None
    if wire:
        metrics["wire"] = wire
    if privacy is not None:
        metrics["privacy"] = privacy
    return int(reply.get("n_samples", 0)), metrics, "", payload


LAST_GLOBAL = "last_global.safetensors"


def _result_payload(kind: TaskKind, out: Path, tmp: Path, chain: EffectiveChain | None, rng: np.random.Generator,
                    ledger: DpLedger, wire_dtype: str = "float32"
                    ) -> tuple[bytearray | None, dict[str, float], dict[str, Any] | None]:
    """What a site sends back: the weights through the job's filters (as runtime.client.outgoing prepares
    them on a site), then the wire codec; the codec's error, and the privacy report."""
    if not (RESULT_WEIGHTS[kind] and out.exists()):
        return None, {}, None
    privacy = None
    if chain is not None:
        sent = out.with_name("sent.safetensors")
        report = outgoing.prepare(kind, out, sent, chain, rng, tmp / LAST_GLOBAL, ledger=ledger)
        privacy, out = report.model_dump(mode="json", exclude_none=True), sent
    payload = bytearray(out.read_bytes())
    if wire_dtype == "float32" or kind is not TaskKind.TRAIN:  # a site encodes its training updates only
        return payload, {}, privacy
    encoded, error = encode(from_bytes(payload), wire_dtype)
    return bytearray(to_bytes(encoded)), error.as_metrics(), privacy


__all__ = ["InProcessSites", "SimulationResult", "SitePool", "SiteTaskFailed", "simulate"]
