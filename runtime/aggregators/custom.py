"""A job's own aggregator class, from its custom/ code: `aggregator: {name: custom, path: "mod:Class"}`.

This is job code running inside the server process, with the server's rights: the server builds one
only where its policy allows it (off by default), and that policy is the only protection. What this
module adds is hygiene, not a sandbox: the module is imported from the job's folder under a unique name
(no sys.path change, so it cannot shadow or be shadowed by another job's modules, and it must import
only installed packages, not its neighbours), and every call into it is checked, so a broken class
fails the job with one line naming the method and what was wrong instead of corrupting the model.
"""

from __future__ import annotations

import importlib.util
import re
import secrets
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FedkitError, JobRejected
from ..tasks import FedProx, LocalAlgorithm, Scaffold
from ..weights import Weights, is_float_dtype
from .base import Aggregator, Update
from .config import CustomAggregatorConfig

_PATH = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)$", re.ASCII)
PROTOCOL_METHODS = ("begin_round", "fold", "close_round", "state", "load_state", "task_extras", "local_algorithm")
_MAX_MESSAGE = 300


def load_job_aggregator(code_dir: Path, config: CustomAggregatorConfig) -> Aggregator:
    """Import `config.path` ("module:Class", module relative to `code_dir`), build it with `config.args`
    and return it wrapped in the checks. Raises JobRejected (one line) if any step fails."""
    what = f"custom aggregator '{config.path}'"
    match = _PATH.match(config.path)
    if not match:
        raise JobRejected(f"{what}: aggregator.path must be 'module:Class' (e.g. 'my_agg:MyAggregator')")
    module_name, class_name = match.groups()
    root = code_dir.resolve()
    source = (root / (module_name.replace(".", "/") + ".py")).resolve()
    if not source.is_relative_to(root) or not source.is_file():
        raise JobRejected(f"{what}: no file {module_name.replace('.', '/')}.py in the job's custom/ folder")
    unique = f"fedkit_job_aggregator_{secrets.token_hex(8)}"
    spec = importlib.util.spec_from_file_location(unique, source)
    if spec is None or spec.loader is None:
        raise JobRejected(f"{what}: {source.name} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[unique] = module  # dataclasses and typing look their module up here while it executes
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # job code calling sys.exit() must not stop the server
        sys.modules.pop(unique, None)
        raise JobRejected(f"{what}: importing {source.name} failed: {_one_line(e)}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise JobRejected(f"{what}: {source.name} defines no class {class_name}")
    missing = [m for m in PROTOCOL_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise JobRejected(f"{what}: {class_name} lacks {', '.join(missing)} of the Aggregator protocol "
                          "(runtime/aggregators/base.py)")
    try:
        instance = cls(**config.args)
        has_count = hasattr(instance, "n_folded")  # a property, or an attribute set in __init__
    except (Exception, SystemExit) as e:
        raise JobRejected(f"{what}: {class_name}(**aggregator.args) failed: {_one_line(e)}") from None
    if not has_count:
        raise JobRejected(f"{what}: {class_name} lacks n_folded of the Aggregator protocol "
                          "(runtime/aggregators/base.py)")
    return CheckedAggregator(instance, what)


def _one_line(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


class CheckedAggregator:
    """Every call into job code: its errors become one-line JobRejected (UpdateRejected from fold passes
    through: refusing one update is the protocol's own answer), and what it returns is checked."""

    def __init__(self, inner: Any, what: str):
        self._inner = inner
        self._what = what

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._inner, method)(*args)
        except FedkitError:
            raise
        except (Exception, SystemExit) as e:
            raise JobRejected(f"{self._what}: {method}() failed: {_one_line(e)}") from None

    def _bad(self, method: str, problem: str) -> JobRejected:
        return JobRejected(f"{self._what}: {method}() {problem}")

    def begin_round(self, model: Weights) -> None:
        self._call("begin_round", model)

    def fold(self, update: Update) -> None:
        self._call("fold", update)

    @property
    def n_folded(self) -> int:
        try:
            value = self._inner.n_folded
        except (Exception, SystemExit) as e:
            raise JobRejected(f"{self._what}: n_folded failed: {_one_line(e)}") from None
        if type(value) is not int or value < 0:
            raise self._bad("n_folded", f"must be an int >= 0, got {type(value).__name__}")
        return value

    def close_round(self, model: Weights) -> Weights:
        new_model = self._call("close_round", model)
        if not isinstance(new_model, dict) or new_model.keys() != model.keys():
            raise self._bad("close_round", "must return a dict with exactly the model's tensor names")
        for name, arr in new_model.items():
            ref = model[name]
            if not isinstance(arr, np.ndarray) or arr.shape != ref.shape or arr.dtype != ref.dtype:
                raise self._bad("close_round", f"returned tensor '{name}' not as the model's "
                                f"{ref.dtype}{list(ref.shape)}")
            if is_float_dtype(arr.dtype) and not np.isfinite(arr).all():
                raise self._bad("close_round", f"returned NaN or Inf in tensor '{name}'")
        return new_model

    def state(self) -> dict[str, Weights]:
        state = self._call("state")
        if not isinstance(state, dict) or not all(
                isinstance(g, str) and isinstance(t, dict) and _is_weights(t) for g, t in state.items()):
            raise self._bad("state", "must return {group name: {tensor name: numpy array}}")
        return state

    def load_state(self, state: dict[str, Weights]) -> None:
        self._call("load_state", state)

    def task_extras(self) -> Weights:
        extras = self._call("task_extras")
        if not isinstance(extras, dict) or not _is_weights(extras):
            raise self._bad("task_extras", "must return {tensor name: numpy array}")
        return extras

    def local_algorithm(self) -> LocalAlgorithm | None:
        algorithm = self._call("local_algorithm")
        if algorithm is not None and not isinstance(algorithm, FedProx | Scaffold):
            raise self._bad("local_algorithm", "must return None, runtime.tasks.FedProx or runtime.tasks.Scaffold")
        return algorithm


def _is_weights(tensors: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in tensors.items())
