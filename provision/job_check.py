"""`fedkit job check FOLDER [--data DIR]`: everything a site and the server would refuse in a job, found
on the researcher's machine, with no certificates and no server.

    1. the static check (runtime/job_check.py): the three configs against the schemas the server and sites
       use, the filters and the aggregator built, the workflows looked up, the files the configs name;
    2. the learner probe (provision/job_probe.py, a child process): the learner class imports, is a
       runtime.learner.Learner with train and validate, and takes the configured args; a custom
       aggregator loaded and built as the server builds it at the job's start (another child process);
    3. with --data: the site's own training worker (runtime/client/worker.py through worker_handle.py, the
       `off` sandbox) on that data folder: init (unless the job ships initial_model); the job's workflow
       chain built as the server builds it (runtime.workflows.WORKFLOWS); one validate of the model it
       sends (the key metric checked); the first round it plans sent to the worker (a train with
       FedProx/SCAFFOLD as the job asks); the result checked as the sites and the server check it; the
       job's filters over the update; submit_model when cross_site follows.

Job code runs only in child processes, each awaited with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import runtime
from runtime.aggregators.config import FedAvgConfig
from runtime.client.job_folders import JobFolders
from runtime.client.sandbox import OffSandbox
from runtime.client.worker_handle import WORKER_START_TIMEOUT_S, WorkerFailed, WorkerHandle, WorkerTimedOut, worker_env
from runtime.errors import ConfigError, FedkitError, JobRejected, UpdateRejected
from runtime.filters import apply_filters, build_filters
from runtime.job_check import Problem, check_static
from runtime.job_code import code_hash_of_zip
from runtime.job_spec import (
    CLIENT_CONFIG,
    MAX_JOB_ZIP_BYTES,
    SERVER_CONFIG,
    ClientJobConfig,
    JobSpec,
    ServerJobConfig,
    zip_folder,
)
from runtime.tasks import KeyMetricRef, TaskKind, train_fields, with_control
from runtime.weights import Weights, check_update, from_bytes, load_file, save_file
from runtime.workflows import WORKFLOWS, RoundPlan, WorkflowContext
from runtime.workflows.initial_model import GLOBAL_FILE

PROBE_TIMEOUT_S = 120.0
SITE = "job-check"
CODE_ROOT = Path(runtime.__file__).resolve().parents[1]  # holds runtime/ and provision/


@dataclass
class CheckReport:
    """What `job check` found: problems (none: ok) and, after a run on data, what train and validate said."""

    problems: list[Problem] = field(default_factory=list)
    ran: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": [p.as_dict() for p in self.problems], **({"ran": self.ran} if self.ran
                                                                                    else {})}


def check_job(folder: Path, data: Path | None = None, overrides: list[str] | None = None,
              timeout_s: float | None = None) -> CheckReport:
    """Check `folder` (and, with `data`, run it once there). Never raises for a problem of the job."""
    static = check_static(folder, overrides)
    report = CheckReport(list(static.problems) + _packaging_problems(folder))
    client: ClientJobConfig | None = static.configs.get("client")
    server: ServerJobConfig | None = static.configs.get("server")
    if data is not None and not data.is_dir():
        report.problems.append(Problem("--data", str(data), "not a folder: give a site's data folder "
                                                             "(for the tabular template: fedkit demo's data)"))
    if client is None or any(p.key == "learner.path" for p in report.problems):
        return report
    start_s = timeout_s or None  # the user's --timeout-s bounds the learner's start too, not only each step
    learner_problems = probe_learner(folder, client.learner.path, client.learner.args, start_s)
    report.problems.extend(Problem(CLIENT_CONFIG, "learner.path", line) for line in learner_problems)
    if server is not None and server.aggregator.name == "custom" and \
            not any(p.key.startswith("aggregator") for p in report.problems):
        report.problems.extend(Problem(SERVER_CONFIG, "aggregator", line)
                               for line in probe_aggregator(folder, server.aggregator.model_dump(mode="json")))
    if data is None or report.problems or server is None or static.configs.get("meta") is None:
        return report
    limit = timeout_s if timeout_s is not None else client.task_timeout_s
    spec = JobSpec(meta=static.configs["meta"], server=server, client=client)
    # as a site bounds it: the job's task_timeout_s, at most the worker start's own bound
    ready_s = start_s or min(WORKER_START_TIMEOUT_S, client.task_timeout_s)
    problems, ran = asyncio.run(_run_on_data(folder, data, spec, limit, ready_s))
    report.problems.extend(problems)
    report.ran = ran
    return report


def _packaging_problems(folder: Path) -> list[Problem]:
    """What submit_job would refuse in the folder itself: a link, a FIFO or device, an archive past the
    server's cap (its default; a server may set a lower one) or holding more files than a site takes."""
    if not folder.is_dir():
        return []  # check_static says so
    try:
        archive = zip_folder(folder)
        code_hash_of_zip(archive)
    except (ConfigError, JobRejected) as e:
        return [Problem(folder.name, "", str(e).replace(f"{folder}/", ""))]
    if len(archive) > MAX_JOB_ZIP_BYTES:
        return [Problem(folder.name, "", f"zips to {len(archive) >> 20} MiB, more than the {MAX_JOB_ZIP_BYTES >> 20} "
                                         "MiB a server takes; ship large files (models: initial_model, or "
                                         "submit_job --initial-model) or read data from the site's data_root")]
    return []


def probe_learner(folder: Path, path: str, args: dict[str, Any], timeout_s: float | None = None) -> list[str]:
    """provision.job_probe in a child process; its problems, or one line why it gave none."""
    return _probe([str(folder.resolve()), path, json.dumps(args)], f"importing {path}", timeout_s)


def probe_aggregator(folder: Path, config: dict[str, Any]) -> list[str]:
    """The job's own aggregator loaded and built as the server would, in a child process (job code)."""
    return _probe(["--aggregator", str(folder.resolve()), json.dumps(config)], f"building aggregator {config['path']}")


def _probe(args: list[str], what: str, timeout_s: float | None = None) -> list[str]:
    limit = timeout_s or PROBE_TIMEOUT_S
    with tempfile.TemporaryDirectory(prefix="fedkit-probe-") as tmp:
        env = {**worker_env(os.environ), "PYTHONPATH": str(CODE_ROOT), "HOME": tmp}
        try:
            proc = subprocess.run([sys.executable, "-m", "provision.job_probe", *args], capture_output=True,
                                  text=True, env=env, cwd=tmp, timeout=limit, check=False)
        except subprocess.TimeoutExpired:
            return [f"{what} did not finish within {limit:g} s: does the module run long work when imported, "
                    "or hang?"]
    for line in reversed(proc.stdout.splitlines()):
        try:
            return list(json.loads(line)["problems"])
        except (ValueError, KeyError, TypeError):
            continue
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return [f"{what} ended the process (exit code {proc.returncode}): {last}"]


async def _run_on_data(folder: Path, data: Path, spec: JobSpec, timeout_s: float,
                       start_timeout_s: float = WORKER_START_TIMEOUT_S) -> tuple[list[Problem], dict[str, Any]]:
    """One init/train/validate in the site's own worker, as the job's first round asks it."""
    learner = spec.client.learner
    with tempfile.TemporaryDirectory(prefix="fedkit-check-") as tmp:
        folders = JobFolders(Path(tmp) / "job")
        shutil.copytree(folder, folders.code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        folders.create()
        try:
            handle = await WorkerHandle.start(
                sandbox=OffSandbox(), python=sys.executable, kit=CODE_ROOT, folders=folders, site=SITE,
                job_id="check", data_root=str(data.resolve()), gpus=[], learner=learner.path,
                learner_args=learner.args, log_path=Path(tmp) / "worker.log", ready_timeout_s=start_timeout_s)
        except WorkerTimedOut as e:  # the constructor runs only here (the probe imports the class only)
            return [Problem(CLIENT_CONFIG, "learner", f"{_tail(e)} while starting (importing {learner.path}, "
                                                      "building the learner on the data): does its constructor "
                                                      "run long work, or hang?")], {}
        except (WorkerFailed, FedkitError) as e:
            return [Problem(CLIENT_CONFIG, "learner", f"{_tail(e)}")], {}
        try:
            return await _steps(handle, folder, folders, spec, timeout_s)
        finally:
            await handle.stop()


async def _steps(handle: WorkerHandle, folder: Path, folders: JobFolders, spec: JobSpec,
                 timeout_s: float) -> tuple[list[Problem], dict[str, Any]]:
    server, client = spec.server, spec.client
    ran: dict[str, Any] = {}
    initial = folders.inbox / "initial.safetensors"
    if server.initial_model:
        model = from_bytes((folder / server.initial_model).read_bytes())
    else:
        try:
            await handle.call_writing({"op": TaskKind.INIT}, initial, timeout_s)
        except WorkerFailed as e:
            return [Problem(CLIENT_CONFIG, "learner", f"initial_weights() failed: {_tail(e)}")], ran
        model = load_file(initial)
    ran["initial_tensors"] = len(model)
    try:
        plan = _first_plan(folder, folders.root / "server", spec, model)
    except Exception as e:  # noqa: BLE001 - a workflow refusing this job or model is the finding
        return [Problem(SERVER_CONFIG, "workflows", f"the workflow chain cannot start: {type(e).__name__}: "
                                                    f"{_tail(e)}")], ran
    sent = folders.inbox / "global.safetensors"
    save_file(with_control(plan.model if plan.model is not None else model, plan.extras), sent)
    key = server.key_metric
    # validate first: a wrong key_metric is the server config's fault, wherever else it would also show
    # (with cross_site, train validates the trained model with it too, and failed first)
    try:
        reply = await handle.call({"op": TaskKind.VALIDATE, "weights": str(sent)}, timeout_s)
    except WorkerFailed as e:
        return [Problem(CLIENT_CONFIG, "learner", f"validate failed: {_tail(e)}")], ran
    metrics = reply.get("metrics") or {}
    ran["validate"] = metrics
    if key.name not in metrics:
        return [Problem(SERVER_CONFIG, "key_metric.name",
                        f"'{key.name}' is not among the metrics validate() returned ({', '.join(sorted(metrics))}"
                        "): return it, or name one of these")], ran
    if plan.kind is TaskKind.TRAIN:
        delta_path = folders.inbox / "delta.safetensors"
        command = {"op": TaskKind.TRAIN, "weights": str(sent), "round": plan.round,
                   **train_fields(plan.algorithm, KeyMetricRef(**key.model_dump()), "cross_site" in server.workflows)}
        try:
            reply = await handle.call_writing(command, delta_path, timeout_s)
        except WorkerFailed as e:
            return [Problem(CLIENT_CONFIG, "learner", f"train failed: {_tail(e)}")], ran
        ran["train"] = {"n_samples": reply.get("n_samples"), "metrics": reply.get("metrics") or {}}
        if problem := _refused_update(load_file(delta_path), reply, plan.model if plan.model is not None else model,
                                      server.max_n_samples):
            return [problem], ran
        try:
            apply_filters(load_file(delta_path), build_filters(client.filters), np.random.default_rng(0))
        except Exception as e:  # noqa: BLE001 - a filter's arguments can still fail on this model's tensors
            return [Problem(CLIENT_CONFIG, "filters", f"the filters fail on this learner's update: "
                                                      f"{type(e).__name__}: {_tail(e)}")], ran
        if "cross_site" in server.workflows:
            try:
                await handle.call_writing({"op": TaskKind.SUBMIT_MODEL}, folders.inbox / "local.safetensors",
                                          timeout_s)
            except WorkerFailed as e:
                return [Problem(CLIENT_CONFIG, "learner", f"submit_model (cross_site) failed: {_tail(e)}")], ran
    return [], ran


def _refused_update(written: Weights, reply: dict[str, Any], model: Weights, max_n_samples: int) -> Problem | None:
    """What the sites and the server would refuse in a train result (runtime.weights.check_update, fedavg's
    sample-count bounds): a learner returning NaN or a sample count of 0 passed `job check` and then failed
    every round of the study. Judged against the model the task sent (a full model or a delta alike)."""
    n_samples = reply.get("n_samples")
    try:
        if not isinstance(n_samples, int) or n_samples <= 0:
            raise UpdateRejected(f"n_samples must be a positive whole number, got {n_samples!r}")
        if n_samples > max_n_samples:
            raise UpdateRejected(f"n_samples {n_samples} exceeds the job's max_n_samples {max_n_samples} "
                                 "(config_fed_server.yml)")
        check_update(written, model)
    except UpdateRejected as e:
        return Problem(CLIENT_CONFIG, "learner", f"train's result would be refused: {_tail(e)}")
    return None


def _first_plan(folder: Path, server_dir: Path, spec: JobSpec, model: Weights) -> RoundPlan:
    """Build every workflow of the job as the server's controller does (from the round-0 model) and return
    the first round the first one asks of the sites. A custom aggregator is job code the server runs only
    where its policy allows; it is not run here, so its job's first round is planned without it."""
    models = server_dir / "models"
    models.mkdir(parents=True)
    save_file(model, models / GLOBAL_FILE)
    server = spec.server
    if server.aggregator.name == "custom":
        spec = spec.model_copy(update={"server": server.model_copy(update={"aggregator": FedAvgConfig()})})
    ctx = WorkflowContext(job_id="check", spec=spec, job_dir=server_dir, models_dir=models,
                          append_metrics=lambda entry: None, audit=lambda *a, **k: None,
                          read_job_file=lambda name: (folder / name).read_bytes())
    chain = [WORKFLOWS[name](ctx) for name in spec.server.workflows]
    plan = chain[0].next_round()
    if plan is None:
        raise FedkitError(f"workflow '{spec.server.workflows[0]}' has nothing to do")
    return plan


def _tail(e: BaseException) -> str:
    return " ".join(str(e).split())


__all__ = ["CheckReport", "check_job", "probe_learner"]
