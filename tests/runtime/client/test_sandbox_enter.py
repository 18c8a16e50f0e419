"""sandbox_enter applies the fallback limits before it execs the sandbox, so they hold for every process
the job starts; a limit it cannot apply stops the start instead of running unlimited."""

from __future__ import annotations

import os
import subprocess
import sys

from runtime.client.sandbox_native import ENTER_SCRIPT

TIMEOUT_S = 60


def _enter(*options: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", "-S", str(ENTER_SCRIPT), *options, "--", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def test_address_space_limit_holds_in_the_command():
    done = _enter("--rlimit-as", str(1 << 30), code="bytearray(2 << 30)")
    assert done.returncode != 0 and "MemoryError" in done.stderr


def test_cpu_affinity_fallback_pins_to_as_many_cores():
    done = _enter("--cpus", "1", code="import os; print(len(os.sched_getaffinity(0)))")
    assert done.returncode == 0 and done.stdout.strip() == "1"


def test_a_cgroup_it_cannot_join_stops_the_start():
    done = _enter("--procs", "/nonexistent/cgroup.procs", code="print('ran')")
    assert done.returncode == 125 and "ran" not in done.stdout
    assert "cannot apply --procs" in done.stderr


def test_joins_by_writing_its_own_pid_which_the_command_keeps(tmp_path):
    procs = tmp_path / "cgroup.procs"
    done = _enter("--procs", str(procs), code="import os; print(os.getpid())")
    assert done.returncode == 0 and procs.read_text() == done.stdout.strip()
    assert int(procs.read_text()) != os.getpid()
