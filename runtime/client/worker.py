"""The training worker: one process per job on a site, running the job's learner on the site's data.

The daemon starts it and speaks JSON lines: commands on stdin, one reply per command on the process's
original stdout. Anything the learner prints goes to stderr (the site's log), so it can never corrupt
the reply channel. Weights move through safetensors files, never pickle: the daemon's inbox (read-only
here) in, the outbox out; the daemon checks every reply and result file (it runs in a sandbox, see sandbox.py).
Op names are runtime.tasks.TaskKind values.

    {"op": "init", "out": PATH}                       -> {"ok": true}
    {"op": "validate", "weights": PATH}               -> {"ok": true, "metrics": {...}}
    {"op": "train", "weights": PATH, "round": R, "out": PATH,
     "algorithm": null | {"name": "fedprox", "mu": 0.01} | {"name": "scaffold"},      (tasks.LocalAlgorithm)
     "key_metric": {"name": "auc", "higher_is_better": true}, "keep_best_local": false,
     "release": INODE}                    (optional: the model trained on last time, see "held")
        -> {"ok": true, "n_samples": N, "metrics": {...}, "validation": {...},
            "local": {"steps": K, "lr_sum": L},    (counted while an algorithm runs; {} without one)
            "local_validation": {...},             (with keep_best_local: the trained model, scored here)
            "scalars": [[name, step, value], ...]} (what the learner logged with context.log_scalar)
       (validation scores the received weights first; out holds the delta: trained minus received;
        with "release", "held": whether this process still maps or holds open that file: if not, the
        daemon writes a later model over it, reused_files.SpareModel)
    {"op": "submit_model", "out": PATH}               -> {"ok": true}  (this site's best local model by the
        key metric among those trained with keep_best_local, else the last one trained)
    {"op": "stop"}                                    -> exits

The weights of train and validate may carry tensors under tasks.CONTROL_PREFIX (SCAFFOLD's server control
variate); they are split off before the learner sees the model (local_algorithms.py uses them).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FedkitError
from ..file_reuse import held_here
from ..heap import tune_malloc
from ..learner import Learner, LearnerError, SiteContext
from ..procs import die_with_parent
from ..scalar_log import ScalarLog
from ..tasks import KeyMetricRef, TaskKind, read_train_fields, split_control
from ..weights import Weights, is_float_dtype, map_file, save_file

TRAIN_RESULT_FILE = ".train-result"  # in the outbox: each train result is written over the last, then linked


def _load_learner(job_dir: Path, path: str, args: dict[str, Any], context: SiteContext) -> Learner:
    for folder in (job_dir / "custom", job_dir):
        if folder.is_dir():
            sys.path.insert(0, str(folder))
    module_name, _, class_name = path.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise AttributeError(f"module '{module_name}' has no class '{class_name}'")
    learner = cls(context, **args)
    if not isinstance(learner, Learner):
        raise TypeError(f"{path} is not a runtime.learner.Learner")
    return learner


def _delta(trained: dict, received: dict) -> dict:
    return {k: (trained[k] - received[k]).astype(received[k].dtype, copy=False)
            if is_float_dtype(received[k].dtype) or received[k].dtype.kind == "c" else trained[k] for k in trained}


def _key_score(scores: dict[str, float], key: KeyMetricRef) -> float:
    if key.name not in scores:
        raise LearnerError(f"the job's key metric '{key.name}' is not among the metrics validate() returned "
                           f"({', '.join(sorted(scores)) or 'none'}): return it, or name one of these as "
                           "the job's key metric")
    return scores[key.name]


class SiteState:
    """The weights this site last trained, and its best trained ones by the job's key metric (when the job
    keeps the best), for `submit_model`; with each, the names of the global model it was trained from (what
    the federation shares; a site's policy may keep others local)."""

    def __init__(self) -> None:
        self.weights: Weights | None = None
        self.shared_names: frozenset[str] | None = None
        self.best: Weights | None = None
        self.best_shared_names: frozenset[str] | None = None
        self.best_score: float | None = None

    def offer(self, scores: dict[str, float], key: KeyMetricRef) -> None:
        """Keep the weights last trained as the best if they score better than the best so far (ties keep
        the earlier). Copied: a learner may hand out views of tensors its next round changes."""
        score = _key_score(scores, key)
        better = self.best_score is None or (score > self.best_score if key.higher_is_better
                                             else score < self.best_score)
        if better and self.weights is not None:
            self.best = {k: np.array(v, copy=True) for k, v in self.weights.items()}
            self.best_shared_names, self.best_score = self.shared_names, score

    def submitted(self) -> Weights:
        """The shared tensors of the best model kept, else of the last trained."""
        weights, shared = ((self.best, self.best_shared_names) if self.best is not None
                           else (self.weights, self.shared_names))
        if weights is None:
            raise LearnerError("this site has not trained in this job, so it has no local model to submit")
        names = shared or frozenset(weights)
        return {k: v for k, v in weights.items() if k in names}


def _filled(received: dict, learner: Learner, local: SiteState) -> dict:
    """`received` plus the tensors it lacks, taken from this site's own weights (last trained, else the
    learner's initial ones). A site whose privacy policy excludes a tensor never sends it, so it can be
    missing from the global model; it then stays local here instead of breaking training."""
    if local.weights is not None:
        own = local.weights
    else:
        try:  # only until this site has trained once
            own = learner.initial_weights()
        except NotImplementedError:
            return received
    missing = {k: v for k, v in own.items() if k not in received}
    return {**received, **missing} if missing else received


def _applied(received: Weights, delta: Weights, loaded: frozenset[str]) -> Weights:
    """received + delta: the model this site trained. Added in place into the tensors loaded from the
    received file (this process's own buffer, no longer needed once the delta is saved), so the worker
    holds no third copy of the model; a new array for the others (kept-local tensors, which may be the
    learner's own) and wherever the delta's dtype differs."""
    out: Weights = {}
    for k, r in received.items():
        d = delta.get(k)
        if d is None:
            out[k] = r
        elif k in loaded and d.dtype == r.dtype and d.shape == r.shape and r.flags.writeable:
            out[k] = np.add(r, d, out=r)
        else:
            out[k] = r + d
    return out


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _received(path: Path) -> tuple[Weights, Weights]:
    """(model, control variates) of a received weights file."""
    return split_control(map_file(path))  # the daemon's file: read in place, copied only where written


def _train(learner: Learner, cmd: dict[str, Any], local: SiteState, is_main: bool) -> dict[str, Any]:
    global_in, control = _received(Path(cmd["weights"]))
    received = _filled(global_in, learner, local)
    round_ = int(cmd["round"])
    algorithm, key_metric = read_train_fields(cmd)
    # the global model is scored on local validation data before training changes the learner
    validation = _numbers(learner.validate(received))
    if cmd.get("keep_best_local"):
        _key_score(validation, key_metric)  # a missing key metric fails before training, not after
    run = None
    if algorithm is not None:
        from .local_algorithms import LocalRun  # torch only where an algorithm runs

        run = LocalRun(algorithm, learner, global_in, control, round_, is_main)
        with run.hooked():
            result = learner.train(received, round_)
    else:
        result = learner.train(received, round_)
    delta = result.weights if result.is_delta else _delta(result.weights, received)
    local_report = run.finish(delta) if run is not None else {}
    local.shared_names = frozenset(global_in)
    if is_main:  # kept-local names stay here; written over the last round's result (save_file's `reuse`)
        out = Path(cmd["out"])
        save_file({k: v for k, v in delta.items() if k in global_in}, out, reuse=out.parent / TRAIN_RESULT_FILE)
    local.weights = _applied(received, delta, frozenset(global_in)) if result.is_delta else result.weights
    reply = {"ok": True, "n_samples": int(result.n_samples), "validation": validation,
             "metrics": _numbers(result.metrics), "local": local_report}
    if cmd.get("keep_best_local"):
        reply["local_validation"] = _numbers(learner.validate(local.weights))
        local.offer(reply["local_validation"], key_metric)
    return reply


def handle(learner: Learner, cmd: dict[str, Any], local: SiteState | None = None,
           is_main: bool = True) -> dict[str, Any]:
    """Run one command. Under torchrun every rank runs it; only the main rank (0) writes files. The reply
    carries the scalars the learner logged since the last one (`"scalars": [[name, step, value], ...]`)."""
    context = getattr(learner, "context", None)
    sink = context.scalars if isinstance(context, SiteContext) else None
    try:
        reply = _handle(learner, cmd, local, is_main)
    finally:
        points = sink.take() if sink is not None else []  # a failed task's points go nowhere
    if points and reply.get("ok"):
        reply["scalars"] = [list(p) for p in points]
    return reply


def _handle(learner: Learner, cmd: dict[str, Any], local: SiteState | None, is_main: bool) -> dict[str, Any]:
    local = local if local is not None else SiteState()
    save = save_file if is_main else (lambda weights, path: None)
    op = cmd.get("op")
    if op == TaskKind.SUBMIT_MODEL:
        save(local.submitted(), Path(cmd["out"]))
        return {"ok": True}
    if op == TaskKind.INIT:
        save(learner.initial_weights(), Path(cmd["out"]))
        return {"ok": True}
    if op == TaskKind.VALIDATE:
        model, _ = _received(Path(cmd["weights"]))  # control variates mean nothing to validation
        return {"ok": True, "metrics": _numbers(learner.validate(_filled(model, learner, local)))}
    if op == TaskKind.TRAIN:
        return _train(learner, cmd, local, is_main)
    raise ValueError(f"unknown op {op!r}")


def _one_line(e: Exception) -> str:
    """fedkit's own errors are one line meant for a person already; anything else gets its class name."""
    return str(e) if isinstance(e, FedkitError) else f"{type(e).__name__}: {e}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedkit-worker")
    p.add_argument("--job-dir", type=Path, required=True)
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--job-id", required=True)
    p.add_argument("--data-root", default="")
    p.add_argument("--gpus", default="")
    p.add_argument("--learner", required=True, help="module:Class")
    p.add_argument("--learner-args", default="{}", help="JSON object")
    p.add_argument("--scalar-steps", default="{}", help="JSON object: each scalar's last step in this job so far")
    a = p.parse_args(argv)

    die_with_parent()
    tune_malloc()
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # from here on, print() lands in the log, not in the reply channel
    ranks = Ranks.from_env()  # one process, or one rank of several started by torchrun
    context = SiteContext(site=a.site, job_id=a.job_id, data_root=Path(a.data_root) if a.data_root else None,
                          work_dir=a.work_dir, gpus=tuple(int(g) for g in a.gpus.split(",") if g),
                          rank=ranks.rank, world_size=ranks.world_size,
                          scalars=ScalarLog(last_steps=json.loads(a.scalar_steps)))
    error = ""
    try:
        learner = _load_learner(a.job_dir, a.learner, json.loads(a.learner_args), context)
    except Exception as e:
        traceback.print_exc()
        error = f"cannot load learner {a.learner}: {type(e).__name__}: {e}"
    error = ranks.combine_errors(error)
    if ranks.is_main:
        reply.write(json.dumps({"ok": False, "error": error} if error else {"ok": True, "ready": True}) + "\n")
    if error:
        return 1
    local = SiteState()
    while (cmd := ranks.next_command(sys.stdin)) is not None and cmd.get("op") != "stop":
        answer, error = {}, ""
        try:
            answer = handle(learner, cmd, local, ranks.is_main)
            if "release" in cmd and answer.get("ok"):  # may the daemon write a later model over that file?
                answer["held"] = ranks.world_size > 1 or held_here(int(cmd["release"]))  # other ranks: unseen
        except Exception as e:  # the learner is researcher code: report, keep serving
            traceback.print_exc()
            error = _one_line(e)
        error = ranks.combine_errors(error)
        if ranks.is_main:
            reply.write(json.dumps({"ok": False, "error": error} if error else answer) + "\n")
    ranks.close()
    return 0


class Ranks:
    """The worker's processes: one, or `world_size` ranks under torchrun (several GPUs).

    Rank 0 reads the daemon's commands and hands each to the other ranks over a gloo group of this site's
    own processes, as JSON bytes in a tensor (no pickle); every rank runs it, and only rank 0 answers.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, group: Any = None):
        self.rank, self.world_size, self._group = rank, world_size, group

    @classmethod
    def from_env(cls) -> Ranks:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        import datetime as dt

        import torch
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") else "gloo"
        dist.init_process_group(backend, timeout=dt.timedelta(hours=2))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return cls(dist.get_rank(), world_size, dist.new_group(backend="gloo"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def next_command(self, stdin: Any) -> dict[str, Any] | None:
        if self.world_size == 1:
            line = stdin.readline()
            return json.loads(line) if line else None
        line = stdin.readline() if self.is_main else ""
        text = self._broadcast_text(line or '{"op": "stop"}' if self.is_main else "")
        return json.loads(text)

    def _broadcast_text(self, text: str) -> str:
        import torch
        import torch.distributed as dist

        data = text.encode()
        size = torch.tensor([len(data)], dtype=torch.long)
        dist.broadcast(size, 0, group=self._group)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_main
               else torch.empty(int(size.item()), dtype=torch.uint8))
        dist.broadcast(buf, 0, group=self._group)
        return bytes(buf.numpy()).decode()

    def combine_errors(self, error: str) -> str:
        """Rank 0's view of whether any rank failed (the others' tracebacks are in the site log)."""
        if self.world_size == 1:
            return error
        import torch
        import torch.distributed as dist

        failed = torch.tensor([1 if error else 0], dtype=torch.long)
        dist.all_reduce(failed, group=self._group)
        if failed.item() and not error:
            return f"{int(failed.item())} of {self.world_size} training ranks failed (see the site log)"
        return error

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
