"""runtime/admin/console.py: text that sites (or job code through them) report reaches the admin's terminal
without terminal control sequences: no retitled window, no cleared screen, no hidden lines."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
from rich.console import Console

from runtime.admin.console import AdminConsole
from runtime.admin.sanitize import clean_remote
from tests.runtime.admin.canned import CannedServer
from tests.runtime.admin.canned import printed as printed_by

HOSTILE = "ok\x1b]0;pwned\x07\x1b[2J\x1b[1A\rhidden\x9b31m\x00\x08 end\tcol"


def test_clean_remote_strips_escape_sequences_and_control_characters_but_keeps_tabs_and_newlines() -> None:
    assert clean_remote(HOSTILE + "\nnext") == "okhidden31m end\tcol\nnext"


RECORD = {"job_id": "j1", "name": "job", "state": "failed", "rounds_done": 1, "rounds_total": 2,
          "submitter": "lead", "submitter_org": "o", "submitter_role": "lead", "config_hash": "c" * 16,
          "overrides": [], "job_sha256": "a" * 64, "submitted_at": 1.0, "started_at": 2.0, "finished_at": 3.0,
          "best_metric": None, "best_round": None, "final_metrics": {}, "error": f"round failed: {HOSTILE}"}


@pytest.mark.parametrize("line,replies", [
    ("tail_log site-1", {"tail_log": {"site": "site-1", "lines": [HOSTILE, "second"]}}),
    ("sys_info site-1", {"sys_info": {"site": "site-1", "hostname": HOSTILE}}),
    ("show_job j1", {"show_job": {"record": RECORD, "queue_position": None, "metrics": [
        {"type": "round", "round": 1, "sites": [], "n_samples": {}, "train": {},
         "failed": {"site-1": f"update rejected: {HOSTILE}"}}]}}),
    ("show_job j1", {"show_job": {"record": RECORD, "queue_position": None, "metrics": [
        {"type": "round_failed", "task": "train", "round": 2, "sites": ["site-2"],
         "failed": {"site-1": f"update rejected: {HOSTILE}"}}]}}),
    # a job stored before its name had to be plain text: names and overrides are what a submitter wrote
    ("list_jobs", {"list_jobs": [{**RECORD, "name": f"job {HOSTILE}", "overrides": [f"meta.x={HOSTILE}"]}]}),
], ids=["tail_log", "sys_info", "show_job", "show_job_failed_round", "list_jobs"])
def test_remote_text_is_printed_without_control_sequences(line: str, replies: dict[str, Any]) -> None:
    printed = printed_by(line, replies)

    assert "hidden" in printed
    assert not any(c in printed for c in "\x1b\x07\x9b\x00\x08\r"), repr(printed)


def test_a_narrow_list_of_jobs_is_printed_without_control_sequences() -> None:
    out = io.StringIO()
    record = {**RECORD, "name": f"job {HOSTILE}", "overrides": [f"meta.x={HOSTILE}"]}
    console = AdminConsole(CannedServer({"list_jobs": [record]}),  # type: ignore[arg-type]
                           Console(file=out, width=80, markup=False, highlight=False))
    asyncio.run(console.run_line("list_jobs"))
    printed = out.getvalue()
    assert "hidden" in printed and "\n    rounds" in printed  # the narrow layout: two lines per job
    assert not any(c in printed for c in "\x1b\x07\x9b\x00\x08\r"), repr(printed)
