"""What the server asks of a site outside of tasks: control words an admin queued (shutdown, restart,
send_log), delivered one per heartbeat in the order queued, and the log tails sites send back."""

from __future__ import annotations

import asyncio

CONTROL_WORDS = ("send_log", "shutdown", "restart")


class SiteControls:
    def __init__(self) -> None:
        self._pending: dict[str, list[str]] = {}
        self._logs: dict[str, str] = {}
        self._log_arrived: dict[str, asyncio.Event] = {}

    def queue(self, site: str, word: str) -> None:
        if word not in CONTROL_WORDS:
            raise ValueError(f"unknown control word {word!r}")
        words = self._pending.setdefault(site, [])
        if word not in words:
            words.append(word)

    def forget(self, site: str) -> None:
        """Drop what was queued for `site`'s last session: a shutdown meant for a site that then went away
        stopped it the next time its IT started it, minutes or days later."""
        self._pending.pop(site, None)

    def next_for(self, site: str) -> str:
        """The oldest word queued for `site` ("" when none); it counts as delivered."""
        words = self._pending.get(site)
        return words.pop(0) if words else ""

    def log_received(self, site: str, text: str) -> None:
        self._logs[site] = text
        self._log_arrived.setdefault(site, asyncio.Event()).set()

    async def request_log(self, site: str, timeout_s: float) -> str | None:
        """Ask `site` for its recent log lines; None if it does not send them within `timeout_s`."""
        arrived = self._log_arrived.setdefault(site, asyncio.Event())
        arrived.clear()
        self.queue(site, "send_log")
        try:
            await asyncio.wait_for(arrived.wait(), timeout_s)
        except TimeoutError:
            return None
        return self._logs.get(site, "")
