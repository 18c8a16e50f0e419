"""Successful read-only admin commands asked again and again (a dashboard polls check_status, list_jobs
and show_job about once a second; wait_job polls) are audited once per admin, command and arguments per
interval, with the count of the repeats in between: the trail still shows who read what and how often,
without one fsynced record per poll burying everything else. Denials are coalesced the same way per admin
and command, whatever the arguments: the first is recorded at once, and a member's script sending thousands
(13 MB of trail in 10 s) costs one record an interval. Failed commands and every state-changing request are
always recorded (the caller decides which are coalesced)."""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from typing import Any

REPEAT_AFTER_S = 60.0
MAX_TRACKED = 4096  # distinct (admin, command, args) kept; stale ones are dropped past this
# records one admin's reads (or failed reads) of one command may write per interval, whatever the arguments:
# past it they are counted together, so a script varying its arguments (show_job nosuch-1, -2, ...) cannot
# grow the trail at its own pace (13 MB a minute)
MAX_RECORDS_PER_INTERVAL = 30


def read_key(admin: str, command: str, args: dict[str, Any]) -> tuple[str, str, str]:
    return admin, command, json.dumps(args, sort_keys=True, default=str)


class RepeatedReads:
    def __init__(self, clock: Callable[[], float], repeat_after_s: float = REPEAT_AFTER_S):
        self._clock = clock
        self._repeat_after_s = repeat_after_s
        self._last: dict[Hashable, float] = {}
        self._repeats: dict[Hashable, int] = {}
        self._written: dict[Hashable, tuple[float, int]] = {}  # (admin, command) -> (window start, records)

    def over_budget(self, admin: str, command: str) -> bool:
        """Whether `admin` has written MAX_RECORDS_PER_INTERVAL records of `command` in this interval already
        (counting this one when not)."""
        if self._repeat_after_s <= 0:
            return False
        now, key = self._clock(), (admin, command)
        start, n = self._written.get(key, (now, 0))
        if now - start >= self._repeat_after_s:
            start, n = now, 0
        if n >= MAX_RECORDS_PER_INTERVAL:
            return True
        if len(self._written) >= MAX_TRACKED and key not in self._written:
            self._written = {k: v for k, v in self._written.items() if now - v[0] < self._repeat_after_s}
        self._written[key] = (start, n + 1)
        return False

    def due(self, key: Hashable) -> int | None:
        """None when this read falls within the interval of the last record of the same key (it is
        counted, and the count goes into that key's next record); otherwise how many repeats the record
        about to be written stands for."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._repeat_after_s:
            self._repeats[key] = self._repeats.get(key, 0) + 1
            return None
        if key not in self._last and len(self._last) >= MAX_TRACKED:
            self._drop_settled(now)
            if len(self._last) >= MAX_TRACKED:
                return 0  # too many distinct reads to track: record every one rather than lose a count
        self._last[key] = now
        return self._repeats.pop(key, 0)

    def take_pending(self) -> list[tuple[Hashable, int]]:
        """Every key with repeats not yet in a record, and how many; forgotten here (the server stopping
        writes them, so no read goes untraced)."""
        pending = sorted(self._repeats.items(), key=lambda item: str(item[0]))
        self._repeats.clear()
        return pending

    def _drop_settled(self, now: float) -> None:
        """Forget keys past their interval with no repeat waiting to be recorded."""
        for key in [k for k, t in self._last.items() if now - t >= self._repeat_after_s and k not in self._repeats]:
            del self._last[key]
