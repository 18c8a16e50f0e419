"""runtime/client/worker_log.py: a job's stderr cannot fill the site's disk. The log keeps at most two files
of the cap, the newest lines always in the current one, and a note where it rotated; through the real
native sandbox, a worker that writes far more than the cap leaves a bounded log and still exits normally."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from runtime.client.sandbox import OffSandbox, SandboxLimits, WorkerLaunch
from runtime.client.sandbox_native import NativeSandbox
from runtime.client.worker_log import CappedLog, pump


def test_a_log_under_its_cap_is_one_file_as_written(tmp_path: Path) -> None:
    log = CappedLog(tmp_path / "w.log", cap_bytes=100)
    log.write(b"line 1\n")
    log.write(b"line 2\n")
    log.close()

    assert (tmp_path / "w.log").read_bytes() == b"line 1\nline 2\n"
    assert not (tmp_path / "w.log.1").exists()


def test_a_full_log_rotates_once_and_keeps_the_newest_lines(tmp_path: Path) -> None:
    log = CappedLog(tmp_path / "w.log", cap_bytes=1000)
    for i in range(500):  # about 5.4 kB: five times the cap
        log.write(f"line {i}\n".encode())
    log.close()

    current, older = (tmp_path / "w.log").read_bytes(), (tmp_path / "w.log.1").read_bytes()
    assert len(current) <= 1000 and len(older) <= 1000
    assert current.endswith(b"line 499\n")  # where a failure's traceback would be
    assert current.startswith(b"[fedkit: this log reached ") and b"w.log.1]" in current.splitlines()[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.log", "w.log.1"]


def test_pump_copies_a_stream_to_its_end_and_closes_the_log(tmp_path: Path) -> None:
    async def scenario() -> None:
        stream = asyncio.StreamReader()
        stream.feed_data(b"a" * 2500)
        stream.feed_eof()
        await pump(stream, CappedLog(tmp_path / "w.log", cap_bytes=1000))

    asyncio.run(scenario())

    assert (tmp_path / "w.log.1").stat().st_size == 1000
    assert (tmp_path / "w.log").read_bytes().endswith(b"a" * 500)


def test_pump_writes_a_jobs_control_bytes_as_text(tmp_path: Path) -> None:
    # the job's stderr is read by site IT with cat or tail: ESC would clear or retitle their terminal
    async def scenario() -> None:
        stream = asyncio.StreamReader()
        stream.feed_data("ok\x1b[2J\x1b]0;pwned\x07\rhidden\tcol é\n".encode())
        stream.feed_eof()
        await pump(stream, CappedLog(tmp_path / "w.log"))

    asyncio.run(scenario())
    assert (tmp_path / "w.log").read_text() == "ok\\x1b[2J\\x1b]0;pwned\\x07\\x0dhidden\tcol é\n"


FLOOD = """
import sys
chunk = "x" * 65535 + "\\n"
for _ in range(int(sys.argv[1])):
    sys.stderr.write(chunk)
sys.stderr.write("the last line\\n")
print("done", flush=True)
"""


@pytest.mark.parametrize("backend", ["native", "off"])
def test_a_worker_flooding_its_stderr_leaves_a_bounded_log(tmp_path: Path, backend: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("runtime.client.worker_log.CAP_BYTES", 1 << 20)
    sandbox = NativeSandbox() if backend == "native" else OffSandbox()
    if backend == "native":
        assert sandbox.unavailable_reason() is None  # bubblewrap is a test dependency here
    code_dir, scratch = tmp_path / "code", tmp_path / "scratch"
    for folder in (code_dir, scratch, tmp_path / "runtime", tmp_path / "outbox"):
        folder.mkdir()
    (code_dir / "flood.py").write_text(FLOOD)
    log_path = tmp_path / "worker.log"
    launch = WorkerLaunch(argv=(sys.executable, str(code_dir / "flood.py"), "160"),  # 10 MiB, ten times the cap
                          env={"PATH": "/usr/bin:/bin"}, runtime_dir=tmp_path / "runtime", read_only=(code_dir,),
                          writable=(scratch, tmp_path / "outbox"), gpus=(), limits=SandboxLimits(),
                          log_path=log_path, cwd=scratch)

    async def scenario() -> tuple[bytes, int]:
        proc = await sandbox.start(launch)
        try:
            proc.stdin.close()
            out = await asyncio.wait_for(proc.stdout.read(), 60)
            code = await asyncio.wait_for(proc.wait(), 60)
            await asyncio.wait_for(proc.log_pump, 60)  # type: ignore[attr-defined]
        finally:
            sandbox.kill(proc)
            await proc.wait()
        return out, code

    out, code = asyncio.run(scenario())

    assert (out, code) == (b"done\n", 0)
    assert log_path.stat().st_size <= 1 << 20 and (tmp_path / "worker.log.1").stat().st_size <= 1 << 20
    assert log_path.read_bytes().endswith(b"the last line\n")


@pytest.mark.parametrize("backend", ["native", "off"])
def test_a_log_that_cannot_be_opened_starts_no_worker(tmp_path: Path, backend: str) -> None:
    """The site's disk is full, or the log's place is taken: the start fails before any job code runs."""
    sandbox = NativeSandbox() if backend == "native" else OffSandbox()
    code_dir, scratch, outbox = tmp_path / "code", tmp_path / "scratch", tmp_path / "outbox"
    for folder in (code_dir, scratch, outbox, tmp_path / "runtime"):
        folder.mkdir()
    ran = scratch / "ran"
    (code_dir / "mark.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    log_path = tmp_path / "worker.log"
    log_path.mkdir()  # a folder where the log file should go: opening it fails as a full disk would
    launch = WorkerLaunch(argv=(sys.executable, str(code_dir / "mark.py")), env={"PATH": "/usr/bin:/bin"},
                          runtime_dir=tmp_path / "runtime", read_only=(code_dir,), writable=(scratch, outbox),
                          gpus=(), limits=SandboxLimits(), log_path=log_path, cwd=scratch)

    async def scenario() -> None:
        with pytest.raises(OSError):
            await sandbox.start(launch)
        await asyncio.sleep(1.0)  # time enough for a started worker to leave its mark

    asyncio.run(scenario())

    assert not ran.exists()
