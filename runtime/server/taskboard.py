"""Tasks waiting for each site, and the long polls waiting for tasks.

A task stays owed until its result arrives or it is cancelled; a site that restarts (registers again)
gets its unanswered tasks resent. A result is accepted once per task and only from the site the task
was for, so late, replayed or foreign results are refused by name.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..errors import UpdateRejected
from ..model_bytes import SerializedModel
from ..transport import CHUNK_BYTES, iter_chunks


class TaskState(StrEnum):
    PENDING = "pending"   # not yet handed to the site
    SENT = "sent"         # handed over, no result yet
    RECEIVING = "receiving"  # a result for it is streaming in
    DONE = "done"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Payload:
    """The weights a round sends, cut into wire-sized chunks once and shared by every site's task,
    so sending to N sites copies nothing N times."""

    chunks: tuple[bytes, ...] = ()
    nbytes: int = 0
    sha256: str = ""

    @classmethod
    def of(cls, data: bytes, chunk_bytes: int) -> Payload:
        chunks = tuple(iter_chunks(data, chunk_bytes))
        return cls(chunks=chunks, nbytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    @classmethod
    def of_model(cls, model: SerializedModel) -> Payload:
        """The chunks of a model serialized in memory (and saved from the same bytes): nothing is copied.
        A model with a file is sent from it instead (FilePayload)."""
        return cls(chunks=model.chunks, nbytes=model.nbytes, sha256=model.sha256)

    async def stream(self) -> AsyncIterator[bytes | memoryview]:
        """The chunks in order, as the wire sends them. The one place a sender reads a payload, so a
        payload kept on disk (read a chunk at a time off the event loop) can stand in for this one."""
        for chunk in self.chunks:
            yield chunk

    def read_all(self) -> bytes:
        """The whole payload in memory (the simulator and tests; never the wire)."""
        return b"".join(self.chunks)


class FilePayload:
    """A payload kept on disk: the round's model file, read one chunk at a time while it is sent, so
    sending a 2 GB model to N sites holds at most one chunk per download slot in memory.

    The file is opened once, here: the descriptor keeps the bytes of this round's file even when the
    next round's global file replaces it by rename while a slow site is still downloading; it is closed
    when the last task holding the payload lets it go. Reads are positional (os.pread), so any number of
    concurrent downloads share the one descriptor, each in a worker thread."""

    def __init__(self, path: Path, nbytes: int, sha256: str, chunk_bytes: int = CHUNK_BYTES):
        self._fd = os.open(path, os.O_RDONLY)
        self._finalizer = weakref.finalize(self, os.close, self._fd)
        size = os.fstat(self._fd).st_size
        if size != nbytes:
            self._finalizer()
            raise OSError(f"{path}: {size} bytes on disk, {nbytes} expected (the file changed)")
        self.path, self.nbytes, self.sha256, self._chunk_bytes = path, nbytes, sha256, chunk_bytes

    @classmethod
    def of_model(cls, model: SerializedModel) -> FilePayload:
        if model.path is None:
            raise ValueError("the model has no file to send from")
        return cls(model.path, model.nbytes, model.sha256)

    async def stream(self) -> AsyncIterator[bytes]:
        for offset in range(0, self.nbytes, self._chunk_bytes):
            chunk = await asyncio.to_thread(os.pread, self._fd, min(self._chunk_bytes, self.nbytes - offset), offset)
            if not chunk:
                raise OSError(f"{self.path}: ended at {offset} of {self.nbytes} bytes")
            yield chunk

    def read_all(self) -> bytes:
        """The whole payload in memory (the simulator and tests; never the wire)."""
        return os.pread(self._fd, self.nbytes, 0)

    def close(self) -> None:
        self._finalizer()


NO_PAYLOAD = Payload()


def file_payload(path: Path) -> FilePayload:
    """A model file sent as it is on disk (evaluate's and cross-site's models), hashed here a chunk at a
    time (call it in a worker thread)."""
    model = SerializedModel.read(path)
    return FilePayload(path, model.nbytes, model.sha256)


@dataclass
class Task:
    job_id: str
    site: str
    name: str
    round: int
    config: dict[str, Any]
    payload: Payload | FilePayload = NO_PAYLOAD
    timeout_s: float = 600.0
    job_sha256: str = ""
    task_id: str = field(default_factory=lambda: secrets.token_hex(12))
    state: TaskState = TaskState.PENDING
    sent_at: float = 0.0


class TaskBoard:
    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._tasks: dict[str, Task] = {}
        self._wakeups: dict[str, asyncio.Event] = {}

    def _wakeup(self, site: str) -> asyncio.Event:
        return self._wakeups.setdefault(site, asyncio.Event())

    def post(self, task: Task) -> None:
        self._tasks[task.task_id] = task
        self._wakeup(task.site).set()

    def _next_pending(self, site: str) -> Task | None:
        for task in self._tasks.values():  # dicts keep insertion order: oldest first
            if task.site == site and task.state is TaskState.PENDING:
                return task
        return None

    async def next_for(self, site: str, wait_s: float) -> Task | None:
        """The oldest pending task for `site`, waiting at most `wait_s` for one; marks it SENT."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            task = self._next_pending(site)
            if task is not None:
                task.state, task.sent_at = TaskState.SENT, self._clock()
                return task
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            event = self._wakeup(site)
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return None

    def unsend(self, task: Task) -> None:
        """The transfer of `task` failed; offer it again."""
        if task.state is TaskState.SENT:
            task.state = TaskState.PENDING
            self._wakeup(task.site).set()

    def resend_all(self, site: str) -> int:
        """The site restarted: everything it was sent but never answered is owed again."""
        count = 0
        for task in self._tasks.values():
            if task.site == site and task.state in (TaskState.SENT, TaskState.RECEIVING):
                task.state = TaskState.PENDING
                count += 1
        if count:
            self._wakeup(site).set()
        return count

    def claim(self, task_id: str, site: str) -> Task:
        """The task a result answers; refuses unknown, foreign, cancelled and already answered tasks."""
        task = self._tasks.get(task_id)
        if task is None or task.site != site:
            raise UpdateRejected(f"result for task '{task_id[:12]}' which was never sent to {site}")
        if task.state is TaskState.DONE:
            raise UpdateRejected(f"result for task '{task_id[:12]}' was already received (replay)")
        if task.state is TaskState.CANCELLED:
            raise UpdateRejected(f"result for task '{task_id[:12]}' arrived after its round closed (late)")
        if task.state is TaskState.RECEIVING:
            raise UpdateRejected(f"a result for task '{task_id[:12]}' is already being received")
        task.state = TaskState.RECEIVING
        return task

    def unclaim(self, task: Task) -> None:
        """The result transfer broke before it could be judged: the site may send it again."""
        if task.state is TaskState.RECEIVING:
            task.state = TaskState.SENT

    def complete(self, task: Task) -> None:
        task.state = TaskState.DONE
        task.payload = NO_PAYLOAD  # release the shared model bytes

    def cancel(self, tasks: list[Task]) -> None:
        for task in tasks:
            if task.state in (TaskState.PENDING, TaskState.SENT, TaskState.RECEIVING):
                task.state = TaskState.CANCELLED
                task.payload = NO_PAYLOAD

    def forget(self, job_id: str) -> None:
        """Drop a finished job's tasks, keeping only tombstones small enough to refuse replays."""
        for task in self._tasks.values():
            if task.job_id == job_id and task.state is not TaskState.DONE:
                task.state = TaskState.CANCELLED
            if task.job_id == job_id:
                task.payload = NO_PAYLOAD
                task.config = {}

    def get(self, task_id: str) -> Task | None:
        return self._tasks.get(task_id)
