"""What the job sandbox costs a site: the demo study (tabular job, 3 hospitals, real kits) run once with
every site's `sandbox.backend: off` and once with `native` (bubblewrap namespaces + cgroup limits), in
one run, interleaved so machine noise hits both alike. Prints the median round time of each, their
ratio, and the one-off cost of starting the worker (job accepted -> first round done).

    python bench/sandbox_overhead.py                # 2 repeats x (off, native), 8 rounds each
    python bench/sandbox_overhead.py --repeats 1 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provision.demo_data import write_demo_data  # noqa: E402
from provision.local_study import LocalStudy, wait_until  # noqa: E402

JOB = REPO / "templates" / "jobs" / "tabular_classifier"


def run_study(backend: str, rounds: int, root: Path) -> dict:
    study = LocalStudy.create(REPO / "project.yml.example", root)
    data = write_demo_data(root / "data", study.clients)
    for site in study.clients:
        study.write_local(site, "site.yml", {"data_root": str(data.site_dirs[site]), "heartbeat_interval_s": 2.0,
                                             "sandbox": {"backend": backend}})
    try:
        study.start_server()
        for site in study.clients:
            study.start(site)
        wait_until(lambda: sum(s["online"] for s in study.admin_json("check_status client")["sites"])
                   == len(study.clients), 120, "all sites online", interval_s=0.5)
        job = root / "job"
        shutil.copytree(JOB, job)
        record = study.admin_json(f"submit_job {job} --set server.rounds={rounds} "
                                  f"--set meta.min_clients={len(study.clients)}")
        final = study.admin_json(f"wait_job {record['job_id']} 900", timeout_s=960)
        if final["state"] != "finished":
            raise RuntimeError(f"{backend}: job {final['state']}: {final.get('error')}")
        metrics = study.admin_json(f"show_job {record['job_id']}")["metrics"]
    finally:
        study.stop_all()
    ends = [m["time"] for m in metrics if m["type"] == "round"]
    workers = [json.loads(line) for site in study.clients
               for line in (study.kits[site] / "workspace" / "audit.jsonl").read_text().splitlines()
               if '"worker_started"' in line]
    assert all(w["backend"] == backend for w in workers), f"sites ran {[w['backend'] for w in workers]}"
    return {"round_s": [b - a for a, b in zip(ends, ends[1:], strict=False)],
            "to_first_round_s": ends[0] - final["started_at"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    results: dict[str, dict[str, list[float]]] = {b: {"round_s": [], "to_first_round_s": []} for b in ("off", "native")}
    with tempfile.TemporaryDirectory(prefix="fedkit-bench-sandbox-") as tmp:
        for i in range(args.repeats):
            for backend in ("off", "native"):
                got = run_study(backend, args.rounds, Path(tmp) / f"{backend}-{i}")
                results[backend]["round_s"] += got["round_s"]
                results[backend]["to_first_round_s"].append(got["to_first_round_s"])
                print(f"repeat {i + 1} {backend:>6}: median round {statistics.median(got['round_s']):.3f} s, "
                      f"job start to round 1 done {got['to_first_round_s']:.2f} s", flush=True)
    off, native = (statistics.median(results[b]["round_s"]) for b in ("off", "native"))
    off_start, native_start = (statistics.median(results[b]["to_first_round_s"]) for b in ("off", "native"))
    print(f"\nmedian round: off {off:.3f} s, native {native:.3f} s, ratio {native / off:.2f} "
          f"({len(results['off']['round_s'])} + {len(results['native']['round_s'])} rounds)")
    print(f"job start to round 1 done (worker start, torch import, init, round 1): off {off_start:.2f} s, "
          f"native {native_start:.2f} s, +{native_start - off_start:.2f} s")


if __name__ == "__main__":
    main()
