"""The metrics a site reports with a result, checked before anyone else reads them.

Metric names and values travel from a job's code (a stranger's) to show_job, wait_job, list_jobs, the
key-metric choice and download_job, so the "train", "validation", "local" and "local_validation" maps
must hold plain names
(NAME_PATTERN), at most MAX_METRICS_PER_MAP of them, each a finite number. "scalars" (what the learner
logged: [[name, step, value], ...]) is checked by runtime.scalar_log.check_scalars. Other top-level keys
(e.g. a "privacy" object, with a schema of its own elsewhere) are only bounded in size, with the whole JSON.
Raises UpdateRejected; the name at fault is shown with repr(), so its control characters stay inert.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import UpdateRejected
from ..scalar_log import MAX_COUNT, Point, check_scalars, finite_number, valid_count

NAME_PATTERN = re.compile(r"[A-Za-z0-9._/-]{1,64}")
MAX_METRICS_PER_MAP = 256
MAX_METRICS_JSON_BYTES = 192 << 10  # room for MAX_SCALARS_PER_TASK logged scalars beside the metric maps
CHECKED_MAPS = ("train", "validation", "local", "local_validation")


def check_metrics_size(text: str) -> None:
    if len(text) > MAX_METRICS_JSON_BYTES:
        raise UpdateRejected(f"metrics are {len(text)} bytes of JSON (limit {MAX_METRICS_JSON_BYTES})")


def check_metrics(data: dict[str, Any]) -> None:
    """Raise UpdateRejected unless every checked map holds plain names and finite numbers."""
    for key in CHECKED_MAPS:
        if key not in data:
            continue
        values = data[key]
        if not isinstance(values, dict):
            raise UpdateRejected(f"metrics '{key}' must be an object of name: number")
        if len(values) > MAX_METRICS_PER_MAP:
            raise UpdateRejected(f"metrics '{key}' holds {len(values)} metrics (limit {MAX_METRICS_PER_MAP})")
        for name, value in values.items():
            if not NAME_PATTERN.fullmatch(name):
                raise UpdateRejected(f"metric name {name[:40]!r} in '{key}' must match {NAME_PATTERN.pattern}")
            if not finite_number(value):
                raise UpdateRejected(f"metric '{name}' in '{key}' must be a finite number, not {str(value)[:20]!r}")
            if name == "n_samples" and not valid_count(value):  # the weight of this site's figures
                raise UpdateRejected(f"metric 'n_samples' in '{key}' must be a sample count from 0 to {MAX_COUNT}")
    try:
        check_scalars(data.get("scalars"))
    except ValueError as e:
        raise UpdateRejected(f"metrics 'scalars': {e}") from None


def scalars(value: Any) -> tuple[Point, ...]:
    """Checked scalars as (name, step, value) triples (absent: none)."""
    return tuple(check_scalars(value)) if isinstance(value, list) else ()


def numbers(value: Any) -> dict[str, float]:
    """A checked metrics map as floats (an absent map: empty)."""
    if not isinstance(value, dict):
        return {}
    return {str(k): float(v) for k, v in value.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def decode_metrics(text: str) -> dict[str, Any]:
    """A site's metrics JSON, checked; raises UpdateRejected."""
    if not text:
        return {}
    check_metrics_size(text)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, an integer past Python's digit limit, nested too deep
        raise UpdateRejected("metrics are not valid JSON") from None
    if not isinstance(data, dict):
        raise UpdateRejected("metrics must be a JSON object")
    check_metrics(data)
    return data
