"""A job's initial model sent beside its archive (`submit_job FOLDER --initial-model FILE`), for models
larger than the job-archive cap (256 MiB): a 1 GB network does not belong in a zip that is hashed, signed,
unpacked on every site and validated in memory.

The upload stream stays one header and then data: the header's `archive_bytes` says where the archive
ends, and `initial_model` ({"bytes", "sha256"}) announces the model that follows it. Both parts spool to
files in the job store's incoming folder chunk by chunk (never held in memory), the model under its own
size cap (local/server.yml `max_initial_model_bytes`); the model's hash must match the one announced,
and its safetensors header and values are checked from the file (weights.check_file, reading a chunk at
a time) before the job is created. The runner then moves it to the job's models/initial.safetensors,
where the initial-model workflow finds it as the round-0 model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import JobRejected, UpdateRejected
from ..weights import check_file
from .upload_spool import Spooled, spool


@dataclass(frozen=True)
class Announced:
    """What the header says of the upload: the archive's length and, when one comes, the model's."""

    archive_bytes: int
    model_bytes: int
    model_sha256: str


def announced(args: dict[str, Any], max_archive_bytes: int, max_model_bytes: int) -> Announced | None:
    """The header's announcement of an initial model, checked against the caps; None when it has none
    (then the whole stream is the archive, as before)."""
    model = args.get("initial_model")
    if model is None:
        return None
    if not isinstance(model, dict) or not _is_count(model.get("bytes")) or not _is_sha256(model.get("sha256")):
        raise JobRejected("submit_job: 'initial_model' must be {bytes: N, sha256: HEX}; update the console")
    archive_bytes = args.get("archive_bytes")
    if not _is_count(archive_bytes):
        raise JobRejected("submit_job: an initial model needs 'archive_bytes' in the header; update the console")
    if archive_bytes > max_archive_bytes:
        raise JobRejected(f"job archive larger than {max_archive_bytes} bytes; make the job folder smaller "
                          "(give a large model with --initial-model)")
    if model["bytes"] > max_model_bytes:
        raise JobRejected(f"initial model of {model['bytes']} bytes is larger than this server accepts "
                          f"({max_model_bytes} bytes, max_initial_model_bytes in the server's local/server.yml)")
    return Announced(archive_bytes, model["bytes"], model["sha256"].lower())


async def spool_both(data: AsyncIterator[bytes], what: Announced, folder: Path) -> tuple[Spooled, Spooled]:
    """Spool the archive, then the model, from one data stream; JobRejected (and no file left) when a
    part is shorter or longer than announced, or the model's hash or content is wrong."""
    stream = _Split(data)
    archive = await spool(stream.take(what.archive_bytes), folder, what.archive_bytes)
    try:
        model = await spool(stream.take(what.model_bytes), folder, what.model_bytes)
        try:
            if await stream.has_more():
                raise JobRejected("upload: more data than the header announced (archive_bytes + initial_model "
                                  "bytes)")
            if model.sha256 != what.model_sha256:
                raise JobRejected("initial model: its SHA-256 is not the one announced (changed while it was "
                                  "sent?); submit again")
            try:
                await asyncio.to_thread(check_file, model.path)
            except UpdateRejected as e:
                raise JobRejected(f"initial model: {str(e).removeprefix(str(model.path) + ': ')}") from None
        except BaseException:
            model.path.unlink(missing_ok=True)
            raise
    except BaseException:
        archive.path.unlink(missing_ok=True)
        raise
    return archive, model


class _Split:
    """Consecutive exact-length parts of one stream of byte chunks."""

    def __init__(self, chunks: AsyncIterator[bytes]):
        self._chunks = aiter(chunks)
        self._left = b""

    async def take(self, n_bytes: int) -> AsyncIterator[bytes]:
        remaining = n_bytes
        while remaining > 0:
            data, self._left = self._left, b""
            while not data:
                data = await anext(self._chunks, None)
                if data is None:
                    raise JobRejected(f"upload ended {remaining} bytes short of what the header announced")
            if len(data) > remaining:
                data, self._left = data[:remaining], data[remaining:]
            remaining -= len(data)
            yield data

    async def has_more(self) -> bool:
        if self._left:
            return True
        async for data in self._chunks:
            if data:
                return True
        return False


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)
