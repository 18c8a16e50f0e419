"""Edits to a site's local/ settings after it started: the site keeps enforcing what it started with (job
policy, privacy floor, sandbox) until it restarts, and says so in its log and audit the first time it
sees each edit, so site IT is not left believing a tightened policy is already in force."""

from __future__ import annotations

from pathlib import Path

WATCHED = ("site.yml", "job_policy.yml", "privacy.yml")


class LocalEdits:
    def __init__(self, local: Path):
        self._local = local
        self._seen = self._stamps()

    def _stamps(self) -> dict[str, tuple[int, int] | None]:
        stamps: dict[str, tuple[int, int] | None] = {}
        for name in WATCHED:
            try:
                st = (self._local / name).stat()
                stamps[name] = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamps[name] = None  # absent: the defaults apply
        return stamps

    def changed(self) -> list[str]:
        """The files written, created or removed since the last call (or the start); each edit once."""
        now = self._stamps()
        names = [name for name in WATCHED if now[name] != self._seen[name]]
        self._seen = now
        return names
