"""provision/local_study.py: the study harness the demo, the benchmarks and the end-to-end tests share.
Ports it picks cannot be taken by outgoing connections in between, and nothing it starts outlives the
process that started it, even when that process is killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from provision.local_study import _ephemeral_range, free_port, wait_until

from ..conftest import EXAMPLE_PROJECT, REPO


def test_free_ports_lie_outside_the_ephemeral_range() -> None:
    low, high = _ephemeral_range()

    ports = [free_port() for _ in range(50)]

    assert all(not low <= p <= high for p in ports)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_a_study_dies_with_the_process_that_started_it_even_when_that_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from provision.local_study import LocalStudy
        study = LocalStudy.create(Path({str(EXAMPLE_PROJECT)!r}), Path({str(tmp_path / "study")!r}))
        proc = study.start_server()
        print(proc.pid, flush=True)
        time.sleep(600)
    """)
    starter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    server_pid = 0
    try:
        server_pid = int(starter.stdout.readline())
        assert _alive(server_pid)

        starter.send_signal(signal.SIGKILL)  # the test run itself dies: no cleanup code runs
        starter.wait(30)

        wait_until(lambda: not _alive(server_pid), 60, "the orphaned study server to exit")
    finally:
        starter.kill()
        if server_pid and _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)
