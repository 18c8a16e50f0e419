"""The server's allocator settings: what keeps its peak memory near "idle + 3x the model" (issue 12).

Two things, both glibc-only (elsewhere they are no-ops):

- One malloc arena (`limit_arenas`). glibc gives each thread that meets contention its own arena, up to
  8 per core, and memory freed in one arena is only reused by the threads of that arena. The server
  moves model bytes in gRPC's threads and in asyncio's worker threads (hashing, file I/O, folds), so
  each of them kept its own high-water mark of chunks and tensors. Measured (bench/server_memory.py,
  P=10M, N=2): 70 MB less peak with one arena; the threads mostly wait on the event loop and the wire,
  so they rarely contend for it.
- Giving free heap pages back after each model transfer (`give_back_free_memory`). The process keeps
  freed memory in its heap (procs.tune_malloc raises the trim threshold, so that 1 MiB transfer
  buffers are reused rather than faulted in again): between two transfers that is right, but at the
  round's close the heap still held every chunk of the round's transfers while the new model was
  allocated beside the old one. malloc_trim(0) hands the free pages back (madvise), keeping the heap's
  layout, so the next transfer's buffers cost a page fault each, not a system call per chunk. Measured:
  the server's RSS between transfers falls by tens of MB (P=10M, N=2); its effect on the peak alone
  was within the run-to-run spread.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def limit_arenas(n_arenas: int = 1) -> None:
    """At most `n_arenas` malloc arenas for this process; call it before the server starts its threads."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(M_ARENA_MAX, n_arenas)


def give_back_free_memory() -> None:
    """Return the heap's free pages to the OS (blocking for a few ms on a large heap: call it in a worker
    thread)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
