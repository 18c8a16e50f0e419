"""A job worker's stderr on the site's disk, bounded: the job's code writes it, so it must not be able to
fill the site's disk with it.

The worker's stderr is a pipe; `pump` copies it into `worker_<job>.log` and, once that file reaches
`cap_bytes`, moves it to `worker_<job>.log.1` (replacing the older one) and starts a new one: a job's log
takes at most twice the cap on disk, and the newest lines (where a failure's traceback is) are always
kept. The rotation is noted in the new file, so a reader knows lines came before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path

MIB = 1 << 20
CAP_BYTES = 32 * MIB  # per file; two files per job at most
READ_BYTES = 64 << 10


class CappedLog:
    """Append-only log file of at most `cap_bytes`, rotated once into PATH.1 when full."""

    def __init__(self, path: Path, cap_bytes: int | None = None):
        self.path = path
        self._cap = cap_bytes or CAP_BYTES
        self._file = path.open("ab")
        self._size = self._file.tell()

    def write(self, data: bytes) -> None:
        while data:
            if self._size >= self._cap:
                self._rotate()
            room = self._cap - self._size
            piece, data = data[:room], data[room:]
            self._file.write(piece)
            self._size += len(piece)
        self._file.flush()

    def _rotate(self) -> None:
        self._file.close()
        self.path.replace(self.path.with_name(self.path.name + ".1"))
        self._file = self.path.open("ab")
        note = f"[fedkit: this log reached {self._cap // MIB} MiB; the lines before are in {self.path.name}.1]\n"
        self._file.write(note.encode())
        self._size = self._file.tell()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()


# ASCII control bytes but newline and tab: ESC would reach the terminal of whoever reads the log with `cat`
# or `tail` (clearing it, retitling it, faking lines); byte-wise, so a character cut between reads is intact
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


def inert(data: bytes) -> bytes:
    """`data` with each control byte written as its escape (\\x1b): read in the log, never obeyed."""
    return _CONTROL_BYTES.sub(lambda m: b"\\x%02x" % m.group()[0], data)


async def pump(stream: asyncio.StreamReader, log: CappedLog) -> None:
    """Copy `stream` (a worker's stderr, the job's code's words) into `log` until EOF, its control bytes
    escaped; file writes off the event loop."""
    try:
        while data := await stream.read(READ_BYTES):
            await asyncio.to_thread(log.write, inert(data))
    except OSError:  # the site's disk is full: drain the pipe, so the worker never blocks on its stderr
        while await stream.read(READ_BYTES):
            pass
    finally:
        log.close()
