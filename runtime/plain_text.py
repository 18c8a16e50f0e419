"""One line of plain text: what the free text a person writes (an org, a study's description, a job's name)
may hold, because it is printed on other people's terminals, in logs, readmes and kit scripts.

Refused: control characters (a newline forges a log line; ESC starts a terminal sequence), line and
paragraph separators, and Unicode format characters: bidirectional overrides, isolates and marks reorder
how a line displays, and zero-width ones make two names that look the same differ.
"""

from __future__ import annotations

import unicodedata

_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def check_one_line(text: str) -> str:
    """`text` unchanged, or ValueError naming the first character that is not one line of plain text."""
    for ch in text:
        if unicodedata.category(ch) in _REFUSED_CATEGORIES:
            raise ValueError(f"control character U+{ord(ch):04X} not allowed; write it as one line of plain text")
    return text


def shown(text: object, keep: str = "") -> str:
    """`text` safe to print on a terminal whatever it holds (a record a job's code shaped, a name a server
    sent): each character check_one_line refuses, but those in `keep` (say "\\n\\t" for text of several
    lines), is written as its escape, e.g. \\x1b: the reader sees it, the terminal never obeys it."""
    return "".join(ch.encode("unicode_escape").decode()
                   if ch not in keep and unicodedata.category(ch) in _REFUSED_CATEGORIES else ch
                   for ch in str(text))
