"""A 2 GB model (P = 500M float32) through a full FedAvg round with 2 sites, on one machine: the
server's, each site daemon's and each worker's peak memory, and the round's time.

Real processes from provisioned kits, mutual TLS on 127.0.0.1, the trivial learner of bench/jobs/trivial
(returns a constant delta). The initial model is given with `submit_job --initial-model` (a sparse file
of zeros: its size is what matters), so no site builds it. The job runs round 1 (the model to both sites,
both deltas back, folded, the new global model saved) and the final validation (the new model to both
sites). Peak memory is each process's VmHWM, sampled from /proc while the job runs (workers come and go).

    python bench/big_model.py                         # P=500M (2 GB), 2 sites
    python bench/big_model.py --params 250000000      # 1 GB, where 2 GB does not fit beside other work

Needs about 5 x the model in free memory (server about 1x above its idle size, each worker 2x while it
trains; the daemons stay small) and about 10 x the model on disk (kits, received models, spooled updates).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._procs import Periodic, peak_rss_bytes, tree_pids  # noqa: E402
from bench.round_overhead import _sites_edit  # noqa: E402
from provision.local_study import LocalStudy  # noqa: E402

JOB = REPO / "bench" / "jobs" / "trivial"
MIB = 1 << 20


def sparse_model(path: Path, params: int, n_tensors: int) -> Path:
    """A safetensors file of `n_tensors` float32 tensors of zeros, `params` in all, sparse on disk."""
    sizes = [params // n_tensors] * n_tensors
    sizes[-1] += params - sum(sizes)
    header, offset = {}, 0
    for i, n in enumerate(sizes):
        header[f"layer{i}.weight"] = {"dtype": "F32", "shape": [n], "data_offsets": [offset, offset + 4 * n]}
        offset += 4 * n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + offset)
    return path


def _vm(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakSampler(Periodic):
    """Each process's VmHWM under the study's process trees, by role, sampled until stopped."""

    def __init__(self, study: LocalStudy, interval_s: float = 0.5):
        super().__init__(interval_s)
        self._study = study
        self.peaks: dict[str, int] = {}

    def sample(self) -> None:
        for name, proc in self._study.procs.items():
            for pid in tree_pids(proc.pid):
                role = _role(name, pid, self._study.server)
                if role:
                    self.peaks[role] = max(self.peaks.get(role, 0), peak_rss_bytes(pid))


def _role(name: str, pid: int, server: str) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    if b"runtime.server" in cmdline:
        return "server"
    if b"runtime.client.worker" in cmdline or b"fedkit-worker" in cmdline:
        return f"{name} worker"
    if b"runtime.client" in cmdline:
        return f"{name} daemon"
    return ""


def run(params: int, n_sites: int, n_tensors: int, root: Path) -> dict:
    study = LocalStudy.create(REPO / "project.yml.example", root, edit=_sites_edit(n_sites))
    for site in study.clients:
        study.write_local(site, "site.yml", {"heartbeat_interval_s": 2.0, "threads": 1})
    model = sparse_model(root / "initial.safetensors", params, n_tensors)
    try:
        study.start_server()
        study.start_sites(timeout_s=120)
        server_pid = next(p for p in tree_pids(study.procs[study.server].pid) if _role("", p, "") == "server")
        idle = _vm(server_pid, "VmRSS")
        job = root / "job"
        shutil.copytree(JOB, job)
        with PeakSampler(study) as sampler:
            started = time.time()
            record = study.admin_json(f"submit_job {job} --initial-model {model} --set server.rounds=1 "
                                      f"--set client.learner.args.n_params={params} "
                                      f"--set client.learner.args.n_tensors={n_tensors} "
                                      f"--set meta.min_clients={n_sites} --set server.round_timeout_s=3000 "
                                      f"--set client.task_timeout_s=3000", timeout_s=3000)
            submitted = time.time()
            done = study.admin_json(f"wait_job {record['job_id']} 3000", timeout_s=3100)
            finished = time.time()
        if done["state"] != "finished":
            raise SystemExit(f"the job ended {done['state']}: {done.get('error')}")
        metrics = study.admin_json(f"show_job {record['job_id']}")["metrics"]
        round_end = next(m["time"] for m in metrics if m["type"] == "round")
    finally:
        study.stop_all()
    model_bytes = model.stat().st_size
    return {"params": params, "model_mib": model_bytes // MIB, "sites": n_sites, "tensors": n_tensors,
            "upload_s": round(submitted - started, 1), "submit_to_round1_done_s": round(round_end - submitted, 1),
            "job_s": round(finished - submitted, 1), "server_idle_mib": idle // MIB,
            "peak_mib": {role: peak // MIB for role, peak in sorted(sampler.peaks.items())},
            "server_peak_over_idle_x_model": round((sampler.peaks.get("server", 0) - idle) / model_bytes, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, default=500_000_000)
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--tensors", type=int, default=50, help="the model's tensors (a real model has many)")
    p.add_argument("--keep", action="store_true", help="keep the study folder")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedkit-big-model-"))
    try:
        result = run(a.params, a.sites, a.tensors, root / "study")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    print(f"P={a.params:,} ({result['model_mib']} MiB), {a.sites} sites: submit->round 1 done "
          f"{result['submit_to_round1_done_s']} s, whole job {result['job_s']} s; server idle "
          f"{result['server_idle_mib']} MiB, peak {result['peak_mib'].get('server')} MiB "
          f"(+{result['server_peak_over_idle_x_model']} x model)")
    for role, mib in result["peak_mib"].items():
        print(f"  peak RSS {role}: {mib} MiB")


if __name__ == "__main__":
    main()
