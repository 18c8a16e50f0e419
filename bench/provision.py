"""Benchmark: provision a 100-site study (plus a server and 2 admins) and report wall time and kit size.

    .venv/bin/python bench/provision.py [--sites 100] [--runs 5]

Each run provisions into a fresh temporary workspace, so it includes creating the CA. The figure is the
median wall time over the runs; the target is under 2 s for 100 sites on a 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

# `python bench/provision.py` puts bench/ first on sys.path, where this file would shadow the `provision`
# package it measures; drop that entry before importing.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

from provision import KitRenderer, Project, provision  # noqa: E402


def study(n_sites: int) -> Project:
    """The benchmark study, built in code: one server, `n_sites` client sites in 10 orgs, two admins."""
    participants: list[dict[str, object]] = [
        {
            "type": "server",
            "name": "fl.example.org",
            "org": "lead",
            "fed_learn_port": 8002,
            "admin_port": 8003,
        },
        *({"type": "client", "name": f"site-{i}", "org": f"hospital-{i % 10}"} for i in range(1, n_sites + 1)),
        {"type": "admin", "name": "admin@example.org", "org": "lead", "role": "project_admin"},
        {"type": "admin", "name": "lead@example.org", "org": "lead", "role": "lead"},
    ]
    return Project.model_validate({"api_version": 1, "name": "bench-study", "participants": participants})


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix != ".zip")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    project = study(args.sites)
    times_s: list[float] = []
    zip_bytes = folder_bytes = n_kits = 0
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="fedkit-bench-") as tmp:
            start = time.perf_counter()
            # The renderer is built inside the timed region: it reads templates and the runtime package.
            result = provision(project, Path(tmp), dt.datetime.now(dt.UTC), KitRenderer())
            times_s.append(time.perf_counter() - start)
            n_kits = len(result.kits)
            zip_bytes = sum(k.zip_path.stat().st_size for k in result.kits)
            folder_bytes = _tree_bytes(result.prod_dir)
    print(f"provisioned {n_kits} kits ({args.sites} sites + server + 2 admins), {args.runs} runs")
    print(f"wall time: median {statistics.median(times_s):.3f} s (min {min(times_s):.3f}, max {max(times_s):.3f})")
    print(f"total kit size: {zip_bytes / 1e6:.2f} MB zipped, {folder_bytes / 1e6:.2f} MB unzipped")


if __name__ == "__main__":
    main()
