"""Private files stay private: a key readable by others stops a process before it uses it, and what a
running process writes (workspace, logs, audit trail, job folders) is readable by its owner only."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.audit import AuditLog
from runtime.certs import check_private_key_mode
from runtime.errors import CertificateError
from runtime.procs import PRIVATE_UMASK, workspace
from runtime.transport import TlsFiles


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_key_readable_by_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(mode)
    with pytest.raises(CertificateError) as err:
        check_private_key_mode(key)
    text = str(err.value)
    assert str(key) in text and f"chmod 600 {key}" in text and oct(mode)[2:] in text
    assert "\n" not in text


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_an_owner_only_key_passes(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "client.key"
    key.write_text("x")
    key.chmod(mode)
    check_private_key_mode(key)


def test_tls_files_refuse_a_shared_key_before_reading_it(tmp_path: Path) -> None:
    for name in ("c.crt", "c.key", "ca.pem"):
        (tmp_path / name).write_text("x")
    (tmp_path / "c.key").chmod(0o644)
    with pytest.raises(CertificateError, match="chmod 600"):
        TlsFiles(tmp_path / "c.crt", tmp_path / "c.key", tmp_path / "ca.pem").read()


def _in_child(code: str, cwd: Path) -> None:
    """Run `code` in a fresh interpreter (umask is process-wide: never change this test process's)."""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(
        Path(__file__).resolve().parents[2])}, timeout=60)


def test_private_umask_makes_new_files_and_folders_owner_only(tmp_path: Path) -> None:
    _in_child(
        "import os; from pathlib import Path; from runtime.procs import private_umask\n"
        "os.umask(0o022); private_umask()\n"
        "Path('d').mkdir(); Path('f').write_text('x'); os.makedirs('a/b/c')\n",
        tmp_path,
    )
    assert PRIVATE_UMASK == 0o077
    assert _mode(tmp_path / "d") == 0o700 and _mode(tmp_path / "a" / "b" / "c") == 0o700
    assert _mode(tmp_path / "f") == 0o600


def test_workspace_is_owner_only_even_when_it_existed(tmp_path: Path) -> None:
    (tmp_path / "kit" / "workspace").mkdir(parents=True)
    (tmp_path / "kit" / "workspace").chmod(0o755)
    assert _mode(workspace(tmp_path / "kit")) == 0o700
    assert _mode(workspace(tmp_path / "kit2")) == 0o700


def test_audit_log_file_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        AuditLog(tmp_path / "audit.jsonl").append("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "audit.jsonl") == 0o600


def test_a_process_that_asked_to_die_with_its_parent_does_when_the_parent_is_killed(tmp_path):
    """runtime.procs.die_with_parent, which every training worker calls first: a site daemon killed
    outright (SIGKILL) leaves no worker behind, whatever the sandbox backend."""
    import signal
    import textwrap

    from provision.local_study import wait_until

    child = textwrap.dedent("""
        import sys, time
        from runtime.procs import die_with_parent
        die_with_parent()
        print("ready", flush=True)
        time.sleep(600)
    """)
    parent = textwrap.dedent(f"""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=subprocess.PIPE, text=True)
        child.stdout.readline()
        print(child.pid, flush=True)
        child.wait()
    """)
    repo = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, cwd=repo,
                            env={**os.environ, "PYTHONPATH": repo})
    child_pid = int(proc.stdout.readline())

    proc.send_signal(signal.SIGKILL)
    proc.wait(30)

    def gone() -> bool:
        try:
            state = Path(f"/proc/{child_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        return state == "Z"

    wait_until(gone, 30, "the child to die with its parent")
