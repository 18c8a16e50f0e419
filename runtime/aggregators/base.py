"""The aggregator protocol: how a training workflow turns the round's site updates into the next global
model. One object per job; the workflow calls, per round:

    begin_round(model)                 the global model the sites were sent
    fold(update)                       each accepted update as it arrives (checked already); may raise
                                       UpdateRejected, and then must leave its state as it was
    close_round(model) -> Weights      the new global model; raises UpdateRejected if nothing was folded

`model` is read-only (the workflow reads it through a map of the global model's file): close_round returns
new arrays, or arrays of `model` for tensors it leaves as they are. `update.delta` may be a view into a
receive buffer that is reused after fold returns: an aggregator that keeps updates past fold (median,
trimmed mean) copies them. Everything an aggregator must remember across rounds (momentum, Adam moments,
control variates) is in `state()`, as named groups of tensors, and comes back through `load_state()` when
a job resumes after a server restart; a resumed run must continue exactly as an uninterrupted one would.

Extra tensors to send with the model (SCAFFOLD's server control variates) come from `task_extras()`, and
the site-side algorithm the sites must run from `local_algorithm()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..tasks import LocalAlgorithm
from ..weights import Weights


@dataclass(frozen=True)
class Update:
    """One site's accepted training result."""

    site: str
    delta: Weights                 # trained minus the global model sent, per tensor the site shared
    n_samples: int
    weight: float                  # the job's weighting applied already (n_samples, 1, or the site's weight)
    local: dict[str, float] = field(default_factory=dict)  # what the site-side algorithm reports, e.g.
    #                                {"lr_sum": sum of the learning rates of its local steps} for SCAFFOLD


class Aggregator(Protocol):
    def begin_round(self, model: Weights) -> None: ...

    def fold(self, update: Update) -> None: ...

    @property
    def n_folded(self) -> int: ...

    def close_round(self, model: Weights) -> Weights: ...

    def state(self) -> dict[str, Weights]: ...

    def load_state(self, state: dict[str, Weights]) -> None: ...

    def task_extras(self) -> Weights: ...

    def local_algorithm(self) -> LocalAlgorithm | None: ...
