"""Admission control for uploads: a fixed number of slots, handed out as short leases.

A site reserves a slot (long poll) before it streams its update, so the server holds at most
`n_slots` updates in memory, and gRPC buffers no more, however many sites answer at once. A lease not
used within `lease_s` goes back to the pool, so a site that reserves and vanishes blocks nobody.
"""

from __future__ import annotations

import asyncio
import secrets


class UploadSlots:
    def __init__(self, n_slots: int, lease_s: float = 30.0):
        self._slots = asyncio.Semaphore(n_slots)
        self.lease_s = lease_s
        self._leases: dict[str, asyncio.TimerHandle] = {}

    async def reserve(self, wait_s: float) -> str:
        """A lease id once a slot is free, or "" if none came free within `wait_s`."""
        try:
            await asyncio.wait_for(self._slots.acquire(), wait_s)
        except TimeoutError:
            return ""
        lease = secrets.token_hex(12)
        self._leases[lease] = asyncio.get_running_loop().call_later(self.lease_s, self._expire, lease)
        return lease

    def _expire(self, lease: str) -> None:
        if self._leases.pop(lease, None) is not None:
            self._slots.release()

    async def acquire(self, lease: str) -> None:
        """Hold a slot for one upload: the lease's, if it is still valid, else the next free one."""
        handle = self._leases.pop(lease, None) if lease else None
        if handle is not None:
            handle.cancel()
            return
        await self._slots.acquire()

    def release(self) -> None:
        self._slots.release()
