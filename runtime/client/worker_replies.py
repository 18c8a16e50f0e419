"""The worker's replies, checked before the daemon believes a word of them.

The job's code runs inside the worker, so every reply line is untrusted input: it may try to smuggle
what it read (a key, patient data) out through metric names, poison aggregation with a huge or negative
n_samples, or send NaN. A reply must be one JSON object of at most WORKER_LINE_LIMIT_BYTES, with metric
names matching METRIC_NAME, finite numbers as values, at most MAX_METRICS of them per group, and a
non-negative integer n_samples. Anything else is refused with one line that never repeats the offending
text (it may be the secret).

This cannot stop a job that encodes data in allowed names or in the weights themselves; the sandbox's
job is that it never gets to read a secret in the first place.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ..errors import FedkitError
from ..scalar_log import MAX_COUNT, Point, check_scalars, finite_number, valid_count

METRIC_NAME = re.compile(r"^[A-Za-z0-9._/-]{1,64}$")
MAX_METRICS = 256
MAX_N_SAMPLES = 1 << 53
MAX_ERROR_CHARS = 1000
COUNT_METRIC = "n_samples"  # in a metrics map: the weight of that site's figures across sites


class WorkerReplyRefused(FedkitError):
    """A training worker's reply (or result file) broke the rules above; the task fails with this line."""


def _check_metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError("metrics must be an object of name -> number")
    if len(value) > MAX_METRICS:
        raise ValueError(f"{len(value)} metrics, more than the {MAX_METRICS} allowed")
    checked: dict[str, float] = {}
    for i, (name, number) in enumerate(value.items(), start=1):
        if not METRIC_NAME.fullmatch(name):
            raise ValueError(f"metric name #{i} ({len(name)} characters) is not allowed; names must match "
                             f"{METRIC_NAME.pattern}")
        if not finite_number(number):
            raise ValueError(f"metric '{name}' is not a finite number")
        if name == COUNT_METRIC and not valid_count(number):
            raise ValueError(f"metric '{COUNT_METRIC}' must be a sample count from 0 to {MAX_COUNT}")
        checked[name] = float(number)
    return checked


class WorkerReply(BaseModel):
    """One reply line. `error` is the learner's own message: shortened and made one printable line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ok: bool
    error: str = ""
    ready: bool = False
    n_samples: int | None = None
    metrics: dict[str, float] = {}
    validation: dict[str, float] = {}
    local: dict[str, float] = {}             # what the site-side algorithm counted (steps, lr_sum)
    local_validation: dict[str, float] = {}  # the trained model scored on local data (keep_best_local)
    scalars: list[Point] = []                # what the learner logged: (name, step, value), runtime.scalar_log
    held: bool = True                        # the worker still maps the model a train command named in
                                             # `release` (reused_files.SpareModel): never written over then

    @field_validator("scalars", mode="before")
    @classmethod
    def _scalars(cls, value: Any) -> list[Point]:
        return check_scalars(value)

    @field_validator("metrics", "validation", "local", "local_validation", mode="before")
    @classmethod
    def _metrics(cls, value: Any) -> dict[str, float]:
        return _check_metrics(value)

    @field_validator("n_samples", mode="before")
    @classmethod
    def _n_samples(cls, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_N_SAMPLES:
            raise ValueError("n_samples must be a non-negative integer")
        return value

    @field_validator("error", mode="before")
    @classmethod
    def _error(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("error must be text")
        text = "".join(c if c.isprintable() else " " for c in value)
        return text[:MAX_ERROR_CHARS] + (" ..." if len(text) > MAX_ERROR_CHARS else "")


def parse_reply(line: bytes) -> WorkerReply:
    """Parse and check one reply line; raise WorkerReplyRefused with a one-line reason."""
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past the parser's depth, a huge integer
        raise WorkerReplyRefused("worker reply refused: not a JSON line") from None
    if not isinstance(data, dict):
        raise WorkerReplyRefused("worker reply refused: not a JSON object")
    try:
        return WorkerReply.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"unexpected field ({len(where)} characters)"
        elif not message.startswith(("metric", "n_samples", "error", "scalar")) and where:
            message = f"field '{where}': {message}"
        raise WorkerReplyRefused(f"worker reply refused: {message}") from None
