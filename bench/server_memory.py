"""Where the server's memory goes during FedAvg rounds: its resident memory sampled every few ms, by kind
(anonymous, file-mapped), with the phase of the round it peaked in (from the server's log).

The same job as bench/round_overhead.py (the trivial learner, P float32 parameters in 10 tensors, N sites
as real processes from their kits, mutual TLS on 127.0.0.1). The server's idle size is read once all sites
are online; the target of issue 12 is a peak of at most idle + 3 x the model.

    python bench/server_memory.py --params 10000000 --sites 2 --rounds 3
    python bench/server_memory.py --sites 4 --wire int8           # a quantized round (server.wire_dtype)
    python bench/server_memory.py --sites 8 --uploads 2 4         # the server's max_concurrent_uploads
    MALLOC_ARENA_MAX=1 python bench/server_memory.py ...     # the server inherits the environment
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._procs import tree_pids  # noqa: E402
from bench.big_model import _role  # noqa: E402
from bench.round_overhead import _sites_edit  # noqa: E402
from provision.local_study import LocalStudy  # noqa: E402

JOB = REPO / "bench" / "jobs" / "trivial"
MB = 1e6


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class Timeline:
    """The server's memory every `interval_s`, as (wall time, VmRSS, RssAnon, RssFile)."""

    def __init__(self, pid: int, interval_s: float = 0.005):
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Timeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            s = _status(self.pid)
            if s:
                self.samples.append((time.time(), s["VmRSS"], s.get("RssAnon", 0), s.get("RssFile", 0)))


def _log_events(log: Path) -> list[tuple[float, str]]:
    """(time, message) of the server log's lines (asctime has millisecond resolution)."""
    events = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
        except ValueError:
            continue
        events.append((stamp, line[24:160]))
    return events


def _audit_events(path: Path) -> list[tuple[float, str]]:
    """(time, event and site) of the server's audit records: when each result arrived, each round closed."""
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        stamp = datetime.fromisoformat(record["time"]).timestamp()
        out.append((stamp, f"audit {record['event']} {record.get('site', '')}"))
    return out


def run(params: int, n_sites: int, rounds: int, root: Path, wire: str = "float32", uploads: int | None = None) -> dict:
    study = LocalStudy.create(REPO / "project.yml.example", root, edit=_sites_edit(n_sites))
    for site in study.clients:
        study.write_local(site, "site.yml", {"heartbeat_interval_s": 2.0})
    if uploads is not None:  # updates the server receives at once, each with its stream window and buffers
        study.update_local(study.server, "server.yml", {"max_concurrent_uploads": uploads})
    try:
        study.start_server()
        study.start_sites(timeout_s=120)
        pid = next(p for p in tree_pids(study.procs[study.server].pid) if _role("", p, "") == "server")
        idle = _status(pid)["VmRSS"]
        job = root / "job"
        shutil.copytree(JOB, job)
        with Timeline(pid) as timeline:
            record = study.admin_json(f"submit_job {job} --set server.rounds={rounds} "
                                      f"--set client.learner.args.n_params={params} --set meta.min_clients={n_sites} "
                                      f"--set server.wire_dtype={wire}")
            study.admin_json(f"wait_job {record['job_id']} 1800", timeout_s=1900)
        hwm = _status(pid)["VmHWM"]
        events = sorted(_log_events(study.log_path(study.server))
                        + _audit_events(study.kits[study.server] / "workspace" / "audit.jsonl"))
    finally:
        study.stop_all()
    model = 4 * params
    done = [t for t, m in events if m.startswith("audit round_done")]
    t_peak, rss_peak, anon, file = max(timeline.samples, key=lambda s: s[1])
    before = [e for e in events if e[0] <= t_peak][-3:]
    after = [e for e in events if e[0] > t_peak][:2]
    series = [(round(t - t_peak, 2), m) for t, m in events] + [
        (round(t - t_peak, 2), round(r / MB), round(a / MB), round(f / MB)) for t, r, a, f in timeline.samples[::10]]
    return {"series": series, "P": params, "N": n_sites, "rounds": rounds, "wire": wire, "uploads": uploads,
            # rounds 2 on (round 1 also starts the workers): from one round's end to the next's
            "round_s_median": round(statistics.median(b - a for a, b in itertools.pairwise(done[1:])), 3)
            if len(done) >= 3 else None,
            "idle_MB": round(idle / MB),
            "VmHWM_MB": round(hwm / MB),
            "over_idle_x_model": round((hwm - idle) / model, 2), "sampled_peak_MB": round(rss_peak / MB),
            "at_peak_anon_MB": round(anon / MB), "at_peak_file_MB": round(file / MB),
            "log_before_peak": [f"{t - t_peak:+.3f}s {m}" for t, m in before],
            "log_after_peak": [f"{t - t_peak:+.3f}s {m}" for t, m in after]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, default=10_000_000)
    p.add_argument("--sites", type=int, nargs="+", default=[2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--wire", default="float32", choices=["float32", "float16", "bfloat16", "int8"],
                   help="quantized transfer (server.wire_dtype)")
    p.add_argument("--uploads", type=int, nargs="+", default=[None],
                   help="the server's max_concurrent_uploads (local/server.yml; default: the kit's, 4)")
    p.add_argument("--series", help="write (seconds from the peak, RSS MB) every ~50 ms to this file")
    a = p.parse_args()
    for n in a.sites:
        for uploads in a.uploads:
            with tempfile.TemporaryDirectory(prefix="fedkit-mem-") as tmp:
                result = run(a.params, n, a.rounds, Path(tmp) / "study", a.wire, uploads)
                series = result.pop("series")
                if a.series:
                    Path(a.series).write_text("\n".join(" ".join(map(str, s))
                                                         for s in sorted(series, key=lambda s: s[0])))
                print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
