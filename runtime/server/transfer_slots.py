"""Admission control for model transfers: a fixed number of slots per direction.

Every stream in flight costs the server memory (buffers, HTTP/2 windows), so with 100 sites sending
or fetching a model at once it would grow with the number of sites. Slots cap the streams that move
weights at the same time; the others wait their turn, which costs little because the link or the CPU
is the bottleneck anyway.

Uploads use leases: a site reserves a slot (long poll) before it streams its update, and a lease not
used within `lease_s` goes back to the pool, so a site that reserves and vanishes blocks nobody.
"""

from __future__ import annotations

import asyncio
import secrets


class TransferSlots:
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

    async def try_acquire(self, wait_s: float) -> bool:
        """Hold a slot if one comes free within `wait_s`; the caller must release it."""
        try:
            await asyncio.wait_for(self._slots.acquire(), wait_s)
        except TimeoutError:
            return False
        return True

    def release(self) -> None:
        self._slots.release()
