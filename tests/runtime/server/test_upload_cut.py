"""An upload cut off mid-stream gives its upload slot back however its handler ends. gRPC may cancel a
handler a second time while it cleans up after a reset link; the slot was then lost, and the site, which
may hold one slot at a time, asked for one for ever: its re-sent task was never answered and the round
ran out its deadline (found as an intermittent failure of tests/e2e/test_resilience.py's reset test)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from runtime.audit import AuditLog
from runtime.identity import Identity, Kind
from runtime.proto import fedkit_pb2 as pb
from runtime.server import federation
from runtime.server.federation import FederationService
from runtime.server.registry import Registry
from runtime.server.site_controls import SiteControls
from runtime.server.taskboard import Task, TaskBoard
from runtime.server.update_spool import SpoolFiles
from runtime.transport import CHUNK_BYTES


class _Controller:
    """The job's controller as the upload path sees it before a result is complete."""

    def __init__(self, spool_dir: Path):
        self.spool_files = SpoolFiles(spool_dir)

    def max_payload_bytes(self, task: Task) -> int:
        return 1 << 30


def test_an_upload_cancelled_again_while_it_cleans_up_still_gives_its_slot_back(tmp_path: Path, monkeypatch) -> None:
    peer = Identity("site-1", "org-1", Kind.CLIENT)
    releasing, proceed = asyncio.Event(), threading.Event()
    real_release = federation._release

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def slow_release(incoming) -> None:  # the handler's cleanup, held open until the test lets it go
            loop.call_soon_threadsafe(releasing.set)
            proceed.wait(30)
            real_release(incoming)

        monkeypatch.setattr(federation, "_release", slow_release)
        board, registry = TaskBoard(time.monotonic), Registry(60.0, time.monotonic)
        store = SimpleNamespace(incoming_dir=tmp_path)
        runner = SimpleNamespace(store=store, current=None, controller_for=lambda job_id: _Controller(tmp_path))
        service = FederationService(registry, board, runner, AuditLog(tmp_path / "audit.jsonl"),
                                    heartbeat_interval_s=1.0, max_concurrent_uploads=1, max_concurrent_downloads=1,
                                    controls=SiteControls())
        session = (await service.register(peer, pb.RegisterRequest(host_info_json="{}"))).session_id
        task = Task(job_id="job", site="site-1", name="train", round=1, config={})
        board.post(task)
        assert await board.next_for("site-1", 0) is task

        async def reserve(wait_s: float) -> str:
            request = pb.ReserveRequest(session_id=session, task_id=task.task_id, wait_s=wait_s)
            return (await service.reserve_upload(peer, request)).lease_id

        link_up = asyncio.Event()

        async def cut_stream() -> AsyncIterator[pb.ResultChunk]:
            yield pb.ResultChunk(header=pb.ResultHeader(session_id=session, task_id=task.task_id, n_samples=1,
                                                        lease_id=await reserve(1.0), payload_bytes=2 * CHUNK_BYTES))
            yield pb.ResultChunk(data=b"\0" * CHUNK_BYTES)
            link_up.set()
            await asyncio.Event().wait()  # the link goes quiet: the rest never comes

        handler = asyncio.create_task(service.submit_result(peer, cut_stream()))
        await asyncio.wait_for(link_up.wait(), 30)
        handler.cancel()  # the reset: gRPC cancels the handler...
        await asyncio.wait_for(releasing.wait(), 30)
        handler.cancel()  # ...and again while it gives the update's memory back
        proceed.set()
        with pytest.raises(asyncio.CancelledError):
            await handler

        assert await reserve(2.0), "the site gets an upload slot again to send its update once more"

    asyncio.run(main())
