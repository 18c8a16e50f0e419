"""The soak's invariants, checked on what the study left on disk after it stopped:

- rounds: each job's recorded rounds are 1..k, each once and in order (none lost, repeated or applied
  twice across server restarts), k is the job's rounds_done, each has >= min_clients sites; a job that did
  not finish names its reason
- model: each job's global model equals the independent computation from its recorded participants,
  bit for bit (model.py)
- audit: the server's and every site's audit chain verifies; every update a site logged as accepted is
  one the server logged with the same hash; one hash per (job, round, site); every site a round folded
  has an accepted update for that round
- leaks: no process of the study alive, no listener on its ports, no temp file left in its TMPDIR, no
  tmpfs still mounted, the driver's file descriptors back where they were
- alive: no server or site process exited unless the driver killed it (a daemon that dies on a fault is a bug)
- waits: every wait ended within its bound and the study never stalled
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.audit import verify
from runtime.errors import FedkitError
from runtime.weights import load_file

from .driver import SoakRun, _listening, live_pids_naming
from .model import expected_model


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def round_entries(job_dir: Path) -> list[dict[str, Any]]:
    return [m for m in _jsonl(job_dir / "metrics.jsonl") if m["type"] == "round"]


def check_rounds(run: SoakRun, job_dir: Any) -> Check:
    problems = []
    for job in run.jobs:
        d = job_dir(job.job_id)
        entries = round_entries(d)
        record = json.loads((d / "record.json").read_text())
        numbers = [m["round"] for m in entries]
        if numbers != list(range(1, len(numbers) + 1)):
            problems.append(f"{job.job_id}: rounds recorded {numbers}")
        if record["rounds_done"] != len(numbers):
            problems.append(f"{job.job_id}: rounds_done {record['rounds_done']} but {len(numbers)} recorded")
        short = [m["round"] for m in entries if len(m["sites"]) < run.config.min_clients]
        if short:
            problems.append(f"{job.job_id}: rounds {short} closed with fewer than min_clients sites")
        if record["state"] != "finished" and record["state"] != "aborted" and not record.get("error"):
            problems.append(f"{job.job_id}: {record['state']} without a reason")
    total = sum(len(round_entries(job_dir(j.job_id))) for j in run.jobs)
    return Check("rounds exactly once, >= min_clients or failed with a reason", not problems,
                 "; ".join(problems) or f"{total} rounds in {len(run.jobs)} job(s)")


def check_model(run: SoakRun, job_dir: Any) -> Check:
    problems = []
    for job in run.jobs:
        d = job_dir(job.job_id)
        entries = round_entries(d)
        got = load_file(d / "models" / "global.safetensors")["w"]
        want = expected_model(entries, n_params=got.size)
        if got.dtype != np.float32 or got.tobytes() != want.tobytes():
            diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            problems.append(f"{job.job_id}: global model differs from the recomputation (max |diff| {diff:g})")
    return Check("final model == recomputation from recorded participants (bit-exact)", not problems,
                 "; ".join(problems) or "bit-exact")


def check_audit(run: SoakRun) -> Check:
    study = run.study
    problems, n_updates = [], 0
    for name in [study.server, *study.clients]:
        path = study.kits[name] / "workspace" / "audit.jsonl"
        try:
            verify(path)
        except (FedkitError, OSError) as e:
            problems.append(f"{name}: {e}")
    server = _jsonl(study.kits[study.server] / "workspace" / "audit.jsonl")
    accepted: dict[tuple[str, int, str], set[str]] = {}
    for r in server:
        if r["event"] == "result_accepted" and r.get("task") == "train" and r.get("payload_sha256"):
            # (an empty hash: the site reported a failure, e.g. a full disk, for a round run again after a restart)
            accepted.setdefault((r["job_id"], r["round"], r["site"]), set()).add(r["payload_sha256"])
    for key, hashes in accepted.items():
        if len(hashes) != 1:
            problems.append(f"{key}: server accepted {len(hashes)} different updates")
    for site in study.clients:
        for r in _jsonl(study.kits[site] / "workspace" / "audit.jsonl"):
            if r["event"] == "update_sent" and r.get("task") == "train" and r.get("payload_sha256"):
                n_updates += 1
                if r["payload_sha256"] not in accepted.get((r["job_id"], r["round"], site), set()):
                    problems.append(f"{site} job {r['job_id']} round {r['round']}: sent an update the server "
                                    "has no record of accepting with that hash")
    for job in run.jobs:
        for entry in round_entries(study.kits[study.server] / "workspace" / "jobs" / job.job_id):
            for site in entry["sites"]:
                if (job.job_id, entry["round"], site) not in accepted:
                    problems.append(f"{job.job_id} round {entry['round']}: {site} folded without an accepted update")
    return Check("audit chains verify; server and sites agree on every update's hash", not problems,
                 "; ".join(problems[:5]) or f"{len(study.clients) + 1} logs, {n_updates} site updates matched")


def check_leaks(run: SoakRun) -> Check:
    root = str(run.config.root)
    problems = []
    if pids := live_pids_naming(root):
        problems.append("processes still alive: " + "; ".join(f"{p} {_cmdline(p)}" for p in pids))
    if listening := [p for p in run.ports if _listening(p)]:
        problems.append(f"ports still listening: {listening}")
    if run.tmpdir is not None and (left := sorted(p.name for p in run.tmpdir.iterdir())):
        problems.append(f"temp files left in TMPDIR: {left[:5]}")
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[1].startswith(root)]
    if mounts:
        problems.append(f"still mounted: {mounts}")
    if run.fds_after > run.fds_before:
        problems.append(f"driver fds {run.fds_before} -> {run.fds_after}")
    return Check("no leaked processes, listeners, temp files, mounts or fds", not problems,
                 "; ".join(problems) or "none")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(gone)"


def check_alive(run: SoakRun) -> Check:
    return Check("no participant died on its own (only the driver's kills)", not run.died,
                 "; ".join(run.died[:5]) or "none")


def check_waits(run: SoakRun) -> Check:
    late = [f"{w.what} ({w.took_s:.0f} s > {w.bound_s:g} s)" for w in run.waits if not w.ok]
    if run.stuck:
        late.append(run.stuck)
    longest = max((w.took_s for w in run.waits), default=0.0)
    return Check("every wait ended within its bound", not late,
                 "; ".join(late[:5]) or f"{len(run.waits)} waits, longest {longest:.1f} s")


def check_all(run: SoakRun) -> list[Check]:
    def job_dir(job_id: str) -> Path:
        return run.study.kits[run.study.server] / "workspace" / "jobs" / job_id

    return [check_rounds(run, job_dir), check_model(run, job_dir), check_audit(run), check_alive(run),
            check_leaks(run), check_waits(run)]
