"""Benchmark: how long a site's audit report takes on a long-lived site's log, against checking the chain
alone (`fedkit audit verify`).

    .venv/bin/python bench/audit_report.py [--jobs 100] [--rounds 300]

The log is what a site writes for `jobs` jobs of `rounds` train rounds each (task_received, update_sent
with a privacy report and metrics; a job_received and worker_started per job): about 1.3 KB a round. The
figures are the median of 3 runs: seconds for verify, for the report (verify included), and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

from runtime.audit import AuditLog, verify  # noqa: E402
from runtime.audit_report import summarize  # noqa: E402

PRIVACY = {"applied_to": "delta", "chain": [{"name": "percentile", "args": {"percentile": 10.0}, "source": "site"},
                                            {"name": "gaussian_dp", "args": {"noise_multiplier": 1.0},
                                             "source": "site"}],
           "excluded": [], "n_excluded": 0, "on_weaker_job": "raise", "raised": True, "task": "train",
           "payload_sha256": "e" * 64}


def write_log(path: Path, jobs: int, rounds: int) -> None:
    with mock.patch("os.fsync"):  # what is written is what a site writes; only its pace is not measured here
        _write_log(path, jobs, rounds)


def _write_log(path: Path, jobs: int, rounds: int) -> None:
    audit = AuditLog(path)
    audit.append("client_started", site="site-1", org="hospital-a")
    for j in range(jobs):
        job = f"20261101-0000{j:02d}-abcdef"
        for r in range(1, rounds + 1):
            audit.append("task_received", job_id=job, task="train", round=r, task_id=f"{j}-{r}",
                         payload_sha256="a" * 64)
            if r == 1:
                audit.append("job_received", job_id=job, job_name="study", job_sha256="b" * 64,
                             code_sha256="c" * 64, code_approval="any code allowed",
                             submitter={"name": "lead@study.org", "org": "center", "role": "lead"})
                audit.append("worker_started", job_id=job, backend="bwrap", threads=4,
                             limits={"cpus": "4", "memory": "16 GiB", "pids": "4096"})
            audit.append("update_sent", job_id=job, task="train", round=r, n_samples=1000,
                         payload_sha256="d" * 64, payload_bytes=4_000_000,
                         privacy={**PRIVACY, "dp": {"epsilon_round": 0.5, "epsilon_total": 0.5 * r ** 0.5,
                                                    "delta": 1e-5, "noise_multiplier": 1.0, "sampling_rate": 1.0,
                                                    "releases": r}},
                         reported={"train": {"loss": 0.25}, "validation": {"auc": 0.9}, "scalar_points": 12},
                         metrics_sha256="f" * 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "audit.jsonl"
        write_log(log, args.jobs, args.rounds)
        size_mb = log.stat().st_size / 1e6
        records = verify(log).records
        verify_s, report_s = [], []
        for _ in range(3):
            started = time.perf_counter()
            verify(log)
            verify_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            activity = summarize(log)
            report_s.append(time.perf_counter() - started)
        assert len(activity.jobs) == args.jobs
    v, r = statistics.median(verify_s), statistics.median(report_s)
    print(f"audit log: {records} records, {size_mb:.1f} MB ({args.jobs} jobs x {args.rounds} rounds)")
    print(f"verify: {v:.2f} s ({size_mb / v:.0f} MB/s); report (verify included): {r:.2f} s; "
          f"report/verify {r / v:.2f}x")


if __name__ == "__main__":
    main()
