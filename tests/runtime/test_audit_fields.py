"""runtime/audit.py: a record's hash covers every one of its fields, so no field (time included) can be
changed, added or dropped without verification naming the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.audit import AuditLog, verify
from runtime.errors import AuditChainBroken

FIELDS = ("time", "event", "job_id", "site", "n_samples", "nested", "prev")


def _log(path: Path) -> list[bytes]:
    log = AuditLog(path, clock=lambda: "2026-12-01T00:00:00.000+00:00")
    log.append("job_started", job_id="j-1", site="site-1", n_samples=7, nested={"a": [1, 2]})
    log.append("result_accepted", job_id="j-1", site="site-2", n_samples=9, nested={"a": [3]})
    log.append("job_ended", job_id="j-1", site="", n_samples=0, nested={})
    return path.read_bytes().splitlines(keepends=True)


def _changed(value: object) -> object:
    if isinstance(value, str):
        return value + "x" if value else "x"
    if isinstance(value, int):
        return value + 1
    if isinstance(value, dict):
        return {**value, "z": 0}
    raise AssertionError(f"no change for {value!r}")


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("line", [0, 1, 2])
def test_changing_any_field_of_any_record_fails_verification(tmp_path: Path, field: str, line: int) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _log(path)
    record = json.loads(lines[line])
    record[field] = _changed(record[field])
    lines[line] = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
    path.write_bytes(b"".join(lines))

    with pytest.raises(AuditChainBroken, match=f":{line + 1}:"):
        verify(path)


@pytest.mark.parametrize("field", [f for f in FIELDS if f != "prev"])
def test_dropping_or_adding_a_field_fails_verification(tmp_path: Path, field: str) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _log(path)
    for edit in ("drop", "add"):
        record = json.loads(lines[1])
        if edit == "drop":
            del record[field]
        else:
            record[f"{field}_extra"] = "back-dated"
        edited = [*lines[:1], (json.dumps(record) + "\n").encode(), *lines[2:]]
        path.write_bytes(b"".join(edited))

        with pytest.raises(AuditChainBroken, match=":2:"):
            verify(path)
