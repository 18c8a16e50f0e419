"""Admission control for model transfers: a fixed number of slots per direction.

Every stream in flight costs the server memory (buffers, HTTP/2 windows), so with 100 sites sending
or fetching a model at once it would grow with the number of sites. Slots cap the streams that move
weights at the same time; the others wait their turn, which costs little because the link or the CPU
is the bottleneck anyway.

Uploads use leases: a site reserves a slot (long poll) before it streams its update, and a lease not
used within `lease_s` goes back to the pool, so a site that reserves and vanishes blocks nobody.

Slots are shared fairly: a holder (a site) has at most one slot, leased or in use, at a time. Asking
again while holding a lease returns that lease; a second upload waits for the holder's first, on the
holder's own turn, so one site opening many streams cannot take the slots every other site needs.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass


@dataclass
class _Lease:
    holder: str
    handle: asyncio.TimerHandle


class TransferSlots:
    def __init__(self, n_slots: int, lease_s: float = 30.0):
        self._slots = asyncio.Semaphore(n_slots)
        self.lease_s = lease_s
        self._leases: dict[str, _Lease] = {}
        self._lease_of: dict[str, str] = {}  # holder -> its lease
        self._turns: dict[str, asyncio.Lock] = {}  # holder -> held while the holder has a slot

    def _turn(self, holder: str) -> asyncio.Lock:
        return self._turns.setdefault(holder, asyncio.Lock())

    async def _take(self, holder: str, wait_s: float | None) -> bool:
        """The holder's turn, then a slot; within `wait_s` (None: no limit). False if it timed out."""
        loop = asyncio.get_running_loop()
        deadline = None if wait_s is None else loop.time() + wait_s
        turn = self._turn(holder)
        try:
            await asyncio.wait_for(turn.acquire(), None if deadline is None else max(0.0, deadline - loop.time()))
        except TimeoutError:
            return False
        try:
            await asyncio.wait_for(self._slots.acquire(),
                                   None if deadline is None else max(0.0, deadline - loop.time()))
        except TimeoutError:
            turn.release()
            return False
        except BaseException:
            turn.release()
            raise
        return True

    async def reserve(self, wait_s: float, holder: str = "") -> str:
        """A lease id once a slot is free, or "" if none came free within `wait_s`. A holder that has a
        lease gets that same lease back (its timer is not extended)."""
        if holder in self._lease_of:
            return self._lease_of[holder]
        if not await self._take(holder, wait_s):
            return ""
        if holder in self._lease_of:  # a concurrent reserve of the same holder won while we waited
            self.release(holder)
            return self._lease_of[holder]
        lease = secrets.token_hex(12)
        handle = asyncio.get_running_loop().call_later(self.lease_s, self._expire, lease)
        self._leases[lease] = _Lease(holder, handle)
        self._lease_of[holder] = lease
        return lease

    def _expire(self, lease: str) -> None:
        held = self._leases.pop(lease, None)
        if held is not None:
            self._lease_of.pop(held.holder, None)
            self.release(held.holder)

    async def acquire(self, lease: str, holder: str = "") -> None:
        """Hold a slot for one upload: the holder's lease's, if it is still valid, else the next free one
        once the holder's other upload (if any) is done. The caller must release(holder)."""
        held = self._leases.get(lease) if lease else None
        if held is not None and held.holder == holder:
            del self._leases[lease]
            self._lease_of.pop(holder, None)
            held.handle.cancel()
            return
        await self._take(holder, None)

    def release(self, holder: str = "") -> None:
        self._slots.release()
        turn = self._turns.get(holder)
        if turn is not None and turn.locked():
            turn.release()

    async def try_acquire(self, wait_s: float) -> bool:
        """Hold a slot if one comes free within `wait_s`, whoever asks; the caller must release() it."""
        try:
            await asyncio.wait_for(self._slots.acquire(), wait_s)
        except TimeoutError:
            return False
        return True
