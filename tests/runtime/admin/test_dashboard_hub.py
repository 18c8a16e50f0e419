"""The dashboard's poll loop (runtime/admin/dashboard/backend.py): what it asks the server while pages are
open. The server audits every refused question, so a refusal is not asked again every poll."""

from __future__ import annotations

import asyncio
from typing import Any

from runtime.admin.client import CommandFailed
from runtime.admin.dashboard.backend import Hub
from runtime.errors import ServerUnreachable

INTERVAL_S = 0.02


class _Server:
    """Answers check_status and list_jobs; refuses show_job of `gone` (deleted), or cannot be reached."""

    def __init__(self, unreachable: bool = False):
        self.calls: list[str] = []
        self.unreachable = unreachable

    async def command(self, name: str, **args: Any) -> Any:
        self.calls.append(name)
        if name == "show_job":
            if self.unreachable:
                raise ServerUnreachable("show_job: server localhost:8003 unreachable (UNAVAILABLE)")
            raise CommandFailed(f"no such job {args['job_id']}")
        return {"ok": True}


async def _watch(server: _Server, polls: int) -> list[tuple[str, str]]:
    """One page on job `gone` for about `polls` poll intervals; what it received."""
    hub = Hub(server, interval_s=INTERVAL_S)  # type: ignore[arg-type]
    received: list[tuple[str, str]] = []

    async def page() -> None:
        async for event in hub.subscribe("gone"):
            received.append(event)

    task = asyncio.create_task(page())
    await asyncio.sleep(polls * INTERVAL_S)
    task.cancel()
    await hub.close()
    return received


def test_a_refused_job_is_asked_once_not_every_poll() -> None:
    # a page left on a deleted job wrote an audit record a second on the server (3,600 an hour)
    server = _Server()
    received = asyncio.run(_watch(server, polls=50))
    assert server.calls.count("show_job") == 1
    assert server.calls.count("check_status") > 5  # the rest goes on being polled
    assert ("job", '{"error": "no such job gone"}') in received  # the page says why, once


def test_an_unreachable_server_is_asked_again_at_every_poll() -> None:
    server = _Server(unreachable=True)
    asyncio.run(_watch(server, polls=50))
    assert server.calls.count("show_job") > 5  # it may come back any moment: the page shows it when it does
