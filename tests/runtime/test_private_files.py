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
