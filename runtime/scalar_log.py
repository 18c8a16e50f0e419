"""Scalars a learner logs while it works (`context.log_scalar("loss", value, step)`), and the check every
hop applies to them before believing a word.

The learner is a stranger's code, so what it logs is bounded where it is logged and checked again where
it is read (the daemon: runtime/client/worker_replies.py; the server: runtime/server/metrics_check.py):
names as metric names (SCALAR_NAME), finite values, integer steps, at most MAX_SCALARS_PER_TASK points
of at most MAX_SCALAR_NAMES_PER_TASK names per task. A bad name or a value that is not a number is a bug
in the learner and raises ScalarLogError where it is logged; a NaN or infinite value (a diverging loss),
and points past the bounds, are dropped with one warning in the site log.

A task's points travel with its reply as [name, step, value] triples and end in the job's TensorBoard
event files on the server (runtime/server/tracker.py).
"""

from __future__ import annotations

import logging
import math
import re
import sys
import threading
from typing import Any

from .errors import FedkitError

SCALAR_NAME = re.compile(r"^[A-Za-z0-9._/-]{1,64}$")  # the same rule as metric names
MAX_SCALARS_PER_TASK = 1000
MAX_SCALAR_NAMES_PER_TASK = 64
MAX_STEP = (1 << 53) - 1  # exact in a JSON number and in TensorBoard's int64 step
_MAX_FLOAT_INT = int(sys.float_info.max)

log = logging.getLogger(__name__)

Point = tuple[str, int, float]


class ScalarLogError(FedkitError):
    """A learner logged a scalar with a name or value fedkit cannot take; the line says what to change."""


class ScalarLog:
    """The points a learner logged since the worker last replied. Thread-safe (a learner may log from its
    data-loading threads). Steps are the learner's own counter; left out, a name's step is one more than
    the last one it logged (0 first), so a per-batch loss logged without a step still forms one curve
    across rounds."""

    def __init__(self, max_points: int = MAX_SCALARS_PER_TASK, max_names: int = MAX_SCALAR_NAMES_PER_TASK,
                 last_steps: dict[str, int] | None = None):
        """`last_steps`: each name's last step in this job so far (a restarted worker's curves go on from
        there instead of starting again at 0 over the old ones)."""
        self._max_points, self._max_names = max_points, max_names
        self._lock = threading.Lock()
        self._points: list[Point] = []
        self._names: set[str] = set()
        self._last_step: dict[str, int] = dict(last_steps or {})
        self._dropped: dict[str, int] = {}  # why -> how many, reported once per task

    def log(self, name: str, value: Any, step: int | None = None) -> None:
        """Record one point; raises ScalarLogError for a name or value no hop would accept."""
        if not isinstance(name, str) or not SCALAR_NAME.fullmatch(name):
            shown = f"({len(name)} characters)" if isinstance(name, str) else f"of type {type(name).__name__}"
            raise ScalarLogError(f"log_scalar: name {shown} is not allowed; names must match {SCALAR_NAME.pattern}")
        number = _as_float(name, value)
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP):
            raise ScalarLogError(f"log_scalar('{name}'): step must be an integer from 0 to {MAX_STEP}, or left out")
        with self._lock:
            if step is None:
                step = min(self._last_step.get(name, -1) + 1, MAX_STEP)
            self._last_step[name] = step
            if not math.isfinite(number):
                self._drop("not finite")
            elif len(self._points) >= self._max_points:
                self._drop(f"past {self._max_points} points in one task")
            elif name not in self._names and len(self._names) >= self._max_names:
                self._drop(f"past {self._max_names} names in one task")
            else:
                self._names.add(name)
                self._points.append((name, step, number))

    def take(self) -> list[Point]:
        """The points logged since the last take (the worker's reply carries them), and start afresh."""
        with self._lock:
            points, self._points, self._names = self._points, [], set()
            dropped, self._dropped = self._dropped, {}
        if dropped:
            log.warning("log_scalar dropped %s (kept %d)",
                        ", ".join(f"{n} point(s) {why}" for why, n in dropped.items()), len(points))
        return points

    def _drop(self, why: str) -> None:
        self._dropped[why] = self._dropped.get(why, 0) + 1


def _as_float(name: str, value: Any) -> float:
    """A Python or NumPy number, or a one-element tensor, as a float."""
    if isinstance(value, bool | str | bytes):
        raise ScalarLogError(f"log_scalar('{name}'): value must be a number, not {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ScalarLogError(f"log_scalar('{name}'): value must be a number (or a one-element tensor), "
                             f"not {type(value).__name__}") from None


def finite_number(value: Any) -> bool:
    """A JSON number that is finite as a float. JSON holds integers of any size, and float() of one past
    1.8e308 raises OverflowError, which a check of untrusted input must never do."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, int):
        return abs(value) <= _MAX_FLOAT_INT
    return math.isfinite(value)


MAX_COUNT = 1 << 53  # the largest sample count any check takes: exact as a float, and no sum of them overflows


def valid_count(value: Any) -> bool:
    """A sample count as a metric may carry one (a validation's `n_samples`, its weight across sites): a finite
    number from 0 to MAX_COUNT. A negative or huge one turned the job's global metrics into nonsense."""
    return finite_number(value) and 0 <= value <= MAX_COUNT


def check_scalars(value: Any) -> list[Point]:
    """A reply's "scalars" as checked (name, step, value) triples; raises ValueError with a reason that
    never repeats a name (it may be what a hostile job tries to smuggle out)."""
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ValueError("scalars must be a list of [name, step, value]")
    if len(value) > MAX_SCALARS_PER_TASK:
        raise ValueError(f"{len(value)} scalars, more than the {MAX_SCALARS_PER_TASK} allowed per task")
    checked: list[Point] = []
    names: set[str] = set()
    for i, item in enumerate(value, start=1):
        if not isinstance(item, list | tuple) or len(item) != 3:
            raise ValueError(f"scalar #{i} is not a [name, step, value] triple")
        name, step, number = item
        if not isinstance(name, str) or not SCALAR_NAME.fullmatch(name):
            raise ValueError(f"scalar #{i}: its name is not allowed; names must match {SCALAR_NAME.pattern}")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
            raise ValueError(f"scalar #{i}: step must be an integer from 0 to {MAX_STEP}")
        if not finite_number(number):
            raise ValueError(f"scalar #{i}: value must be a finite number")
        names.add(name)
        checked.append((name, step, float(number)))
    if len(names) > MAX_SCALAR_NAMES_PER_TASK:
        raise ValueError(f"scalars use {len(names)} names, more than the {MAX_SCALAR_NAMES_PER_TASK} allowed per task")
    return checked


__all__ = ["MAX_SCALARS_PER_TASK", "MAX_SCALAR_NAMES_PER_TASK", "SCALAR_NAME", "Point", "ScalarLog",
           "ScalarLogError", "check_scalars"]


def last_steps(known: dict[str, int], points: list[Point] | list[list[Any]]) -> dict[str, int]:
    """`known` (name -> last step) advanced by a reply's checked points."""
    out = dict(known)
    for name, step, _ in points:
        out[name] = max(out.get(name, -1), int(step))
    return out
