"""Regular expressions over tensor names (exclude_vars, from a job or from the site's privacy.yml).

They run in the site's daemon, not in the job's sandbox, over names the job chose, so they are compiled
by RE2 (google-re2), which matches in time linear in the name. With Python's backtracking `re`,
`^(a+)+$` against a name of 40 a's and a '!' held the daemon (its heartbeats, and SIGTERM) for hours.
RE2 has no look-arounds or back-references: a pattern using them is refused with one line, as is one too
complex (MAX_PROGRAM_SIZE), and names too long together to match (MAX_MATCHED_CHARS) fail the update.
"""

from __future__ import annotations

import re2  # google-re2

from .errors import UpdateRejected

# Linear time is not cheap time: RE2 runs a large program (counted repetitions) at microseconds a character,
# over names the job chose. Real patterns are tens of instructions (`^layer\d+\.bias$`: 11); with these
# bounds one pattern takes seconds at worst, not days.
MAX_PROGRAM_SIZE = 200
MAX_MATCHED_CHARS = 4 << 20  # all of an update's tensor names together (real models: well under 1 MB)


def tensor_name_pattern(pattern: str) -> re2._Regexp:
    """`pattern` compiled by RE2. Raises ValueError naming the pattern and what RE2 could not accept."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a text, not {type(pattern).__name__}")
    options = re2.Options()
    options.log_errors = False  # RE2 would print its own line on stderr; the refusal says it in ours
    try:
        compiled = re2.compile(pattern, options)
    except re2.error as e:
        reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(f"'{pattern}' is not a regular expression RE2 accepts ({reason}; it has no "
                         "look-arounds or back-references)") from None
    if compiled.programsize > MAX_PROGRAM_SIZE:
        raise ValueError(f"'{pattern[:80]}' is too complex ({compiled.programsize} RE2 instructions, at most "
                         f"{MAX_PROGRAM_SIZE}); name the tensors more simply")
    return compiled


def check_names_matchable(names: list[str]) -> None:
    """Refuse (UpdateRejected) tensor names too long together to match a pattern against in bounded time."""
    total = sum(len(n) for n in names)
    if total > MAX_MATCHED_CHARS:
        raise UpdateRejected(f"the tensor names total {total} characters, more than the {MAX_MATCHED_CHARS} this "
                             "site matches its exclusions against; nothing was sent")
