"""bench/_procs.py's memory split (what scale.py reports as each daemon's share of a machine) and its CPU
counters (the CPU-seconds scale.py reports for submit -> round 1)."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

from bench._procs import Periodic, cpu_seconds, machine_busy_s, shared_memory_split

MB = 1 << 20


def _rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_page_shared_with_a_child_is_half_charged_to_each():
    shared = mmap.mmap(-1, 64 * MB, flags=mmap.MAP_SHARED)
    shared.write(b"x" * (64 * MB))  # resident in this process
    before = shared_memory_split(os.getpid())
    ready_r, ready_w = os.pipe()  # child -> parent: every page touched
    go_r, go_w = os.pipe()  # parent -> child: measured, exit now
    child = os.fork()
    if child == 0:
        sum(shared[i] for i in range(0, 64 * MB, mmap.PAGESIZE))
        os.write(ready_w, b"1")
        os.read(go_r, 1)
        os._exit(0)
    try:
        os.read(ready_r, 1)
        after = shared_memory_split(os.getpid())
        assert _rss(os.getpid()) >= 64 * MB
        # the 64 MB are now charged half to each process, and are no longer private to this one
        assert before["pss"] - after["pss"] > 24 * MB
        assert before["private"] - after["private"] > 48 * MB
        assert after["private"] <= after["pss"] <= _rss(os.getpid())
    finally:
        os.write(go_w, b"1")
        os.waitpid(child, 0)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
        shared.close()


def test_a_process_that_is_gone_reports_nothing():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert shared_memory_split(int(proc.stdout)) == {"pss": 0, "private": 0}


def test_the_cpu_counters_see_a_process_spin():
    spin = ("import sys, time\n"
            "while time.process_time() < 0.5: pass\n"
            "print('spun', flush=True); sys.stdin.read()")
    machine_before = machine_busy_s()
    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "spun\n"
        used = cpu_seconds(child.pid)
        assert 0.45 <= used < 60, used  # /proc counts whole clock ticks
        assert machine_busy_s() - machine_before >= used - 0.05  # a clock tick's rounding on each reading
    finally:
        child.communicate("")
    assert cpu_seconds(child.pid) == 0.0  # gone (reaped): nothing to read


def test_a_periodic_sampler_samples_on_entering_and_leaving_and_stops_after():
    class Counting(Periodic):
        def __init__(self) -> None:
            super().__init__(0.01)
            self.count = 0

        def sample(self) -> None:
            self.count += 1

    with Counting() as sampler:
        pass
    after_exit = sampler.count
    assert after_exit >= 2  # once on each side, even for a block shorter than an interval
    sampler._stop.wait(0.05)
    assert sampler.count == after_exit, "the thread samples no more once the block is left"
