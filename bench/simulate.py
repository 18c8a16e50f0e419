"""What `fedkit simulate` costs: wall time, seconds per round and peak memory of a simulation with N virtual
sites, against a real study of the same job from kits (server, N site daemons, their sandboxed workers, TLS).

Workloads:
  tabular   the template job (templates/jobs/tabular_classifier, 2 epochs per round), the demo study's three
            data splits cycled over the sites; simulated at N=8 and N=100, real kits at N=8
  trivial   bench/jobs/trivial (a constant delta of P float32 parameters: the round's own cost, no training),
            the workload of the NVIDIA FLARE and Flower simulator figures in docs/workflows.md (N=8, P=10M;
            N=64, P=1M); simulated only (the real-kit figures are bench/round_overhead.py's and bench/scale.py's)

Each simulation runs as its own `fedkit simulate` process. Wall time is from launching it to its exit
(start-up, loading the learners, every round); seconds per round are the median gap between rounds in its
metrics.jsonl; start s is the time until the job began (processes started, learners loaded; for real kits:
provisioning, server and daemons started, every site online). Memory: the sum over every process of the run
of its peak RSS (VmHWM, sampled every 0.5 s, as bench/scale.py does), and resource.getrusage's figure (this
process's own peak + the largest child's peak, which is what the kernel keeps for children: a lower bound
for a pool of several processes).

    python bench/simulate.py                       # everything (about 10-15 minutes on 2 loaded cores)
    python bench/simulate.py --only tabular --sites 8 100 --real-sites 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._procs import peak_rss_bytes, tree_pids  # noqa: E402
from bench.round_overhead import _sites_edit  # noqa: E402
from provision.demo_data import write_demo_data  # noqa: E402
from provision.local_study import LocalStudy  # noqa: E402

TABULAR = REPO / "templates" / "jobs" / "tabular_classifier"
TRIVIAL = REPO / "bench" / "jobs" / "trivial"
SAMPLE_S = 0.5
RUN_TIMEOUT_S = 3600
MB = 1e6


class PeakSampler:
    """Peak RSS per process of a process tree, sampled in a thread until stopped (processes come and go)."""

    def __init__(self, root: int):
        self._root, self._peaks, self._stop = root, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_S)

    def sample(self) -> None:
        for pid in tree_pids(self._root):
            if pid != os.getpid():
                self._peaks[pid] = max(self._peaks.get(pid, 0), peak_rss_bytes(pid))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def total_bytes(self) -> int:
        return sum(self._peaks.values())


def _round_gaps(metrics: list[dict[str, Any]]) -> float:
    ends = [m["time"] for m in metrics if m["type"] == "round"]
    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return statistics.median(gaps) if gaps else float("nan")


def run_simulation(job: Path, n_sites: int, rounds: int, overrides: list[str], root: Path,
                   demo_data: bool) -> dict[str, Any]:
    out = root / f"sim-{job.name}-{n_sites}"
    cmd = [sys.executable, "-m", "provision.cli", "simulate", str(job), "--sites", str(n_sites), "--out", str(out),
           "--set", f"server.rounds={rounds}", "--set", f"meta.min_clients={n_sites}",
           *(["--demo-data"] if demo_data else []), *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started, launched_at = time.monotonic(), time.time()
    with (root / f"sim-{job.name}-{n_sites}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        with PeakSampler(proc.pid) as sampler:
            code = proc.wait(RUN_TIMEOUT_S)
            sampler.sample()
    wall = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"simulate N={n_sites} failed ({code}); see {root}/sim-{job.name}-{n_sites}.log")
    metrics = [json.loads(line) for line in (out / "simulated" / "metrics.jsonl").read_text().splitlines()]
    record = json.loads((out / "simulated" / "record.json").read_text())
    return {"wall_s": wall, "start_s": record["submitted_at"] - launched_at, "round_s": _round_gaps(metrics),
            "peak_bytes": sampler.total_bytes, "final": record["final_metrics"], "rounds_done": record["rounds_done"]}


def run_real(job: Path, n_sites: int, rounds: int, overrides: list[str], root: Path) -> dict[str, Any]:
    """The same job from real kits: N site daemons (each starting its sandboxed worker), a server, TLS."""
    started = time.monotonic()
    study = LocalStudy.create(REPO / "project.yml.example", root / f"real-{n_sites}", edit=_sites_edit(n_sites))
    splits = write_demo_data(root / f"real-{n_sites}" / "data", [f"split-{i + 1}" for i in range(min(n_sites, 3))])
    folders = list(splits.site_dirs.values())
    for i, site in enumerate(study.clients):
        study.write_local(site, "site.yml", {"heartbeat_interval_s": 2.0, "data_root": str(folders[i % len(folders)])})
    with PeakSampler(os.getpid()) as sampler:
        try:
            study.start_server()
            study.start_sites(timeout_s=300)
            copy = root / f"real-{n_sites}" / "job"
            shutil.copytree(job, copy)
            sets = " ".join(f"--set {o}" for o in [f"server.rounds={rounds}", f"meta.min_clients={n_sites}",
                                                   *overrides])
            submitted = time.monotonic()
            start_s = submitted - started
            record = study.admin_json(f"submit_job {copy} {sets}")
            final = study.admin_json(f"wait_job {record['job_id']} {RUN_TIMEOUT_S}", timeout_s=RUN_TIMEOUT_S + 60)
            job_s = time.monotonic() - submitted
            metrics = study.admin_json(f"show_job {record['job_id']}")["metrics"]
            sampler.sample()
        finally:
            study.stop_all()
    if final["state"] != "finished":
        raise RuntimeError(f"real study N={n_sites} ended {final['state']}: {final.get('error')}")
    return {"wall_s": time.monotonic() - started, "start_s": start_s, "job_s": job_s, "round_s": _round_gaps(metrics),
            "peak_bytes": sampler.total_bytes, "final": final["final_metrics"], "rounds_done": final["rounds_done"]}


def _fmt_final(final: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in sorted(final.items()) if k in ("accuracy", "auc", "score")) or "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/simulate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["tabular", "trivial"], default=None)
    p.add_argument("--sites", type=int, nargs="+", default=[8, 100], help="simulated sites, tabular job")
    p.add_argument("--real-sites", type=int, nargs="*", default=[8], help="real-kit sites, tabular job")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    print(f"# bench/simulate.py: {cores} cores, load average {os.getloadavg()[0]:.1f} at start, "
          f"{args.rounds} rounds per run", flush=True)
    print(f"{'run':<34} {'wall s':>8} {'start s':>8} {'s/round':>8} {'peak MB':>9}  final", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedkit-bench-sim-") as tmp:
        root = Path(tmp)
        runs: list[tuple[str, Any]] = []
        if args.only in (None, "tabular"):
            runs += [(f"simulate tabular N={n}", lambda n=n: run_simulation(TABULAR, n, args.rounds, [], root, True))
                     for n in args.sites]
            runs += [(f"real kits tabular N={n}", lambda n=n: run_real(TABULAR, n, args.rounds, [], root))
                     for n in args.real_sites]
        if args.only in (None, "trivial"):
            runs += [(f"simulate trivial N={n} P={pm}M",
                      lambda n=n, pm=pm: run_simulation(TRIVIAL, n, args.rounds, [f"client.learner.args.n_params="
                                                                                   f"{pm * 1_000_000}"], root, False))
                     for n, pm in ((8, 10), (64, 1))]
        for name, run in runs:
            r = run()
            extra = f" (job {r['job_s']:.1f} s)" if "job_s" in r else ""
            print(f"{name:<34} {r['wall_s']:>8.1f} {r['start_s']:>8.1f} {r['round_s']:>8.2f} "
                  f"{r['peak_bytes'] / MB:>9.0f}  "
                  f"{_fmt_final(r['final'])}{extra}", flush=True)
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"# getrusage: this process {self_peak / MB:.0f} MB + largest child {child_peak / MB:.0f} MB "
          f"(peak MB above: every process's peak, summed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
