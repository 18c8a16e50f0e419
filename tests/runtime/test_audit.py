"""runtime/audit.py: the hash chain verifies a clean log and names the first line that does not follow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.audit import GENESIS, AuditLog, record_hash, verify
from runtime.errors import AuditChainBroken


def _fixed_clock() -> str:
    return "2024-01-01T00:00:00.000+00:00"


def _write_log(path: Path, n: int) -> list[dict]:
    log = AuditLog(path, clock=_fixed_clock)
    return [log.append("job_submitted", job_id=f"job-{i}", n=i) for i in range(n)]


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_a_clean_log_verifies_and_counts_its_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = _write_log(path, 3)

    report = verify(path)

    assert report.records == 3
    assert records[0]["prev"] == GENESIS
    assert records[1]["prev"] == records[0]["hash"]
    assert records[2]["prev"] == records[1]["hash"]


def test_each_record_carries_its_own_hash(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 2)

    on_disk = [json.loads(line) for line in _lines(path)]

    assert [r["hash"] for r in on_disk] == [record_hash(r) for r in on_disk]


def test_a_modified_record_is_named_by_its_line(tmp_path: Path) -> None:
    # Prepare: change a field of record 2 and keep its old hash
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    lines = _lines(path)
    lines[1] = lines[1].replace(b'"job-1"', b'"job-X"')
    path.write_bytes(b"".join(lines))
    # Execute / Assert
    with pytest.raises(AuditChainBroken, match=r":2: record was modified"):
        verify(path)


def test_a_modified_record_with_a_recomputed_hash_breaks_the_next_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    lines = _lines(path)
    forged = json.loads(lines[1])
    forged["job_id"] = "job-X"
    forged["hash"] = record_hash(forged)
    lines[1] = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode() + b"\n"  # as fedkit writes
    path.write_bytes(b"".join(lines))

    with pytest.raises(AuditChainBroken, match=r":3: chain broken"):
        verify(path)


def test_a_deleted_record_is_named_by_the_line_that_now_stands_there(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    lines = _lines(path)
    del lines[1]
    path.write_bytes(b"".join(lines))

    with pytest.raises(AuditChainBroken, match=r":2: chain broken"):
        verify(path)


def test_a_copied_record_inserted_is_named_by_its_line(tmp_path: Path) -> None:
    # Prepare: a verbatim copy of record 1 inserted as line 2 (its own hash is valid, its prev is not)
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    lines = _lines(path)
    lines.insert(1, lines[0])
    path.write_bytes(b"".join(lines))
    # Execute / Assert
    with pytest.raises(AuditChainBroken, match=r":2: chain broken"):
        verify(path)


def test_a_forged_record_inserted_breaks_the_line_after_it(tmp_path: Path) -> None:
    # Prepare: a well-formed record that follows record 1, inserted as line 2
    path = tmp_path / "audit.jsonl"
    records = _write_log(path, 3)
    forged = {"time": _fixed_clock(), "event": "job_submitted", "job_id": "evil", "prev": records[0]["hash"]}
    forged["hash"] = record_hash(forged)
    lines = _lines(path)
    lines.insert(1, json.dumps(forged, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    path.write_bytes(b"".join(lines))
    # Execute / Assert: the old record 2, now on line 3, no longer follows the one before it
    with pytest.raises(AuditChainBroken, match=r":3: chain broken"):
        verify(path)


def test_a_line_that_is_not_json_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 2)
    path.write_bytes(path.read_bytes() + b"{not json\n")

    with pytest.raises(AuditChainBroken, match=r":3: not a JSON record"):
        verify(path)


def test_reopening_a_log_continues_its_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = _write_log(path, 2)

    reopened = AuditLog(path, clock=_fixed_clock)
    third = reopened.append("server_started")

    assert third["prev"] == first[-1]["hash"]
    assert verify(path).records == 3


def test_reopening_after_a_crash_mid_record_keeps_the_log_usable(tmp_path: Path) -> None:
    # Prepare: the process died while writing a third record (no trailing newline, cut JSON)
    path = tmp_path / "audit.jsonl"
    _write_log(path, 2)
    path.write_bytes(path.read_bytes() + b'{"time":"2024-01-01","ev')
    # Execute: the server starts again and keeps auditing
    log = AuditLog(path, clock=_fixed_clock)
    log.append("server_started")
    # Assert: only the record being written was lost ("a crash loses at most the record being written")
    assert verify(path).records == 3


def test_tail_returns_the_last_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = _write_log(path, 4)
    log = AuditLog(path, clock=_fixed_clock)

    assert log.tail(2) == records[2:]
    assert log.tail(0) == []


@pytest.mark.parametrize("edit", [
    lambda line: line.replace(b'"event":', b'"event":"admin_command","event":', 1),  # a key given twice
    lambda line: line.replace(b'","', b'", "', 1),                                    # a space
    lambda line: line + b"\r",                                                      # a CR line end
], ids=["repeated-key", "space", "crlf"])
def test_a_record_whose_bytes_were_edited_fails_though_its_content_still_hashes(tmp_path: Path, edit) -> None:
    """`"allowed":true,"allowed":false` parses to false and hashes as written, while grep and a reader see
    true: a record is the bytes append() wrote, nothing else."""
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    lines = _lines(path)
    lines[1] = edit(lines[1].rstrip(b"\n")) + b"\n"
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditChainBroken, match=r":2: record was edited"):
        verify(path)


def test_a_last_record_that_lost_only_its_newline_is_kept_and_a_cut_one_removed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    path.write_bytes(path.read_bytes()[:-1])  # a whole record, its newline lost
    assert AuditLog(path).head().records == 3 and verify(path).records == 3
    path.write_bytes(path.read_bytes()[:-20])  # cut mid-record by a crash: never complete, removed
    assert AuditLog(path).head().records == 2 and verify(path).records == 2


@pytest.mark.parametrize("last", [b"garbage", b"[1]", b'{"hash":"abc"}'])
def test_a_log_whose_last_line_is_no_record_refuses_appends_in_one_line(tmp_path: Path, last: bytes) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 2)
    path.write_bytes(path.read_bytes() + last + b"\n")
    with pytest.raises(AuditChainBroken, match=r":3: the last line is not an audit record"):
        AuditLog(path)


def test_a_crlf_log_is_not_appended_to(tmp_path: Path) -> None:
    """A copy through a Windows editor: verify refuses its lines, so the server must not extend it."""
    path = tmp_path / "audit.jsonl"
    _write_log(path, 2)
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    with pytest.raises(AuditChainBroken, match=r":2: the last line is not an audit record"):
        AuditLog(path)


def test_a_line_of_spaces_inserted_mid_log_fails_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    lines = _lines(path)
    lines.insert(1, b"   \n")
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditChainBroken, match=r":2: not a JSON record"):
        verify(path)


def test_a_record_the_disk_had_no_room_for_is_cut_off_and_the_log_still_takes_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a full disk wrote half a record: the site then refused to start ("the last line is not an audit record")
    import errno
    import os

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, clock=_fixed_clock)
    log.append("client_started")
    real_write = os.write

    def half_then_full(fd: int, data) -> int:
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        log.append("error_reported", reason="x" * 200)
    monkeypatch.setattr(os, "write", real_write)

    assert verify(path).records == 1
    AuditLog(path, clock=_fixed_clock).append("client_stopped")  # the next start appends again
    assert verify(path).records == 2
