"""An idle site daemon holds only what registering and heartbeating need: NumPy, ml_dtypes, safetensors and
torch come with a site's first task, not with its start (issue 12: a site's idle footprint under 60 MB; NumPy
and ml_dtypes alone were 19 MB of it). A fresh interpreter imports the daemon's entry module and builds the
configuration, policies and daemon object a start builds, then lists what got imported.
tests/e2e/test_lean_site.py checks the same on a real registered daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from provision.local_study import LocalStudy

REPO = Path(__file__).resolve().parents[3]
HEAVY = ("numpy", "ml_dtypes", "safetensors", "torch", "matplotlib", "scipy")

_PROBE = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    from runtime.client.__main__ import kc, JobPolicy, PrivacyPolicy, PRIVACY_FILE, ClientDaemon
    from runtime.audit import AuditLog

    kit = Path(sys.argv[1])
    startup, local = kit / kc.STARTUP, kit / kc.LOCAL
    cfg = kc.load_model(startup / kc.CLIENT_CONFIG, kc.ClientKitConfig)
    settings = kc.load_optional(local / "site.yml", kc.SiteLocalSettings)
    policy = JobPolicy.load(local / "job_policy.yml")
    privacy = PrivacyPolicy.load(local / PRIVACY_FILE)
    ws = Path(sys.argv[2])
    audit = AuditLog(ws / "audit.jsonl")
    daemon = ClientDaemon(kit, cfg, settings, ws, audit, policy, asyncio.Event(), privacy=privacy)
    print(json.dumps(sorted(m.split(".")[0] for m in sys.modules)))
""")


def _imported_by_a_start(kit: Path, ws: Path) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(kit), str(ws)], capture_output=True, text=True,
                         env=env, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_an_idle_site_daemon_imports_no_numpy_ml_dtypes_or_torch(tmp_path):
    study = LocalStudy.create(REPO / "project.yml.example", tmp_path / "study")
    site = study.clients[0]
    study.write_local(site, "privacy.yml", {"exclude_vars": ["^secret"]})  # a floor: the chain's code is lazy too
    ws = tmp_path / "ws"
    ws.mkdir()
    imported = _imported_by_a_start(study.kits[site], ws)
    assert "grpc" in imported and "pydantic" in imported  # the probe really imported the daemon
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_the_training_worker_imports_no_torch_and_no_network_stack():
    """The worker of a job whose learner does not use torch never loads it (torch comes only with torchrun
    ranks or a local algorithm), nor the daemon's gRPC, TLS or event loop: it speaks JSON lines on pipes.
    Nor pydantic: the daemon validated the task, and pydantic was a third of the worker's start-up CPU."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    probe = "import json, sys, runtime.client.worker; print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = set(json.loads(out.stdout.splitlines()[-1]))
    assert "numpy" in imported  # the probe really imported the worker
    assert not imported & {"torch", "grpc", "cryptography", "asyncio", "pydantic", "matplotlib", "scipy"}, imported
