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

Several GPUs: with `nproc: N` (or N `gpus`) in the site's local/site.yml, the worker runs under torchrun
with N ranks and the process group already initialised (NCCL on GPUs, else gloo). Every rank gets each
call; use `context.rank` / `context.world_size` to shard data and wrap the model in
DistributedDataParallel. What rank 0 returns is what the site sends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from .weights import Weights


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

    @abstractmethod
    def train(self, weights: Weights, round: int) -> TrainResult: ...

    @abstractmethod
    def validate(self, weights: Weights) -> dict[str, float]: ...


__all__ = ["Learner", "SiteContext", "TrainResult", "Weights"]
