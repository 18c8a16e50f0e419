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

from ..kit_config import SiteLocalSettings

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def granted_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def threads_per_rank(settings: SiteLocalSettings, nproc: int) -> int:
    """Threads for each of the worker's `nproc` ranks."""
    if settings.threads is not None:
        return settings.threads
    cores = math.ceil(settings.sandbox.cpus) if settings.sandbox.cpus else granted_cores()
    return max(1, cores // max(1, nproc))


def thread_env(threads: int) -> dict[str, str]:
    """The environment that caps torch's and BLAS's threads (torch reads OMP_NUM_THREADS as it starts)."""
    return {name: str(threads) for name in THREAD_VARIABLES}
