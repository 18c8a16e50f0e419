"""The one vocabulary of work a server asks of a site, shared by the server, the site daemon and the
training worker: a task kind names the same thing everywhere (the server posts it, the daemon runs it,
the worker gets it as its `op`), and a task's settings travel as one typed `TaskConfig`
(runtime.task_config).

    init          build the round-0 model (the learner's initial_weights)      -> whole model
    train         train on the model sent; score it on local validation first  -> delta (trained - sent)
    validate      score the model sent on local validation data                -> metrics only
    submit_model  send this site's best local model (by the job's key metric)  -> whole model
    prepare       fetch and check the job, start its worker; while another site  -> nothing (never
                  builds the round-0 model, so round 1 does not wait for every       answered)
                  site's worker to start after it

Models sent with a task may carry extra tensors a site-side algorithm needs (SCAFFOLD's server control
variates) under CONTROL_PREFIX; `split_control` separates them from the model at the edge.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Literal

CONTROL_PREFIX = "__fedkit_control__/"  # never a name a torch state_dict produces
LOCAL_FIGURES = ("steps", "lr_sum")  # what a site-side algorithm reports in a result's "local" map


class TaskKind(StrEnum):
    INIT = "init"
    TRAIN = "train"
    VALIDATE = "validate"
    SUBMIT_MODEL = "submit_model"
    PREPARE = "prepare"


# what a site sends back for each kind: the weights a result carries, if any
RESULT_WEIGHTS: dict[TaskKind, Literal["whole_model", "delta"] | None] = {
    TaskKind.INIT: "whole_model", TaskKind.TRAIN: "delta", TaskKind.VALIDATE: None,
    TaskKind.SUBMIT_MODEL: "whole_model", TaskKind.PREPARE: None,
}


# The local algorithms and the key metric are plain frozen dataclasses, and this module imports no pydantic,
# so the training worker reads them without it (about 0.1 CPU-second, a third of a worker's start, on every
# job and site); runtime.task_config.TaskConfig validates them as its fields, refusing unknown keys
# (`__pydantic_config__`), and __post_init__ checks what Python code (a custom aggregator) builds directly.
_FORBID_EXTRA = {"extra": "forbid"}


@dataclass(frozen=True, kw_only=True)
class FedProx:
    """The proximal term mu/2 * ||w - w_global||^2, added to the site's loss by fedkit (as its gradient)."""

    __pydantic_config__ = _FORBID_EXTRA
    name: Literal["fedprox"] = "fedprox"
    mu: float

    def __post_init__(self) -> None:
        if isinstance(self.mu, bool) or not isinstance(self.mu, numbers.Real):
            raise TypeError(f"mu must be a number, not {self.mu!r}")
        if not self.mu > 0:
            raise ValueError(f"mu must be greater than 0, not {self.mu}")
        object.__setattr__(self, "mu", float(self.mu))  # a NumPy scalar from a custom aggregator: JSON-ready


@dataclass(frozen=True, kw_only=True)
class Scaffold:
    """SCAFFOLD's drift correction: every local gradient gets `c - c_i` added (server's minus the site's
    control variate); the server's c comes with the model under CONTROL_PREFIX."""

    __pydantic_config__ = _FORBID_EXTRA
    name: Literal["scaffold"] = "scaffold"


LocalAlgorithm = FedProx | Scaffold


@dataclass(frozen=True, kw_only=True)
class KeyMetricRef:
    __pydantic_config__ = _FORBID_EXTRA
    name: str = "accuracy"
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not isinstance(self.higher_is_better, bool):
            raise TypeError(f"a key metric is a name and a true/false, not {self.name!r} and "
                            f"{self.higher_is_better!r}")


def train_fields(algorithm: LocalAlgorithm | None, key_metric: KeyMetricRef, keep_best_local: bool) -> dict[str, Any]:
    """The fields of the worker's `train` command that say how to train (runtime.client.worker's docstring)."""
    return {"algorithm": asdict(algorithm) if algorithm is not None else None, "key_metric": asdict(key_metric),
            "keep_best_local": keep_best_local}


def read_train_fields(command: dict[str, Any]) -> tuple[LocalAlgorithm | None, KeyMetricRef]:
    """(local algorithm, key metric) of a `train` command that `train_fields` wrote."""
    algorithm = command.get("algorithm")
    kinds: dict[str, type[FedProx] | type[Scaffold]] = {"fedprox": FedProx, "scaffold": Scaffold}
    if algorithm is not None and algorithm.get("name") not in kinds:
        raise ValueError(f"unknown local algorithm {algorithm.get('name')!r} (expected one of {', '.join(kinds)})")
    return (kinds[algorithm["name"]](**algorithm) if algorithm is not None else None,
            KeyMetricRef(**(command.get("key_metric") or {})))


def split_control(weights: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model, control variates) from a received file's tensors."""
    model = {k: v for k, v in weights.items() if not k.startswith(CONTROL_PREFIX)}
    control = {k[len(CONTROL_PREFIX):]: v for k, v in weights.items() if k.startswith(CONTROL_PREFIX)}
    return model, control


def with_control(model: dict[str, Any], control: dict[str, Any]) -> dict[str, Any]:
    return {**model, **{CONTROL_PREFIX + k: v for k, v in control.items()}}
