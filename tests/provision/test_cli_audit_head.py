"""`fedkit audit verify --expect-head/--expect-count`: a log whose last records were deleted still chains,
so only the head and count anchored elsewhere (the server logs them at every start and stop) catch it."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from provision.cli import app
from runtime.audit import AuditLog

runner = CliRunner()


def _log(tmp_path: Path, n: int) -> tuple[Path, AuditLog]:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(n):
        log.append("event", i=i)
    return tmp_path / "audit.jsonl", log


def test_verify_prints_the_head_hash_and_the_record_count(tmp_path: Path) -> None:
    path, log = _log(tmp_path, 3)

    result = runner.invoke(app, ["audit", "verify", str(path)])

    assert result.exit_code == 0, result.stderr
    assert "3 records" in result.stdout and f"head {log.head().hash}" in result.stdout


def test_the_anchors_pass_on_the_log_they_came_from(tmp_path: Path) -> None:
    path, log = _log(tmp_path, 3)
    head = log.head()

    result = runner.invoke(app, ["audit", "verify", str(path), "--expect-head", head.hash, "--expect-count", "3"])

    assert result.exit_code == 0, result.stderr
    assert head.records == 3


def test_a_log_cut_at_its_end_fails_against_its_anchors_in_one_line(tmp_path: Path) -> None:
    path, log = _log(tmp_path, 5)
    head = log.head()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]))  # the last two records deleted: the chain itself still verifies

    by_head = runner.invoke(app, ["audit", "verify", str(path), "--expect-head", head.hash])
    by_count = runner.invoke(app, ["audit", "verify", str(path), "--expect-count", "5"])

    for result in (by_head, by_count):
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and str(path) in result.stderr, result.stderr
    assert "no record has hash" in by_head.stderr and head.hash in by_head.stderr
    assert "3 records, expected 5" in by_count.stderr and "2 record(s) missing" in by_count.stderr


def test_a_reopened_log_knows_its_head_and_count(tmp_path: Path) -> None:
    path, log = _log(tmp_path, 4)

    again = AuditLog(path)

    assert again.head() == log.head() and again.head().records == 4


def test_an_anchor_taken_earlier_passes_on_the_log_that_grew_since(tmp_path: Path) -> None:
    """A running server's log grows past every anchor it logged: the anchor says what must be there, not
    where the log ends (it failed with 'the log grew' on any live server)."""
    path, log = _log(tmp_path, 3)
    head = log.head()
    for i in range(4):
        log.append("later", i=i)

    result = runner.invoke(app, ["audit", "verify", str(path), "--expect-head", head.hash, "--expect-count", "3"])
    by_head = runner.invoke(app, ["audit", "verify", str(path), "--expect-head", head.hash])

    assert result.exit_code == 0 and by_head.exit_code == 0, (result.stderr, by_head.stderr)
    assert "7 records" in result.stdout


def test_a_log_rewritten_up_to_an_anchor_fails_naming_both_hashes(tmp_path: Path) -> None:
    path, log = _log(tmp_path, 3)
    head = log.head()
    path.unlink()
    again = AuditLog(path)  # the same number of records, written anew: a chain that verifies
    for i in range(3):
        again.append("forged", i=i)

    result = runner.invoke(app, ["audit", "verify", str(path), "--expect-head", head.hash, "--expect-count", "3"])

    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert head.hash in result.stderr and again.head().hash in result.stderr, result.stderr
