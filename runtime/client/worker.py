"""The training worker: one process per job on a site, running the job's learner on the site's data.

The daemon starts it and speaks JSON lines: commands on stdin, one reply per command on the process's
original stdout. Anything the learner prints goes to stderr (the site's log), so it can never corrupt
the reply channel. Weights move through safetensors files in the job's work folder, never pickle.

    {"op": "init", "out": PATH}                       -> {"ok": true}
    {"op": "validate", "weights": PATH}               -> {"ok": true, "metrics": {...}}
    {"op": "train", "weights": PATH, "round": R, "out": PATH}
                                  -> {"ok": true, "n_samples": N, "metrics": {...}, "validation": {...}}
       (validation scores the received weights first; out holds the delta: trained minus received)
    {"op": "local_model", "out": PATH}                -> {"ok": true}  (the weights last trained here)
    {"op": "stop"}                                    -> exits
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

from ..learner import Learner, SiteContext
from ..procs import tune_malloc
from ..weights import load_file, save_file


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
            if received[k].dtype.kind in "fc" else trained[k] for k in trained}


class _LocalModel:
    """The weights this site last trained, kept for cross-site validation (`local_model`)."""

    weights: dict | None = None


def handle(learner: Learner, cmd: dict[str, Any], local: _LocalModel | None = None) -> dict[str, Any]:
    local = local if local is not None else _LocalModel()
    op = cmd.get("op")
    if op == "local_model":
        if local.weights is None:
            raise RuntimeError("this site has not trained in this job, so it has no local model")
        save_file(local.weights, Path(cmd["out"]))
        return {"ok": True}
    if op == "init":
        save_file(learner.initial_weights(), Path(cmd["out"]))
        return {"ok": True}
    if op == "validate":
        metrics = learner.validate(load_file(Path(cmd["weights"])))
        return {"ok": True, "metrics": {k: float(v) for k, v in metrics.items()}}
    if op == "train":
        received = load_file(Path(cmd["weights"]))
        # the global model is scored on local validation data before training changes the learner
        validation = {k: float(v) for k, v in learner.validate(received).items()}
        result = learner.train(received, int(cmd["round"]))
        delta = result.weights if result.is_delta else _delta(result.weights, received)
        local.weights = ({k: received[k] + delta[k] if k in delta else received[k] for k in received}
                         if result.is_delta else result.weights)
        save_file(delta, Path(cmd["out"]))
        return {"ok": True, "n_samples": int(result.n_samples), "validation": validation,
                "metrics": {k: float(v) for k, v in result.metrics.items()}}
    raise ValueError(f"unknown op {op!r}")


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
    a = p.parse_args(argv)

    tune_malloc()
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # from here on, print() lands in the log, not in the reply channel
    context = SiteContext(site=a.site, job_id=a.job_id, data_root=Path(a.data_root) if a.data_root else None,
                          work_dir=a.work_dir, gpus=tuple(int(g) for g in a.gpus.split(",") if g))
    try:
        learner = _load_learner(a.job_dir, a.learner, json.loads(a.learner_args), context)
    except Exception as e:
        traceback.print_exc()
        error = f"cannot load learner {a.learner}: {type(e).__name__}: {e}"
        reply.write(json.dumps({"ok": False, "error": error}) + "\n")
        return 1
    reply.write(json.dumps({"ok": True, "ready": True}) + "\n")
    local = _LocalModel()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "stop":
            break
        try:
            answer = handle(learner, cmd, local)
        except Exception as e:  # the learner is researcher code: report, keep serving
            traceback.print_exc()
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
