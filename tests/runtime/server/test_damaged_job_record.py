"""A job record damaged on disk (a crash mid-write, an editor): the server names the file and the fix, logs
it once rather than at every scheduler tick, and the other jobs go on."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from runtime.errors import JobRejected
from runtime.server.job_store import JobStore


def test_a_damaged_record_is_named_once_and_the_other_jobs_are_listed(tmp_path: Path, caplog) -> None:
    store = JobStore(tmp_path / "jobs")
    for job in ("20261204-000000-aaaaaa", "20261204-000001-bbbbbb"):
        (store.root / job).mkdir()
    (store.root / "20261204-000000-aaaaaa" / "record.json").write_text('{"job_id": "broken')
    with caplog.at_level(logging.ERROR):
        for _ in range(5):  # the scheduler reads every record twice a second while idle
            assert store.all() == []
    damaged = [r for r in caplog.records if "unreadable job record" in r.getMessage()]
    assert len(damaged) == 1 and "restore it from a backup" in damaged[0].getMessage()

    with pytest.raises(JobRejected, match=r"its record .*record.json cannot be read .*restore it from a backup"):
        store.load("20261204-000000-aaaaaa")
