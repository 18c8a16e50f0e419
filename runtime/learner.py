"""The learner contract researchers implement. Import it as `from runtime.learner import Learner, ...`.

A learner runs inside the site's training worker process, on the site's own data:

    class MyLearner(Learner):
        def __init__(self, context: SiteContext, lr: float = 0.01): ...       # args from config_fed_client.yml
        def initial_weights(self) -> Weights: ...                               # round 0, if the job has no model
        def train(self, weights: Weights, round: int) -> TrainResult: ...
        def validate(self, weights: Weights) -> dict[str, float]: ...

Weights are an ordered mapping name -> NumPy array (`runtime.torch_weights` converts to and from a torch
module without copying). `train` returns trained weights or a delta (set `is_delta=True`), the number
of samples it trained on (the aggregation weight) and any metrics. `validate` returns metrics; include
`n_samples` (the validation set size) so the server weights sites fairly. The learner is built once per
job and kept across rounds, so optimizer state may persist.

Curves: `self.context.log_scalar("loss", value, step)` at any point (per batch, per round); the points go
to the server with the task's result and end in the job's TensorBoard files and curves (download_job).
Give `step` as a counter that keeps growing across rounds, or leave it out to count one per call.

Several GPUs: with `nproc: N` (or N `gpus`) in the site's local/site.yml, the worker runs under torchrun
with N ranks and the process group already initialised (NCCL on GPUs, else gloo). Every rank gets each
call; use `context.rank` / `context.world_size` to shard data and wrap the model in
DistributedDataParallel. What rank 0 returns is what the site sends.

FedProx and SCAFFOLD (chosen by the job's aggregator) need nothing in the learner: while `train` runs,
fedkit corrects the gradients of `torch_module()`'s parameters at every torch.optim optimizer step. That
needs a first-order torch.optim optimizer (not LBFGS) over that module's parameters, and weights named as
the module's state_dict() names them (runtime.torch_weights does). SCAFFOLD's control variates are exact
for SGD (with or without momentum) and only estimates for adaptive optimizers such as Adam.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FedkitError
from .scalar_log import ScalarLog
from .weights import Weights


class LearnerError(FedkitError):
    """The job's learner cannot do what the job asks of it (no torch module for FedProx/SCAFFOLD, no optimizer
    steps, no key metric); the task fails with this line, which says what to change in the learner."""


@dataclass(frozen=True)
class SiteContext:
    """Where the learner runs: the site's name, its data folder, a scratch folder, its GPUs."""

    site: str
    job_id: str
    data_root: Path | None
    work_dir: Path
    gpus: tuple[int, ...] = ()
    rank: int = 0          # under torchrun (local/site.yml nproc > 1): this process's rank ...
    world_size: int = 1    # ... of this many; shard the data by rank and wrap the model in DDP
    scalars: ScalarLog = field(default_factory=ScalarLog, compare=False, repr=False)  # what log_scalar kept

    def log_scalar(self, name: str, value: float, step: int | None = None) -> None:
        """Log one point of a curve (a loss per batch, a learning rate per round): `name` as a metric name,
        `value` a finite number (NaN is dropped with a warning), `step` your own growing counter or None
        for one more than this name's last. Raises ScalarLogError for a bad name or value."""
        self.scalars.log(name, value, step)


@dataclass
class TrainResult:
    weights: Weights
    n_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    is_delta: bool = False


class Learner(ABC):
    def __init__(self, context: SiteContext, **args: object):
        self.context = context

    def initial_weights(self) -> Weights:
        """Weights of round 0, when the job ships no initial model. Make them deterministic (seed)."""
        raise NotImplementedError(f"{type(self).__name__} has no initial_weights() and the job has no initial_model")

    def torch_module(self) -> Any:
        """The torch.nn.Module train() updates; fedkit applies FedProx/SCAFFOLD to its gradients.

        The default is the learner's one torch.nn.Module attribute (of several, the one holding parameters:
        a loss module has none). Override it when the model lives elsewhere or there are several."""
        from torch import nn  # only jobs that run FedProx/SCAFFOLD need torch here

        modules = {name: value for name, value in vars(self).items() if isinstance(value, nn.Module)}
        if len(modules) > 1:
            modules = {name: m for name, m in modules.items() if any(True for _ in m.parameters())} or modules
        if len(modules) == 1:
            return next(iter(modules.values()))
        found = f"{len(modules)} torch.nn.Module attributes ({', '.join(sorted(modules))})" if modules \
            else "no torch.nn.Module attribute"
        raise LearnerError(f"{type(self).__name__} has {found}: define torch_module() returning the module "
                           "train() updates, so fedkit can apply FedProx/SCAFFOLD to its gradients")

    @abstractmethod
    def train(self, weights: Weights, round: int) -> TrainResult: ...

    @abstractmethod
    def validate(self, weights: Weights) -> dict[str, float]: ...


__all__ = ["Learner", "LearnerError", "SiteContext", "TrainResult", "Weights"]
