"""Making text that came from elsewhere safe to print on an admin's terminal.

Sites report host info, log lines and error reasons, and a site's log holds whatever a job's code (a
stranger's) printed. A terminal obeys escape sequences in it: retitle the window, clear the screen, move
the cursor up and overwrite lines, and on some terminals worse. `clean_remote` removes ANSI escape
sequences (CSI, OSC, DCS and the rest) and every C0 and C1 control character except newline and tab.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from rich.console import Console
from rich.segment import Segment

from ..plain_text import shown

_ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, clearing
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window title, hyperlinks, clipboard
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"  # DCS, SOS, PM, APC strings
    r"|\x1b[ -/]*[0-~]"  # the other two-byte (and nF) escapes
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but \t \n, DEL, C1


def clean_remote(text: object) -> str:
    """`text` as a string with terminal control sequences and control characters removed."""
    return _CONTROL.sub("", _ESCAPE_SEQUENCE.sub("", str(text)))


class SafeConsole(Console):
    """A rich Console whose every printed piece of text has its control and format characters escaped
    (plain_text.shown; newlines and tabs kept), whatever path it came by: a job's name, a filter argument, a
    failure reason a site or a tensor name shaped. Rich's own styling is kept: it is rendered from each
    segment's style, never from the text; rich's own control segments (cursor moves) pass as they are."""

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        return super()._render_buffer(segment if segment.control else
                                      Segment(shown(segment.text, keep="\n\t"), segment.style, segment.control)
                                      for segment in buffer)
