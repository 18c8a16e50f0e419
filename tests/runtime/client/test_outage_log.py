"""A site whose server is unreachable says so in its log once, then once a minute, and when it is back:
a weekend's outage logged at every retry (every few seconds) was tens of thousands of lines. And the log
itself rotates (runtime/procs.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from runtime import procs
from runtime.client.daemon import Outage


def test_an_outage_is_logged_once_a_minute_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedkit.client")
    now = [1000.0]
    outage = Outage(lambda: now[0])
    for _ in range(30):  # 30 tries, 5 s apart: 145 s
        outage.failed("connect: server localhost:8002 unreachable; retrying in up to 15.0 s")
        now[0] += 5.0
    outage.ended()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "connect: server localhost:8002 unreachable; retrying in up to 15.0 s"
    assert lines[1:3] == [
        "connect: server localhost:8002 unreachable; retrying in up to 15.0 s (still, for 60 s, 13 tries)",
        "connect: server localhost:8002 unreachable; retrying in up to 15.0 s (still, for 120 s, 25 tries)"]
    assert lines[3:] == ["server reachable again after 150 s (30 tries)"]
    caplog.clear()
    outage.failed("again")  # a new outage starts afresh
    assert [r.getMessage() for r in caplog.records] == ["again"]


def test_the_workspace_log_rotates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procs, "LOG_MAX_BYTES", 2000)
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        procs.setup_logging(tmp_path / "log.txt")
        for i in range(200):
            logging.getLogger("fedkit.test").info("line %d %s", i, "x" * 40)
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["log.txt", "log.txt.1", "log.txt.2", "log.txt.3", "log.txt.4"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    assert "line 199 " in (tmp_path / "log.txt").read_text()


def test_a_log_tail_reaches_into_the_rotated_file_after_a_turn(tmp_path: Path) -> None:
    from runtime.client.daemon import _log_tail
    from runtime.server.admin_service import _lines_naming, _tail

    log = tmp_path / "log.txt"
    (tmp_path / "log.txt.2").write_text("".join(f"old {i} job-7\n" for i in range(3)))
    (tmp_path / "log.txt.1").write_text("".join(f"line {i}\n" for i in range(100)))
    log.write_text("just turned\n")
    assert _tail(log, 3) == ["line 98", "line 99", "just turned"]  # tail_log server
    assert _log_tail(log).endswith("line 99\njust turned\n")  # tail_log SITE: it said "(empty log)"
    assert _log_tail(log, max_bytes=30).splitlines() == ["line 98", "line 99", "just turned"]
    assert len(_lines_naming(log, "job-7")) == 3  # download_job's server_log.txt: a long job's first lines too
