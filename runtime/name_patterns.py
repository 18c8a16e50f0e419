"""Regular expressions over tensor names (exclude_vars, from a job or from the site's privacy.yml).

They run in the site's daemon, not in the job's sandbox, over names the job chose, so they are compiled
by RE2 (google-re2), which matches in time linear in the name. With Python's backtracking `re`,
`^(a+)+$` against a name of 40 a's and a '!' held the daemon (its heartbeats, and SIGTERM) for hours.
RE2 has no look-arounds or back-references: a pattern using them is refused with one line.
"""

from __future__ import annotations

import re2  # google-re2


def tensor_name_pattern(pattern: str) -> re2._Regexp:
    """`pattern` compiled by RE2. Raises ValueError naming the pattern and what RE2 could not accept."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a text, not {type(pattern).__name__}")
    options = re2.Options()
    options.log_errors = False  # RE2 would print its own line on stderr; the refusal says it in ours
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(f"'{pattern}' is not a regular expression RE2 accepts ({reason}; it has no "
                         "look-arounds or back-references)") from None
