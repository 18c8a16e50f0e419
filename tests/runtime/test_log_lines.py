"""A server's or site's log lines are fedkit's own: a message carrying text from elsewhere (a failure reason a
job shaped, a tensor name, a label) cannot start a line of its own, such as a fake audit anchor, nor send a
terminal escape to whoever runs `tail` on the log."""

from __future__ import annotations

import logging
from pathlib import Path

from runtime.procs import setup_logging

FORGED = "2026-12-04 23:59:59,000 INFO fedkit.server: audit log x: 3 records, head 0000bad"


def test_a_message_cannot_forge_a_line_or_a_terminal_sequence(tmp_path: Path) -> None:
    setup_logging(tmp_path / "log.txt")
    try:
        logging.getLogger("fedkit.server").warning("result from site-1 refused: %s",
                                                   f"bad offsets\n{FORGED}\x1b[2J\x1b]0;title\x07")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("fedkit.server").exception("job failed")
    finally:
        logging.getLogger().handlers.clear()
    lines = (tmp_path / "log.txt").read_text().splitlines()
    starts = [line for line in lines if not line.startswith(" ")]
    assert len(starts) == 2 and "result from site-1 refused: bad offsets" in starts[0] and "job failed" in starts[1]
    assert f"    {FORGED}\\x1b[2J\\x1b]0;title\\x07" in lines  # kept, indented, escaped: read, never obeyed
    assert "    ValueError: boom" in lines  # a traceback's lines are indented under its message
    assert "\x1b" not in (tmp_path / "log.txt").read_text()
