"""runtime/server/transfer_slots.py: upload slots are shared fairly, one per site at a time, with the
lease semantics kept (a lease not used in time goes back to the pool)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from runtime.server.transfer_slots import TransferSlots

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro, debug=True)


def test_one_site_cannot_reserve_every_slot() -> None:
    async def scenario() -> tuple[str, str, str]:
        slots = TransferSlots(2)
        first = await slots.reserve(0.1, "greedy")
        again = await slots.reserve(0.1, "greedy")
        other = await slots.reserve(0.1, "honest")
        return first, again, other

    first, again, other = _run(scenario())

    assert first and again == first, "a site holding a lease gets that lease again, not a second slot"
    assert other, "another site still finds a slot"


def test_one_site_cannot_hold_every_slot_with_uploads_without_leases() -> None:
    async def scenario() -> tuple[bool, str]:
        slots = TransferSlots(2)
        await slots.acquire("", "greedy")
        second = asyncio.create_task(slots.acquire("", "greedy"))  # waits for the site's own first upload
        await asyncio.sleep(0)
        lease = await slots.reserve(0.5, "honest")
        waiting = not second.done()
        slots.release("greedy")
        await asyncio.wait_for(second, 1.0)
        slots.release("greedy")
        slots.release("honest")
        return waiting, lease

    waiting, lease = _run(scenario())

    assert waiting and lease


def test_a_lease_is_used_by_its_site_and_an_unused_one_goes_back() -> None:
    async def scenario() -> tuple[str, str]:
        slots = TransferSlots(1, lease_s=0.05)
        lease = await slots.reserve(0.1, "site-1")
        await slots.acquire(lease, "site-1")  # the reserved slot, no waiting
        slots.release("site-1")
        await slots.reserve(0.1, "site-2")  # reserved, never used: expires
        return lease, await slots.reserve(1.0, "site-3")

    lease, after_expiry = _run(scenario())

    assert lease and after_expiry
