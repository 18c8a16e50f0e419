"""Which sandbox a site gets from local/site.yml, and what happens when it cannot have it."""

from __future__ import annotations

import asyncio
import importlib.util
import logging

import pytest

from runtime.client.sandbox import OffSandbox, SandboxUnavailable, choose_sandbox, limits_of
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
