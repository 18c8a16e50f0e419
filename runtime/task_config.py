"""A task's settings as they travel from the server to a site: one typed, validated `TaskConfig` (the
vocabulary it uses, task kinds and local algorithms, is runtime.tasks, which the training worker imports
without pydantic)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .tasks import KeyMetricRef, LocalAlgorithm


class TaskConfig(BaseModel):
    """What a task says besides its kind, round and weights. Built by the server, decoded by the daemon."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
