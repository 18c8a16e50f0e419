"""The Federation service's behaviour, free of gRPC: register, heartbeat, hand out tasks, stream job
archives, and take results in. Identity always comes from the caller's certificate (`peer`)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from ..audit import AuditLog
from ..errors import FedkitError, JobRejected, PermissionDenied, SessionExpired, TransferStalled, UpdateRejected
from ..heap import give_back_free_memory
from ..identity import Identity
from ..plain_text import shown
from ..proto import fedkit_pb2 as pb
from ..transport import CHUNK_BYTES, with_idle_timeout
from .metrics_check import decode_metrics
from .registry import Registry
from .runner import JobRunner
from .site_controls import SiteControls
from .taskboard import TaskBoard
from .transfer_slots import TransferSlots
from .update_spool import IncomingUpdate

MAX_REFUSED_COPIES = 1024  # instance ids of refused copies remembered (to log each once)
MAX_SITE_ERROR_CHARS = 2000  # a site sends at most ~1,000 characters of a job's error text, plus its own words

log = logging.getLogger(__name__)

MAX_POLL_S = 30.0


class FederationService:
    def __init__(self, registry: Registry, board: TaskBoard, runner: JobRunner, audit: AuditLog,
                 heartbeat_interval_s: float, max_concurrent_uploads: int, max_concurrent_downloads: int,
                 controls: SiteControls):
        self._registry = registry
        self._board = board
        self._runner = runner
        self._audit = audit
        self._heartbeat_interval_s = heartbeat_interval_s
        self._controls = controls
        # Bounds the update buffers held at once, so server memory stays O(model), not O(sites x model).
        self._upload_slots = TransferSlots(max_concurrent_uploads)
        self._download_slots = TransferSlots(max_concurrent_downloads)
        self._free_buffers: list[bytearray] = []
        self._moving = 0  # model transfers in flight, either way: the heap's free pages go back once none is
        self._refused_copies: set[str] = set()  # instance ids of second copies of a site, refused (logged once)

    async def _append_audit(self, event: str, **fields) -> None:
        """An audit record, written (and fsynced) in a worker thread: an fsync on the event loop would stall
        every site's transfer for as long as the disk takes."""
        await asyncio.to_thread(self._audit.append, event, **fields)

    def _check_session(self, peer: Identity, session_id: str) -> None:
        session = self._registry.session(peer.name)
        if session is None or session.session_id != session_id:
            raise SessionExpired(f"unknown session for {peer.name}; register again")

    async def register(self, peer: Identity, request: pb.RegisterRequest) -> pb.RegisterReply:
        try:
            host_info = json.loads(request.host_info_json or "{}")
        except json.JSONDecodeError:
            host_info = {}
        instance_id = request.instance_id[:64]  # a site's own random id; a peer's text, so bounded
        holder = self._registry.held_by_another(peer.name, instance_id)
        if holder is not None:
            where = holder.host_info.get("hostname", "?")
            if instance_id not in self._refused_copies:  # once per process, not at each of its retries
                if len(self._refused_copies) >= MAX_REFUSED_COPIES:  # a bound, whatever a peer sends
                    self._refused_copies.clear()
                self._refused_copies.add(instance_id)
                log.warning("site %s: a second copy of its kit tried to register (from %s) while the one on %s is "
                            "connected; refused", peer.name, host_info.get("hostname", "?"), where)
                await self._append_audit("site_copy_refused", site=peer.name, connected_on=where,
                                         refused_on=str(host_info.get("hostname", "?")))
            wait_s = max(0.0, self._registry.heartbeat_timeout_s - (self._registry.seconds_since_seen(peer.name) or 0))
            raise PermissionDenied(f"denied: {peer.name} is already connected to this server (from host {where}): "
                                   "another copy of this site's kit is running (stop one of them with "
                                   "startup/stop.sh), or its previous process died without closing its connection "
                                   f"(then this one is let in within {wait_s:.0f} s)")
        session, rejoin = self._registry.register(peer, {str(k): str(v) for k, v in dict(host_info).items()},
                                                  instance_id)
        self._controls.forget(peer.name)  # a new session: words queued for the one before are not for it
        resent = self._board.resend_all(peer.name) if rejoin else 0
        log.info("site %s (%s) %s%s", peer.name, peer.org, "rejoined" if rejoin else "registered",
                 f", {resent} unanswered task(s) resent" if resent else "")
        await self._append_audit("site_registered", site=peer.name, org=peer.org, rejoin=rejoin)
        return pb.RegisterReply(session_id=session.session_id, heartbeat_interval_s=self._heartbeat_interval_s)

    async def heartbeat(self, peer: Identity, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        known = self._registry.touch(peer.name, request.session_id, request.job_id, request.round)
        stale: list[str] = []
        current = self._runner.current
        if request.job_id and (current is None or current.record.job_id != request.job_id):
            stale.append(request.job_id)  # finished, aborted or never ours: the site should stop it
        if request.log_tail and known:
            self._controls.log_received(peer.name, request.log_tail)
        if request.stopping and known:
            self._registry.mark_stopped(peer.name)
            log.info("site %s: stopped by its site", peer.name)
            await self._append_audit("site_stopped", site=peer.name)
            return pb.HeartbeatReply()
        control = self._controls.next_for(peer.name) if known else ""
        if control:
            await self._append_audit("control_delivered", site=peer.name, control=control)
        return pb.HeartbeatReply(must_reregister=not known, aborted_jobs=stale, control=control)

    async def presence(self, peer: Identity, request: pb.PresenceRequest) -> AsyncIterator[pb.PresenceEvent]:
        """Held open while the site is connected; the call ends (cancelled) when its connection drops."""
        self._check_session(peer, request.session_id)
        connection = self._registry.connected(peer.name)
        try:
            await asyncio.Event().wait()  # nothing to send: the call's end is the message
            yield pb.PresenceEvent()  # pragma: no cover (unreachable; makes this an async generator)
        finally:
            self._registry.disconnected(peer.name, connection)
            session = self._registry.session(peer.name)
            if session is not None and not session.is_stopped and self._registry.is_suspect(peer.name):
                log.info("site %s: connection dropped; dead in %.0f s unless it reconnects", peer.name,
                         self._registry.disconnect_grace_s)

    async def get_task(self, peer: Identity, request: pb.GetTaskRequest) -> AsyncIterator[pb.TaskChunk | bytes]:
        self._check_session(peer, request.session_id)
        self._registry.touch(peer.name, request.session_id)
        wait_s = min(max(request.wait_s, 0.0), MAX_POLL_S)
        task = await self._board.next_for(peer.name, wait_s)
        if task is None:
            yield pb.TaskChunk(idle=pb.Idle())
            return
        payload = task.payload
        if payload.nbytes and not await self._download_slots.try_acquire(wait_s):
            self._board.unsend(task)  # every slot busy: the site polls again and gets it then
            yield pb.TaskChunk(idle=pb.Idle())
            return
        if payload.nbytes:
            self._moving += 1
        try:
            yield pb.TaskChunk(header=pb.TaskHeader(
                task_id=task.task_id, job_id=task.job_id, task_name=task.name, round=task.round,
                config_json=json.dumps(task.config), payload_bytes=payload.nbytes,
                payload_sha256=payload.sha256, timeout_s=task.timeout_s, job_sha256=task.job_sha256))
            async for chunk in payload.stream():
                yield chunk  # raw: the bulk service sends it as is, with no protobuf copy
        except BaseException:
            self._board.unsend(task)  # the transfer broke: offer the task again
            raise
        finally:
            if payload.nbytes:
                self._download_slots.release()
                self._moving -= 1
        await self._append_audit("task_sent", site=peer.name, job_id=task.job_id, task=task.name, round=task.round,
                           task_id=task.task_id)
        if payload.nbytes:
            await self._give_back_when_still()

    async def _give_back_when_still(self) -> None:
        """The heap's free pages back to the OS (runtime/heap.py) once no model transfer is in flight. While
        one is, they are the buffers its next chunks use: given back after each of N transfers in a round,
        the others fault them in again."""
        if self._moving == 0:
            await asyncio.to_thread(give_back_free_memory)

    async def get_job(self, peer: Identity, request: pb.GetJobRequest) -> AsyncIterator[pb.DataChunk]:
        self._check_session(peer, request.session_id)
        current = self._runner.current
        if current is None or current.record.job_id != request.job_id:
            raise JobRejected(f"job {request.job_id[:64]} is not running")
        if not current.is_selected(peer.name):
            await self._append_audit("job_fetch_refused", site=peer.name, job_id=current.record.job_id)
            raise JobRejected(f"{peer.name} is not one of the sites job {current.record.job_id} runs on")
        # streamed from disk: several sites fetching a large archive at once must not each cost its size
        with (self._runner.store.job_dir(request.job_id) / "job.zip").open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, CHUNK_BYTES):
                yield pb.DataChunk(data=chunk)

    async def _receive(self, task, controller, header: pb.ResultHeader,
                       chunks: AsyncIterator[pb.ResultChunk | bytes]) -> str:
        """Take the payload in, check it and hand it to the controller; returns its SHA-256."""
        metrics = decode_metrics(header.metrics_json)
        # a site's words, shaped in part by a job's code: one bounded line of plain text from here on (the
        # job's record, show_job, the server's log and audit)
        error = shown(" ".join(header.error[:MAX_SITE_ERROR_CHARS].split())) if header.error else ""
        if not header.payload_bytes or error:
            if error and header.declines_job:
                await controller.declined(task.site, error)
            await controller.accept_result(task, int(header.n_samples), metrics, error, None)
            return ""
        await self._upload_slots.acquire(header.lease_id, task.site)
        incoming = None
        self._moving += 1
        try:
            # in memory when small, else spooled to disk and mapped for its fold (update_spool.py)
            incoming = IncomingUpdate(header.payload_bytes, controller.max_payload_bytes(task), header.payload_sha256,
                                      controller.spool_files, self._free_buffers)
            receiver = incoming.receiver
            trailer = ""
            async for chunk in with_idle_timeout(chunks, what=f"upload from {task.site}"):
                raw = isinstance(chunk, bytes)  # the bulk service's payload; a legacy site sends `data` fields
                kind = "data" if raw else chunk.WhichOneof("kind")
                if kind == "data" and not trailer:
                    # hashing and copying: off the loop
                    await asyncio.to_thread(receiver.add, chunk if raw else chunk.data)
                elif kind == "sha256" and not trailer:
                    trailer = chunk.sha256
                else:
                    raise UpdateRejected(f"unexpected '{kind}' message in a result stream")
            if not trailer and not header.payload_sha256:
                # an honest site always ends with the hash trailer: the link broke, the site may resend
                raise TransferStalled(f"upload from {task.site} ended before its end marker")
            payload = await asyncio.to_thread(incoming.finish, trailer)
            await controller.accept_result(task, int(header.n_samples), metrics, error, payload)
        finally:
            self._moving -= 1
            try:
                if incoming is not None:  # the buffer or spool file back for reuse; then the round's chunks
                    await asyncio.to_thread(_release, incoming)
                    await self._give_back_when_still()  # out of the heap, once no other transfer needs them
            finally:
                # even when gRPC cancels the handler again during that await (a reset link does): a slot
                # lost here left the site asking for one for ever (tests/runtime/server/test_upload_cut.py)
                self._upload_slots.release(task.site)
        return receiver.sha256

    async def reserve_upload(self, peer: Identity, request: pb.ReserveRequest) -> pb.ReserveReply:
        self._check_session(peer, request.session_id)
        self._registry.touch(peer.name, request.session_id)
        lease = await self._upload_slots.reserve(min(max(request.wait_s, 0.0), MAX_POLL_S), peer.name)
        return pb.ReserveReply(lease_id=lease, lease_s=self._upload_slots.lease_s)

    async def submit_result(self, peer: Identity, chunks: AsyncIterator[pb.ResultChunk | bytes]) -> pb.SubmitReply:
        chunks = _decoded(chunks)
        try:
            first = await anext(chunks, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise UpdateRejected("result stream must start with a header")
        except UpdateRejected as e:
            log.warning("result from %s refused: %s", peer.name, e)
            await self._append_audit("result_refused", site=peer.name, task_id="", reason=str(e))
            return pb.SubmitReply(accepted=False, reason=str(e))
        header = first.header
        self._check_session(peer, header.session_id)
        self._registry.touch(peer.name, header.session_id)
        task, sha256 = None, ""
        try:
            task = self._board.claim(header.task_id, peer.name)
            controller = self._runner.controller_for(task.job_id)
            try:
                sha256 = await self._receive(task, controller, header, chunks)
            except (UpdateRejected, JobRejected) as e:
                await controller.reject(task, str(e))  # a malformed result counts as this site's answer: failed
                raise
            except BaseException:
                self._board.unclaim(task)  # the stream broke: the site may send it again
                raise
        except (UpdateRejected, JobRejected) as e:
            log.warning("result from %s refused: %s", peer.name, e)
            await self._append_audit("result_refused", site=peer.name, task_id=header.task_id[:24], reason=str(e))
            return pb.SubmitReply(accepted=False, reason=str(e))
        assert task is not None
        await self._append_audit("result_accepted", site=peer.name, job_id=task.job_id, round=task.round,
                           task=task.name, n_samples=int(header.n_samples),
                           payload_sha256=sha256)
        return pb.SubmitReply(accepted=True)


def _release(incoming: IncomingUpdate) -> None:
    incoming.release()


async def _decoded(chunks: AsyncIterator[pb.ResultChunk | bytes]) -> AsyncIterator[pb.ResultChunk | bytes]:
    """The stream's messages; a message that does not decode (malformed protobuf) becomes UpdateRejected
    rather than an internal error."""
    iterator = aiter(chunks)
    while True:
        try:
            chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except FedkitError:
            raise
        except Exception as e:  # gRPC surfaces a failed deserialization as a plain exception
            raise UpdateRejected(f"malformed message in the result stream ({type(e).__name__})") from None
        yield chunk
