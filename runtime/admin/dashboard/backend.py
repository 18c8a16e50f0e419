"""The dashboard's only link to the server: a hub that asks the server, over the admin's own mutual-TLS
AdminClient, what a console user would ask (check_status, list_jobs, show_job), about once a second while
at least one page is watching, and hands every page the parts that changed.

Why polling and not a new server stream: each answer then passes the server's authorization and audit
exactly as the console's commands do, and the server needs no change. Nothing is polled while no page is
open, so an idle dashboard costs the server (and its audit trail) nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from ...errors import FedkitError, ServerUnreachable
from ..client import AdminClient

POLL_INTERVAL_S = 1.0
# A question the server refused (no such job, not for this role) is asked again this rarely, not every
# second: the server audits each refusal, and one page left on a deleted job wrote 3,600 records an hour.
REFUSED_RETRY_S = 60.0
KEEPALIVE_S = 15.0  # an SSE comment this often, so proxies and browsers keep an idle stream open
AUDIT_MAX_RECORDS = 2000  # show_audit's answer stays well under gRPC's 4 MB message limit


class Hub:
    """One poll loop for every open page. A page subscribes with the job it shows (or none); the loop
    fetches that job too, and each subscriber receives (event, data) for every part that changed since it
    last received that part."""

    def __init__(self, client: AdminClient, interval_s: float = POLL_INTERVAL_S):
        self._client = client
        self._interval_s = interval_s
        self._watched: Counter[str] = Counter()  # job id -> pages showing it
        self._subscribers = 0
        self._parts: dict[str, str] = {}  # "status", "jobs", "job:<id>" -> JSON text of the last answer
        self._version = 0
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._refused_at: dict[str, float] = {}  # part key -> when the server last refused it

    # ---- pages --------------------------------------------------------------------------------------

    @property
    def feeds(self) -> int:
        """The live feeds open now (every tab of a browser shares one per job it shows)."""
        return self._subscribers

    async def subscribe(self, job_id: str | None) -> AsyncIterator[tuple[str, str]]:
        """(event name, JSON text) for the study, the job list and `job_id`'s view, first as they stand, then
        each time one changes. Ends when the caller stops iterating (the page closed)."""
        self._subscribers += 1
        if job_id:
            self._watched[job_id] += 1
            self._wake.set()  # fetch the newly watched job now, not a second from now
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll_loop(), name="dashboard-poll")
        sent: dict[str, str] = {}
        keys = ["status", "jobs"] + ([f"job:{job_id}"] if job_id else [])
        seen_version = 0  # version 0: nothing polled yet
        try:
            while not self._closing:
                async with self._changed:
                    if self._version == seen_version:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), KEEPALIVE_S)
                    if self._closing:
                        return
                    seen_version = self._version
                    parts = {k: self._parts[k] for k in keys if k in self._parts}
                fresh = [(k, v) for k, v in parts.items() if sent.get(k) != v]
                if not fresh:
                    yield "keepalive", ""
                for key, text in fresh:
                    sent[key] = text
                    yield key.split(":", 1)[0], text
        finally:
            self._subscribers -= 1
            if job_id:
                self._watched[job_id] -= 1
                if self._watched[job_id] <= 0:
                    del self._watched[job_id]
                    self._parts.pop(f"job:{job_id}", None)
                    self._refused_at.pop(f"job:{job_id}", None)

    async def command(self, name: str, **args: Any) -> Any:
        """One command, as the console would send it (abort_job, clone_job, show_audit, help); the next poll
        follows at once, so the pages show what it changed."""
        try:
            return await self._client.command(name, **args)
        finally:
            self._wake.set()

    async def end_streams(self) -> None:
        """End every page's feed now (the dashboard is stopping), rather than after the shutdown grace."""
        self._closing = True
        async with self._changed:
            self._changed.notify_all()

    async def close(self) -> None:
        await self.end_streams()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ---- the poll loop ------------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while self._subscribers > 0:
            self._wake.clear()
            questions = {"status": ("check_status", {}), "jobs": ("list_jobs", {})}
            questions |= {f"job:{job_id}": ("show_job", {"job_id": job_id}) for job_id in list(self._watched)}
            parts = {}
            for key, (name, args) in questions.items():
                refused_at = self._refused_at.get(key)
                if refused_at is None or asyncio.get_running_loop().time() - refused_at >= REFUSED_RETRY_S:
                    parts[key] = await self._ask(key, name, **args)
            async with self._changed:
                changed = False
                for key, value in parts.items():
                    if key.startswith("job:") and key[4:] not in self._watched:
                        continue  # its page closed while we asked
                    changed |= self._parts.get(key) != value
                    self._parts[key] = value
                if changed:
                    self._version += 1
                    self._changed.notify_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)

    async def _ask(self, key: str, name: str, **args: Any) -> str:
        """The server's answer as JSON text, or {"error": one line} when it refused or could not be reached
        (the page shows that line; the loop keeps going and shows the answer again once there is one). A
        refusal is asked again only after REFUSED_RETRY_S; an unreachable server at every poll."""
        self._refused_at.pop(key, None)
        try:
            data: Any = await self._client.command(name, **args)
        except ServerUnreachable as e:
            data = {"error": " ".join(str(e).split())}
        except FedkitError as e:
            data = {"error": " ".join(str(e).split())}
            self._refused_at[key] = asyncio.get_running_loop().time()
        return json.dumps(data, sort_keys=True, default=str)
