"""Bounding what an admin sent before it is written to the audit trail or echoed back.

The audit log records every request, denied ones included, so whatever a request carries lands on disk
(and is fsynced): without a bound any admin, a read-only member included, could write megabytes per
call. Strings are cut to MAX_STRING_CHARS, lists and maps to MAX_ITEMS, nesting to MAX_DEPTH, and the
whole to MAX_ARGS_JSON_BYTES of JSON; every cut leaves a marker saying how much went. Pure functions.
"""

from __future__ import annotations

import json
from typing import Any

MAX_STRING_CHARS = 200
MAX_ITEMS = 20
MAX_DEPTH = 4
MAX_ARGS_JSON_BYTES = 2048


def bounded_text(text: str, max_chars: int = MAX_STRING_CHARS) -> str:
    """`text`, cut to `max_chars` with a marker saying how many characters were cut."""
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}...[cut {len(text) - max_chars} chars]"


def _bounded(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return bounded_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if depth >= MAX_DEPTH:
        return "[cut: nested too deep]"
    if isinstance(value, dict):
        items = list(value.items())
        out = {bounded_text(str(k), 64): _bounded(v, depth + 1) for k, v in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            out["_cut_keys"] = len(items) - MAX_ITEMS
        return out
    if isinstance(value, list | tuple):
        out_list = [_bounded(v, depth + 1) for v in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            out_list.append(f"[cut {len(value) - MAX_ITEMS} more items]")
        return out_list
    return bounded_text(str(value))


def bounded_args(args: dict[str, Any]) -> dict[str, Any]:
    """`args` with every part bounded; if the result is still over MAX_ARGS_JSON_BYTES as JSON, a cut
    prefix of that JSON, marked as cut."""
    out = _bounded(args, 0)
    text = json.dumps(out, sort_keys=True, default=str)
    if len(text.encode()) <= MAX_ARGS_JSON_BYTES:
        return out
    keep = MAX_ARGS_JSON_BYTES // 3  # the prefix is escaped again (up to twice its size) inside the record
    return {"_cut": f"arguments over {MAX_ARGS_JSON_BYTES} bytes of JSON; first {keep} chars kept",
            "_json_prefix": text.encode()[:keep].decode(errors="ignore")}
