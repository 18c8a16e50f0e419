"""SIGUSR1 makes a server or site write where each of its asyncio tasks waits into its log, all the way
down the await chain (a task's own stack shows only its outermost coroutine), and it keeps running."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest


async def _inner(event: asyncio.Event) -> None:
    await event.wait()


async def _outer(event: asyncio.Event) -> None:
    await _inner(event)


def test_sigusr1_logs_each_task_down_to_what_it_awaits(caplog: pytest.LogCaptureFixture) -> None:
    from runtime.procs import stop_event_on_signals

    async def main() -> bool:
        stop = stop_event_on_signals()
        event = asyncio.Event()
        waiter = asyncio.create_task(_outer(event), name="the-waiter")
        await asyncio.sleep(0)
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if "the-waiter" in caplog.text:
                break
        event.set()
        await waiter
        return stop.is_set()

    with caplog.at_level(logging.WARNING, logger="fedkit.tasks"):
        stopped = asyncio.run(main())

    assert not stopped, "SIGUSR1 must not stop the process"
    text = caplog.text
    block = text[text.index("task the-waiter:"):]
    assert "in _outer" in block and "in _inner" in block and "in wait" in block, text
