"""The probes `fedkit job check` runs in a child process:

- the learner's: import the job's learner class the way the site's worker does (custom/ and the job folder
  on sys.path) and check it against the contract of runtime/learner.py, without building it (its
  constructor may need the site's data);
- a custom aggregator's: load and build it exactly as the server does at the job's start
  (runtime.aggregators.custom.load_job_aggregator: the class, the protocol's methods, its args).

    python -m provision.job_probe JOB_DIR MODULE:CLASS ARGS_JSON        -> one JSON line: {"problems": [...]}
    python -m provision.job_probe --aggregator JOB_DIR AGGREGATOR_JSON  -> the same

It is a separate process because the job's module runs code on import: whatever it does (exit, print,
hang, crash) stays out of the command line that asked, which waits for it with a deadline. Its prints go
to stderr; the answer goes to the original stdout.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

from runtime.learner import Learner, SiteContext

CONTRACT = "runtime.learner.Learner"


def probe(job_dir: Path, path: str, args: dict[str, Any]) -> list[str]:
    """One line per way `path` breaks the learner contract (empty: it keeps it)."""
    for folder in (job_dir / "custom", job_dir):
        if folder.is_dir():
            sys.path.insert(0, str(folder))
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except BaseException as e:  # noqa: BLE001 - job code: SystemExit and all are its answer
        return [f"'{module_name}' does not import: {type(e).__name__}: {e}"]
    cls = getattr(module, class_name, None)
    if cls is None:
        return [f"module '{module_name}' has no class '{class_name}'"]
    if not (isinstance(cls, type) and issubclass(cls, Learner)):
        return [f"{path} is not a subclass of {CONTRACT} (from runtime.learner import Learner)"]
    problems = []
    for method, params in (("train", ("weights", "round")), ("validate", ("weights",))):
        if method in getattr(cls, "__abstractmethods__", ()):
            problems.append(f"{path} has no {method}({', '.join(params)}) method: implement it (see {CONTRACT})")
            continue
        try:
            inspect.signature(getattr(cls, method)).bind(None, *params)
        except TypeError:
            problems.append(f"{path}.{method} must accept ({', '.join(params)}) (see {CONTRACT})")
    try:
        inspect.signature(cls).bind(SiteContext("probe", "probe", None, job_dir), **args)
    except TypeError as e:
        problems.append(f"{path} cannot take the learner args {sorted(args)}: {e}")
    return problems


def probe_aggregator(job_dir: Path, config: dict[str, Any]) -> list[str]:
    """The line the server would refuse the job's own aggregator with at the job's start (empty: none)."""
    from runtime.aggregators.config import CustomAggregatorConfig
    from runtime.aggregators.custom import load_job_aggregator
    from runtime.errors import JobRejected
    from runtime.job_spec import CUSTOM_DIR

    try:
        load_job_aggregator(job_dir / CUSTOM_DIR, CustomAggregatorConfig(**config))
    except JobRejected as e:
        return [str(e)]
    return []


def main(argv: list[str]) -> int:
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the job's prints land on stderr, never in the answer
    if argv[0] == "--aggregator":
        problems = probe_aggregator(Path(argv[1]), json.loads(argv[2]))
    else:
        problems = probe(Path(argv[0]), argv[1], json.loads(argv[2]))
    reply.write(json.dumps({"problems": problems}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
