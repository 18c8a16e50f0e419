"""The allocator settings of fedkit's processes (glibc only; elsewhere every call here is a no-op).

A model moves as thousands of ~1 MiB buffers (gRPC messages, Python bytes), allocated in gRPC's threads
and asyncio's worker threads and freed in others. Three settings keep that fast and its memory bounded:

- Reuse, not mmap (`tune_malloc`; server, site daemon, training worker). With glibc's defaults each
  buffer is mmap-ed and munmap-ed and every page faulted in again, which measured as the largest single
  cost of moving weights. Raised mmap and trim thresholds let the heap keep and reuse them.
- One malloc arena (`tune_malloc(one_arena=True)`; server and site daemon, not the worker, whose
  learner's threads do contend). glibc gives each thread that meets contention its own arena, up to 8 per
  core, and memory freed in one arena is reused only by that arena's threads; with the thresholds above,
  each arena kept its own high-water mark of chunks. Measured: the server's peak 70 MB lower (bench/server_memory.py,
  P=10M, N=2); a site daemon receiving a 1 GiB model peaked 55-97 MiB above its idle size with one arena,
  against 145-265 MiB with gRPC's four threads in four arenas (tests/e2e/test_big_model_round.py). The
  threads mostly wait on the event loop and the wire, so they rarely contend for the one arena.
- Giving free pages back after a transfer (`give_back_free_memory`). Between two chunks keeping them is
  right; after the transfer the heap would hold them until the next one, in the server through a round's
  close, in a daemon while it sits idle. malloc_trim(0) hands the free
  pages back (madvise) and keeps the heap's layout, so the next transfer costs a page fault per page,
  not a system call per chunk. The server does it once no transfer is in flight, not after each of a
  round's N: another site's transfer still uses those pages (measured at N=8, P=10M: about 10% of the
  server's CPU per round went to giving them back and faulting them in again).
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def tune_malloc(one_arena: bool = False) -> None:
    """Keep freed transfer buffers in the heap for reuse instead of returning each to the OS at once; with
    `one_arena`, in one heap for all threads. Call it before the process starts its threads."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum on 64-bit
        _LIBC.mallopt(M_TRIM_THRESHOLD, 512 << 20)
        if one_arena:
            _LIBC.mallopt(M_ARENA_MAX, 1)


def give_back_free_memory() -> None:
    """Return the heap's free pages to the OS (blocking for a few ms on a large heap: call it in a worker
    thread)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
