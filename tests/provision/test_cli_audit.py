"""`fedkit audit verify` on a real server's audit log: a clean log passes, and a modified, a deleted and an
inserted record are each named by their line, in one line on stderr with exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from provision.cli import app
from provision.local_study import LocalStudy
from runtime.audit import record_hash

from ..conftest import EXAMPLE_PROJECT, with_sites

runner = CliRunner()


@pytest.fixture(scope="module")
def real_server_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, ...]:
    """The lines of an audit log written by a real server: started, an allowed and a denied command, stopped.
    Written once; each test tampers with its own copy."""
    study = LocalStudy.create(EXAMPLE_PROJECT, tmp_path_factory.mktemp("audit") / "study", edit=with_sites(["site-1"]))
    try:
        study.start_server()
        assert study.admin("list_jobs").returncode == 0
        assert study.admin("show_audit", admin="lead@study.org").returncode == 1
        assert study.stop(study.server) == 0
    finally:
        study.stop_all()
    lines = (study.kits[study.server] / "workspace" / "audit.jsonl").read_bytes().splitlines(keepends=True)
    assert [json.loads(line)["event"] for line in lines] == ["server_started", "admin_command", "admin_command",
                                                             "server_stopped"]
    return tuple(lines)


@pytest.fixture
def server_log(real_server_log: tuple[bytes, ...]) -> list[bytes]:
    return list(real_server_log)


def _verify(tmp_path: Path, lines: list[bytes]):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(lines))
    return path, runner.invoke(app, ["audit", "verify", str(path)])


def _assert_broken_at(result, path: Path, lineno: int, *words: str) -> None:
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"{path}:{lineno}: ") and result.stderr.count("\n") == 1, result.stderr
    assert all(w in result.stderr for w in words), result.stderr


def test_a_clean_server_log_verifies(server_log: list[bytes], tmp_path: Path) -> None:
    path, result = _verify(tmp_path, server_log)

    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ok (4 records, chain intact, head ")


def test_a_modified_record_is_named(server_log: list[bytes], tmp_path: Path) -> None:
    # Prepare: the denied command of line 3 made to look allowed
    assert b'"allowed":false' in server_log[2]
    server_log[2] = server_log[2].replace(b'"allowed":false', b'"allowed":true')

    path, result = _verify(tmp_path, server_log)

    _assert_broken_at(result, path, 3, "record was modified")


def test_a_deleted_record_is_named(server_log: list[bytes], tmp_path: Path) -> None:
    del server_log[2]  # the denied command disappears

    path, result = _verify(tmp_path, server_log)

    _assert_broken_at(result, path, 3, "chain broken", "deleted just before this line")


def test_an_inserted_record_is_named(server_log: list[bytes], tmp_path: Path) -> None:
    # Prepare: a forged record that links correctly to line 2 and carries a valid hash of its own
    before = json.loads(server_log[1])
    forged = {**before, "command": "shutdown_server", "time": before["time"], "prev": before["hash"]}
    forged["hash"] = record_hash(forged)
    server_log.insert(2, json.dumps(forged, sort_keys=True, separators=(",", ":")).encode() + b"\n")

    path, result = _verify(tmp_path, server_log)

    # the forgery is only visible from the record after it, whose link skips it: both lines are named
    _assert_broken_at(result, path, 4, "chain broken", "line 3 was inserted", "follows line 2")


def test_an_inserted_copy_of_a_record_is_named(server_log: list[bytes], tmp_path: Path) -> None:
    server_log.insert(3, server_log[1])  # a replayed allowed command

    path, result = _verify(tmp_path, server_log)

    _assert_broken_at(result, path, 4, "this record was inserted", "line 5 follows line 3")
