"""runtime/admin/console.py: text that sites (or job code through them) report reaches the admin's terminal
without terminal control sequences: no retitled window, no cleared screen, no hidden lines."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
from rich.console import Console

from runtime.admin.console import AdminConsole
from runtime.admin.sanitize import SafeConsole, clean_remote
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


def _printed_on_the_terminal(line: str, replies: dict[str, Any], console_class: Any = SafeConsole) -> str:
    """What fl_admin.sh's own console (runtime.admin.__main__) writes to a terminal for `line`."""
    out = io.StringIO()
    terminal = console_class(file=out, width=200, markup=False, highlight=False, force_terminal=True)
    asyncio.run(AdminConsole(CannedServer(replies), terminal).run_line(line))  # type: ignore[arg-type]
    return out.getvalue()


ESCAPES = "\x1b[2J\x1b[H\x1b[1;41mPRIVACY: nothing was filtered\x1b[0m\x1b]0;PWNED\x07\u202e"


@pytest.mark.parametrize("line,replies", [
    # a job's filter argument, a site's privacy chain as show_job prints it
    ("show_job j1", {"show_job": {"record": {**RECORD, "error": None}, "queue_position": None, "metrics": [
        {"type": "round", "round": 1, "sites": ["site-1"], "n_samples": {"site-1": 10}, "train": {"site-1": {}},
         "failed": {}, "privacy": {"site-1": {
            "task": "train", "applied_to": "delta", "on_weaker_job": "raise", "raised": False,
            "chain": [{"name": "exclude_vars", "args": {"pattern": f"^x$|{ESCAPES}"}, "source": "job"}]}}}]}}),
    # an evaluate job's model label (a file name it chose) in the server's status
    ("check_status server", {"check_status": {"server": {
        "uptime_s": 5, "sites_online": 1, "running_job": "j1", "running_job_name": "job", "task": "validate",
        "task_label": ESCAPES, "round": 1, "rounds_total": 1, "queued": []}}}),
], ids=["show_job-privacy", "check_status-label"])
def test_whatever_path_remote_text_takes_the_terminal_never_obeys_it(line: str, replies: dict[str, Any]) -> None:
    printed = _printed_on_the_terminal(line, replies)
    assert "PRIVACY: nothing was filtered" in printed and "\\x1b[2J" in printed  # shown as text
    content = printed.replace("\x1b[0m", "").replace("\x1b[1m", "")  # rich's own styling of its tables
    assert not any(c in content for c in "\x1b\x07\u202e"), repr(printed)
