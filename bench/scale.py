"""How fedkit scales with the number of sites: N client processes on this machine, a model of P float32
parameters (the trivial learner: fedkit's own cost, not training), a few FedAvg rounds.

For each N it prints: seconds until every site registered (from launching the first site), seconds from
submit_job to the end of round 1 with the CPU-seconds the machine spent meanwhile (all of it, the server's,
the admin consoles', and the rest per site: over the machine's cores, how soon round 1 could end if nothing
ever waited), seconds per round, and, in the same run, the seconds a plain TLS socket needs to
move the same bytes (round_overhead's baseline: the model to N receivers and N models back); peak RSS of
the server, of all processes together and per site (daemon + its training worker), the daemons' own peak
RSS and their idle RSS (all registered, no job) with its PSS and private part (what each daemon adds on
this one machine, where all N share the libraries' pages), the server's RSS growth per connected site
(idle RSS with N sites registered minus before the first, over N), and whether any client daemon has
torch loaded (/proc/PID/maps). Peaks are sampled while the study runs (workers exit when a job ends), so
they are VmHWM as last seen per process.

    python bench/scale.py                          # P=1M, N=16,32,64,100, 3 rounds
    python bench/scale.py --sites 16 32 --rounds 3
"""

from __future__ import annotations

import _thread
import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._procs import (  # noqa: E402
    Periodic,
    cpu_seconds,
    machine_busy_s,
    peak_rss_bytes,
    shared_memory_split,
    tree_pids,
)
from bench.round_overhead import _sites_edit, run_raw_tls  # noqa: E402
from provision.local_study import LocalStudy, wait_until  # noqa: E402

JOB = REPO / "bench" / "jobs" / "trivial"
SAMPLE_S = 0.5
CPU_SAMPLE_S = 0.1
HEARTBEAT_INTERVAL_S = 5.0
MB = 1e6


class OutOfMemory(Exception):
    """The machine ran low on memory during a run; the study was stopped before the kernel's OOM killer."""


def _mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakSampler(Periodic):
    """Polls every process of the study and keeps each one's VmHWM as last seen, by owner. When the
    machine's available memory falls below `min_free_bytes` it interrupts the run (KeyboardInterrupt in
    the main thread), so the study is stopped by PID before the kernel picks something to kill."""

    def __init__(self, study: LocalStudy, min_free_bytes: int):
        super().__init__(SAMPLE_S)
        self._study = study
        self._min_free_bytes = min_free_bytes
        self.low_memory = False
        self.start_available_bytes = self.min_available_bytes = _mem_available_bytes()
        self.peaks: dict[int, tuple[str, bool, int]] = {}  # pid -> (owner, is the owner's main process, bytes)

    def sample(self) -> None:
        for name, proc in list(self._study.procs.items()):
            for pid in tree_pids(proc.pid):
                rss = peak_rss_bytes(pid)
                if rss:
                    self.peaks[pid] = (name, pid == proc.pid, max(rss, self.peaks.get(pid, ("", False, 0))[2]))
        available = _mem_available_bytes()
        self.min_available_bytes = min(self.min_available_bytes, available)
        if available < self._min_free_bytes and not self.low_memory:
            self.low_memory = True
            _thread.interrupt_main()

    def by_owner(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for owner, _, rss in self.peaks.values():
            out[owner] = out.get(owner, 0) + rss
        return out

    def main_process(self, owner: str) -> int:
        return max((rss for o, main, rss in self.peaks.values() if o == owner and main), default=0)


class CpuClock(Periodic):
    """Reads, every CPU_SAMPLE_S, the CPU-seconds the whole machine and one process (the server) have spent
    so far: two small /proc reads, so the readings stay that close together at any N (PeakSampler walks
    every process and takes seconds at N=100)."""

    def __init__(self, pid: int):
        super().__init__(CPU_SAMPLE_S)
        self._pid = pid
        self._readings: list[tuple[float, float, float]] = []  # (time, machine busy CPU-s, the process's)

    def sample(self) -> None:
        self._readings.append((time.time(), machine_busy_s(), cpu_seconds(self._pid)))

    def between(self, start: float, end: float) -> tuple[float, float]:
        """CPU-seconds (the machine's, the process's) from `start` to `end` (time.time()), from the readings
        nearest outside them: at most CPU_SAMPLE_S more on each side."""
        before = max((r for r in self._readings if r[0] <= start), default=self._readings[0], key=lambda r: r[0])
        after = min((r for r in self._readings if r[0] >= end), default=self._readings[-1], key=lambda r: r[0])
        return after[1] - before[1], after[2] - before[2]


def _reaped_children_cpu_s() -> float:
    """CPU-seconds of this process's children that have exited and been waited for (the admin consoles)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rss_bytes(pid: int) -> int:
    """VmRSS: what the process holds now (VmHWM would keep start-up peaks)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _settled_rss(pid: int, timeout_s: float = 20.0) -> int:
    """The process's RSS once two readings a second apart agree within 1 MB (start-up work done)."""
    deadline, last = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        now = rss_bytes(pid)
        if abs(now - last) < MB:
            return now
        last = now
        time.sleep(1.0)  # a sampling interval, not a synchronization
    return last


def _audit(study: LocalStudy) -> list[dict[str, Any]]:
    path = study.kits[study.server] / "workspace" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _t(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["time"]).timestamp()


def _site_audit(study: LocalStudy, site: str) -> list[dict[str, Any]]:
    path = study.kits[site] / "workspace" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _first(records: list[dict[str, Any]], event: str, **match: Any) -> float | None:
    return min((_t(r) for r in records if r["event"] == event and all(r.get(k) == v for k, v in match.items())),
               default=None)


# submit -> end of round 1, step by step: (name, from event, to event), each per site from the server's and
# the site's own audit (same machine, same clock); the job's first task may be round 0's init at one site
BREAKDOWN_STEPS = ("submit_to_first_task_sent", "task_sent_to_received", "fetch_check_unpack_job",
                   "sandbox_and_worker_start", "worker_ready_to_update_sent", "update_sent_to_accepted",
                   "last_accepted_to_round_done")


def breakdown(study: LocalStudy, job_id: str, submitted: float) -> dict[str, Any]:
    """Where submit -> end of round 1 goes: for each step the median and the max over sites (seconds).
    Steps of a site's first task of the job: the server sends it, the site receives it (long poll), fetches,
    hash-checks, approves and unpacks the job, starts its sandboxed worker (which imports the learner and
    answers ready), runs the task and uploads; then the server closes round 1 after the last result."""
    server = _audit(study)
    done = _first(server, "round_done", job_id=job_id, round=1)
    per_step: dict[str, list[float]] = {name: [] for name in BREAKDOWN_STEPS[:-1]}
    accepted_round1: list[float] = []
    for site in study.clients:
        mine = _site_audit(study, site)
        sent = _first(server, "task_sent", job_id=job_id, site=site)
        received = _first(mine, "task_received", job_id=job_id)
        fetched = _first(mine, "job_received", job_id=job_id)
        worker = _first(mine, "worker_started", job_id=job_id)
        update = _first(mine, "update_sent", job_id=job_id)
        accepted = _first(server, "result_accepted", job_id=job_id, site=site)
        r1 = _first(server, "result_accepted", job_id=job_id, site=site, round=1)
        if r1 is not None:
            accepted_round1.append(r1)
        points = [submitted, sent, received, fetched, worker, update, accepted]
        for name, a, b in zip(BREAKDOWN_STEPS, points, points[1:], strict=False):
            if a is not None and b is not None:
                per_step[name].append(b - a)
    out: dict[str, Any] = {name: {"median": round(statistics.median(v), 2), "max": round(max(v), 2)}
                           for name, v in per_step.items() if v}
    if done is not None and accepted_round1:
        out["last_accepted_to_round_done"] = round(done - max(accepted_round1), 2)
    # the console's own part: its process start, TLS and upload (request audited), then the server's intake
    request = min((_t(r) for r in server if r["event"] == "admin_request" and r.get("command") == "submit_job"
                   and _t(r) >= submitted - 1), default=None)
    accepted = min((_t(r) for r in server if r["event"] == "admin_command" and r.get("command") == "submit_job"
                    and _t(r) >= submitted - 1), default=None)
    if request is not None:
        out["submit_console_to_request"] = round(request - submitted, 2)
        if accepted is not None:
            out["submit_request_to_accepted"] = round(accepted - request, 2)
    started = _first(server, "job_started", job_id=job_id)
    built = _first(server, "initial_model_built", job_id=job_id)
    round1_sent = _first(server, "task_sent", job_id=job_id, round=1)
    if started is not None:
        out["submit_to_job_started"] = round(started - submitted, 2)
    if built is not None:  # round 0: one site fetches the job, starts its worker and builds the model
        out["round0_initial_model_built"] = round(built - submitted, 2)
        if round1_sent is not None:
            out["round0_built_to_round1_sent"] = round(round1_sent - built, 2)
    return out


def _registered(study: LocalStudy) -> set[str]:
    return {r["site"] for r in _audit(study) if r["event"] == "site_registered"}


def _loads_torch(pid: int) -> bool:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return "libtorch" in maps or "/torch/_C" in maps


def _stop_sites_at_once(study: LocalStudy) -> None:
    """SIGTERM every site first (by PID), so N sites stop in parallel; then stop_all reaps them."""
    for name, proc in study.procs.items():
        if name != study.server and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    study.stop_all()


def run(params: int, n_sites: int, rounds: int, root: Path, timeout_s: float, min_free_bytes: int) -> dict[str, Any]:
    study = LocalStudy.create(REPO / "project.yml.example", root, edit=_sites_edit(n_sites))
    for site in study.clients:
        study.write_local(site, "site.yml", {"heartbeat_interval_s": HEARTBEAT_INTERVAL_S})
    row: dict[str, Any] = {"P": params, "N": n_sites, "rounds": rounds}
    sampler = PeakSampler(study, min_free_bytes)
    model_bytes = 4 * params  # replaced by what the wire statistics say was sent
    try:
        with sampler:
            study.start_server()
            server_pid = study.procs[study.server].pid
            server_idle_before = _settled_rss(server_pid)
            launched = time.time()
            for site in study.clients:
                study.start(site)
            wait_until(lambda: len(_registered(study)) == n_sites, timeout_s, "every site registered",
                       interval_s=0.5)
            last = max(_t(r) for r in _audit(study) if r["event"] == "site_registered")
            row["all_registered_s"] = round(last - launched, 2)
            daemons_with_torch = [s for s in study.clients if _loads_torch(study.procs[s].pid)]
            server_idle_after = _settled_rss(server_pid)
            daemon_idle = [rss_bytes(study.procs[s].pid) for s in study.clients]
            row["server_idle_rss_MB"] = round(server_idle_after / MB)
            row["server_growth_per_site_KB"] = round((server_idle_after - server_idle_before) / n_sites / 1e3)
            row["daemon_idle_rss_MB_mean"] = round(statistics.mean(daemon_idle) / MB, 1)
            row["daemon_idle_rss_MB_max"] = round(max(daemon_idle) / MB, 1)
            split = [shared_memory_split(study.procs[s].pid) for s in study.clients]
            row["daemon_idle_pss_MB_mean"] = round(statistics.mean(x["pss"] for x in split) / MB, 1)
            row["daemon_idle_private_MB_mean"] = round(statistics.mean(x["private"] for x in split) / MB, 1)

            job = root / "job"
            shutil.copytree(JOB, job)
            consoles_before = _reaped_children_cpu_s()
            with CpuClock(server_pid) as cpu:
                submitted = time.time()
                record = study.admin_json(f"submit_job {job} --set server.rounds={rounds} "
                                          f"--set client.learner.args.n_params={params} "
                                          f"--set meta.min_clients={n_sites}")
                final = study.admin_json(f"wait_job {record['job_id']} {timeout_s:g}", timeout_s=timeout_s + 60)
            consoles_cpu = _reaped_children_cpu_s() - consoles_before  # the two console runs, start to exit
            row["state"] = final["state"]
            audit = _audit(study)
            job_id = record["job_id"]
            done = {r["round"]: _t(r) for r in audit if r["event"] == "round_done" and r["job_id"] == job_id}
            first_sent = min(_t(r) for r in audit if r["event"] == "task_sent" and r["job_id"] == job_id
                             and r["round"] == 1 and r["task"] == "train")
            ends = [first_sent] + [done[r] for r in sorted(done)]
            row["round_s"] = [round(b - a, 2) for a, b in zip(ends, ends[1:], strict=False)]
            row["submit_to_first_round_s"] = round(done[min(done)] - submitted, 2) if done else None
            if done:  # what that took in CPU: the machine's cores bound how soon N sites can all be ready
                machine_cpu, server_cpu = cpu.between(submitted, done[min(done)])
                row["submit_to_first_round_cpu_s"] = {
                    "machine": round(machine_cpu, 1), "server": round(server_cpu, 1),
                    "consoles": round(consoles_cpu, 1),
                    "per_site": round((machine_cpu - server_cpu - consoles_cpu) / n_sites, 2),
                    "cores": os.cpu_count()}
            row["round_s_median"] = round(statistics.median(row["round_s"]), 2)
            sites_in_rounds = [len(m["sites"]) for m in study.admin_json(f"show_job {job_id}")["metrics"]
                               if m["type"] == "round"]
            row["sites_per_round"] = sites_in_rounds
            row["breakdown_s"] = breakdown(study, job_id, submitted)
            wire = [m["bytes_sent"] for m in study.admin_json(f"show_job {job_id}")["metrics"]
                    if m["type"] == "wire" and m["task"] == "train"]
            model_bytes = max(wire, default=0) or 4 * params
    except KeyboardInterrupt:
        if not sampler.low_memory:
            raise
        raise OutOfMemory(f"available memory fell below {min_free_bytes / MB:.0f} MB; study stopped") from None
    finally:
        _stop_sites_at_once(study)
    if "round_s" in row:  # the bytes alone, same run, same kits, the study stopped first
        raw = [run_raw_tls(model_bytes, n_sites, study.kits[study.server], study.kits[study.clients[0]])
               for _ in range(3)]
        row["raw_tls_s"] = round(statistics.median(r.seconds for r in raw), 3)
        row["ratio"] = round(row["round_s_median"] / row["raw_tls_s"], 2)
    owners = sampler.by_owner()
    per_site = [owners.get(s, 0) for s in study.clients]
    daemons = [sampler.main_process(s) for s in study.clients]
    row.update({
        "server_peak_rss_MB": round(owners.get(study.server, 0) / MB),
        "all_peak_rss_MB": round(sum(owners.values()) / MB),
        "site_peak_rss_MB_mean": round(statistics.mean(per_site) / MB),
        "site_peak_rss_MB_max": round(max(per_site) / MB),
        "daemon_peak_rss_MB_mean": round(statistics.mean(daemons) / MB),
        "daemons_with_torch": len(daemons_with_torch),
        # what the machine really gave the study (RSS counts shared pages once per process)
        "machine_used_peak_MB": round((sampler.start_available_bytes - sampler.min_available_bytes) / MB),
    })
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--sites", type=int, nargs="+", default=[16, 32, 64, 100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=900.0, help="bound on registration and on the job")
    parser.add_argument("--min-free-mb", type=float, default=1500.0,
                        help="stop a run when the machine's available memory falls below this")
    args = parser.parse_args()
    rows = []
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    for n in args.sites:
        with tempfile.TemporaryDirectory(prefix="fedkit-scale-") as tmp:
            try:
                row = run(args.params, n, args.rounds, Path(tmp), args.timeout_s, int(args.min_free_mb * MB))
            except Exception as e:  # report and go on: a bigger N may fail where a smaller one did not
                row = {"P": args.params, "N": n, "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"load after: {Path('/proc/loadavg').read_text().strip()}")
    print()
    print(f"{'N':>4} {'registered s':>12} {'submit->r1 s':>12} {'r1 CPU-s':>8} {'server':>6} {'console':>7} "
          f"{'/site':>6} {'round s (each)':>22} {'raw TLS s':>9} "
          f"{'ratio':>6} {'server MB':>10} {'KB/site':>8} {'all MB':>8} {'site MB':>8} {'daemon MB':>10} "
          f"{'idle MB':>8} {'PSS MB':>7} {'own MB':>7} {'torch':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['N']:>4} failed: {r['error']}")
            continue
        cpu = r.get("submit_to_first_round_cpu_s") or {}
        print(f"{r['N']:>4} {r['all_registered_s']:>12.2f} {r['submit_to_first_round_s']:>12} "
              f"{cpu.get('machine', '-'):>8} {cpu.get('server', '-'):>6} {cpu.get('consoles', '-'):>7} "
              f"{cpu.get('per_site', '-'):>6} "
              f"{' '.join(f'{x:.2f}' for x in r['round_s']):>22} {r['raw_tls_s']:>9} {r['ratio']:>6} "
              f"{r['server_peak_rss_MB']:>10} {r['server_growth_per_site_KB']:>8} {r['all_peak_rss_MB']:>8} "
              f"{r['site_peak_rss_MB_mean']:>8} {r['daemon_peak_rss_MB_mean']:>10} "
              f"{r['daemon_idle_rss_MB_mean']:>8} {r['daemon_idle_pss_MB_mean']:>7} "
              f"{r['daemon_idle_private_MB_mean']:>7} {r['daemons_with_torch']:>6}")
    sys.exit(1 if any("error" in r or r.get("state") != "finished" for r in rows) else 0)


if __name__ == "__main__":
    main()
