"""Which sandbox a site gets from local/site.yml, and what happens when it cannot have it."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging

import pytest

from runtime.audit import AuditLog
from runtime.client.sandbox import OffSandbox, SandboxUnavailable, choose_sandbox, limits_of, sandbox_for_job
from runtime.client.sandbox_native import NativeSandbox
from runtime.kit_config import SandboxSettings

HAS_DOCKER_BACKEND = importlib.util.find_spec("runtime.client.sandbox_docker") is not None


def test_auto_is_native_outside_docker():
    assert isinstance(choose_sandbox(SandboxSettings(), environ={}), NativeSandbox)


def test_auto_is_docker_inside_docker():
    settings = SandboxSettings()
    if HAS_DOCKER_BACKEND:
        assert choose_sandbox(settings, environ={"FEDKIT_IN_DOCKER": "1"}).name == "docker"
    else:
        with pytest.raises(SandboxUnavailable, match="docker sandbox backend is not available"):
            choose_sandbox(settings, environ={"FEDKIT_IN_DOCKER": "1"})


def test_off_is_warned_in_the_site_log_every_time(caplog):
    with caplog.at_level(logging.WARNING, logger="fedkit.client"):
        assert isinstance(choose_sandbox(SandboxSettings(backend="off"), environ={}), OffSandbox)
        choose_sandbox(SandboxSettings(backend="off"), environ={})
    assert sum("sandbox.backend is off" in r.message for r in caplog.records) == 2


def test_an_unavailable_backend_refuses_the_job_with_the_fix():
    sandbox = NativeSandbox(SandboxSettings(backend="native"), bwrap="/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable) as info:
        asyncio.run(sandbox.ensure_available())
    message = str(info.value)
    assert "bubblewrap" in message and "sandbox.backend: off" in message and "\n" not in message


def test_limits_are_in_bytes():
    limits = limits_of(SandboxSettings(cpus=1.5, memory_mb=256, pids=100))
    assert (limits.cpus, limits.memory_bytes, limits.pids) == (1.5, 256 << 20, 100)


def test_a_refusal_is_audited_with_its_reason(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    settings = SandboxSettings(backend="native")
    with pytest.raises(SandboxUnavailable):
        asyncio.run(sandbox_for_job(settings, audit, "job-1",
                                    choose=lambda s: NativeSandbox(s, bwrap="/nonexistent/bwrap")))
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "sandbox_unavailable" and records[-1]["job_id"] == "job-1"
    assert "bubblewrap" in records[-1]["reason"] and records[-1]["backend"] == "native"


def test_an_available_backend_is_returned_unaudited(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    sandbox = asyncio.run(sandbox_for_job(SandboxSettings(backend="off"), audit, "job-1"))
    assert sandbox.name == "off"
    log_file = tmp_path / "audit.jsonl"
    assert not log_file.exists() or "sandbox_unavailable" not in log_file.read_text()
