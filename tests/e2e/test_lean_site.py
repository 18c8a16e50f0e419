"""A site holds only what it needs (issue 12: idle footprint under 60 MB; the worker does not import what the
job does not need), read from /proc/PID/maps of real processes: a registered site daemon with no job has no
NumPy, ml_dtypes, safetensors or torch mapped; the sandboxed worker of a NumPy-only job (bench/jobs/trivial),
after it trained a round, has NumPy mapped and no torch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from provision.local_study import LocalStudy, wait_until
from tests.soak.memory import children_by_parent

REPO = Path(__file__).resolve().parents[2]
TRIVIAL_JOB = REPO / "bench" / "jobs" / "trivial"

# a shared object each library maps as soon as it is imported
NUMPY, ML_DTYPES, SAFETENSORS, TORCH = "_multiarray_umath", "_ml_dtypes_ext", "_safetensors_rust", "libtorch"
GRPC = "cygrpc"


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _workers(daemon_pid: int) -> list[int]:
    """The training worker processes under a site daemon (the sandbox's bwrap sits in between)."""
    tree = children_by_parent()
    todo, found = list(tree.get(daemon_pid, [])), []
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"runtime.client.worker" in argv and not argv[0].endswith(b"bwrap"):
            found.append(pid)
    return found


def _states(study: LocalStudy) -> dict[str, str]:
    return {s["site"]: s["state"] for s in study.admin_json("check_status client")["sites"]}


def _server_audit(study: LocalStudy) -> list[dict[str, Any]]:
    path = study.kits[study.server] / "workspace" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_an_idle_site_maps_no_numpy_and_a_numpy_only_worker_no_torch(make_study, tmp_path):
    handle = make_study(sites=["site-1", "site-2"], heartbeat_timeout_s=60.0)
    study = handle.study
    study.start_server()
    study.start_sites(timeout_s=90)
    wait_until(lambda: _states(study) == {"site-1": "idle", "site-2": "idle"}, 90, "both sites idle")

    for site in study.clients:
        maps = _maps(study.procs[site].pid)
        assert GRPC in maps, f"{site}: not the daemon's maps"  # registered over gRPC: the reading is real
        for lib in (NUMPY, ML_DTYPES, SAFETENSORS, TORCH):
            assert lib not in maps, f"idle daemon of {site} has {lib} mapped"

    job = tmp_path / "job"
    shutil.copytree(TRIVIAL_JOB, job)
    job_id = study.admin_json(f"submit_job {job} --set server.rounds=1000 --set client.learner.args.n_params=1000 "
                              "--set meta.min_clients=2")["job_id"]
    wait_until(lambda: any(r["event"] == "round_done" and r["job_id"] == job_id and r["round"] >= 1
                           for r in _server_audit(study)), 120, "round 1 to finish")
    workers = {site: _workers(study.procs[site].pid) for site in study.clients}
    assert all(workers.values()), workers  # 1000 rounds: every site's worker is still up
    for site, pids in workers.items():
        for pid in pids:
            maps = _maps(pid)
            assert NUMPY in maps, f"{site}: worker {pid} shows no NumPy, so this reading proves nothing"
            assert TORCH not in maps and "/torch/_C" not in maps, f"{site}: worker of a NumPy-only job loaded torch"
    study.admin(f"abort_job {job_id}")  # the study stops either way; only its processes must go
