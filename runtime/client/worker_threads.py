"""How many CPU threads a training worker's torch and BLAS may use.

Left alone, torch and OpenMP start one thread per core of the machine in every process. Several workers on
one machine (sites of a demo, a site beside other services, torchrun ranks) then fight over the same cores:
five tabular workers on a 2-core machine took about 190 ms per epoch each, against about 10 ms with one
thread each. So the worker gets the cores it is granted, split between its ranks: `threads` in
local/site.yml, else the sandbox's `cpus` limit, else the cores this process may run on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from ..kit_config import SiteLocalSettings

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# OpenBLAS's idle threads spin for 2^28 cycles (about 0.1 s) before they sleep: once its pool starts (NumPy's
# import) and after every BLAS call. On an idle machine that spin was 0.12 of the 0.32 CPU-seconds a worker
# took to start, on cores the site's other work could use (on a busy one the spinning threads yield: 40
# workers started at once took as long either way). 2^20 cycles (well under a millisecond) left
# back-to-back matmuls as fast, within this machine's noise.
BLAS_SPIN = {"OPENBLAS_THREAD_TIMEOUT": "20"}


def granted_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(settings: SiteLocalSettings, nproc: int) -> int:
    """Threads for each of the worker's `nproc` ranks."""
    if settings.threads is not None:
        return settings.threads
    # a cpus limit above the machine's cores grants no more of them (64 threads on 2 cores is slower)
    cores = min(math.ceil(settings.sandbox.cpus), granted_cores()) if settings.sandbox.cpus else granted_cores()
    return max(1, cores // max(1, nproc))


def short_blas_spin(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with OpenBLAS's idle spin shortened, unless `env` sets its own."""
    return {**BLAS_SPIN, **env}


def thread_env(threads: int) -> dict[str, str]:
    """The environment that caps torch's and BLAS's threads (torch reads OMP_NUM_THREADS as it starts)."""
    return {name: str(threads) for name in THREAD_VARIABLES}
