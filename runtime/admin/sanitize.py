"""Making text that came from elsewhere safe to print on an admin's terminal.

Sites report host info, log lines and error reasons, and a site's log holds whatever a job's code (a
stranger's) printed. A terminal obeys escape sequences in it: retitle the window, clear the screen, move
the cursor up and overwrite lines, and on some terminals worse. `clean_remote` removes ANSI escape
sequences (CSI, OSC, DCS and the rest) and every C0 and C1 control character except newline and tab.
"""

from __future__ import annotations

import re

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
