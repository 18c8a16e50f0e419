"""A job's error that looks like the sandbox's doing (a hidden file, no network, a read-only folder) says
so, so a researcher does not go looking for a missing file or a server that is down."""

from __future__ import annotations

import pytest

from runtime.client.worker_handle import SANDBOX_HINT, _with_sandbox_hint


@pytest.mark.parametrize("error", [
    "FileNotFoundError: [Errno 2] No such file or directory: '/srv/kits/site-1/startup/client.key'",
    "ConnectionRefusedError: [Errno 111] Connection refused",
    "OSError: [Errno 30] Read-only file system: '/data/site-1/out.csv'",
    "PermissionError: [Errno 13] Permission denied: '/etc/shadow'",
    "socket.gaierror: [Errno -3] Temporary failure in name resolution",
])
@pytest.mark.parametrize("backend", ["native", "docker"])
def test_a_sandbox_symptom_gets_the_hint(error: str, backend: str) -> None:
    assert _with_sandbox_hint(error, backend) == f"{error} ({SANDBOX_HINT})"


def test_other_errors_and_an_unsandboxed_site_are_left_as_they_are() -> None:
    assert _with_sandbox_hint("ValueError: lr must be positive", "native") == "ValueError: lr must be positive"
    refused = "ConnectionRefusedError: [Errno 111] Connection refused"
    assert _with_sandbox_hint(refused, "off") == refused  # no sandbox: the hint would mislead
