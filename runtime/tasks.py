"""The one vocabulary of work a server asks of a site, shared by the server, the site daemon and the
training worker: a task kind names the same thing everywhere (the server posts it, the daemon runs it,
the worker gets it as its `op`), and a task's settings travel as one typed `TaskConfig`.

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

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CONTROL_PREFIX = "__fedkit_control__/"  # never a name a torch state_dict produces


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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FedProx(_Strict):
    """The proximal term mu/2 * ||w - w_global||^2, added to the site's loss by fedkit (as its gradient)."""

    name: Literal["fedprox"] = "fedprox"
    mu: float = Field(gt=0)


class Scaffold(_Strict):
    """SCAFFOLD's drift correction: every local gradient gets `c - c_i` added (server's minus the site's
    control variate); the server's c comes with the model under CONTROL_PREFIX."""

    name: Literal["scaffold"] = "scaffold"


LocalAlgorithm = FedProx | Scaffold


class KeyMetricRef(_Strict):
    name: str = "accuracy"
    higher_is_better: bool = True


class TaskConfig(_Strict):
    """What a task says besides its kind, round and weights. Built by the server, decoded by the daemon."""

    job_name: str = ""
    workflow: str = ""                    # the workflow that posted it (fedavg, evaluate, cross_site)
    rounds: int = 0                       # the training workflow's number of rounds
    step: int = 0                         # job-wide sequence number of the round this task belongs to
    client: dict[str, Any] = Field(default_factory=dict)    # config_fed_client.yml, as validated
    submitter: dict[str, str] = Field(default_factory=dict)
    code_signature: Any = None
    algorithm: LocalAlgorithm | None = Field(None, discriminator="name")
    key_metric: KeyMetricRef = KeyMetricRef()  # how a site picks its best local model ...
    keep_best_local: bool = False         # ... which it tracks only for a job that will ask for it (cross_site)
    wire_dtype: str = "float32"           # runtime.quantize: how the model comes and the result goes back


def split_control(weights: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model, control variates) from a received file's tensors."""
    model = {k: v for k, v in weights.items() if not k.startswith(CONTROL_PREFIX)}
    control = {k[len(CONTROL_PREFIX):]: v for k, v in weights.items() if k.startswith(CONTROL_PREFIX)}
    return model, control


def with_control(model: dict[str, Any], control: dict[str, Any]) -> dict[str, Any]:
    return {**model, **{CONTROL_PREFIX + k: v for k, v in control.items()}}
