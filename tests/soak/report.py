"""The soak's summary: rounds, faults by kind, failed rounds and jobs by reason, time lost to each kind of
fault (how much longer its round took than the median fault-free round), memory slopes, and each
invariant PASS/FAIL, with the seed that replays the schedule."""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter, defaultdict

from .driver import SoakRun
from .invariants import Check
from .schedule import Fault


def schedule_digest(schedule: list[Fault]) -> str:
    text = json.dumps([[f.round, f.phase.value, f.kind.value, list(f.sites), f.direction, f.after_bytes,
                        f.delay_ms] for f in schedule])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def round_seconds(run: SoakRun) -> dict[int, float]:
    ends = run.round_end
    return {g: ends[g] - ends[g - 1] for g in sorted(ends) if g - 1 in ends}


def time_lost_by_kind(run: SoakRun) -> dict[str, float]:
    durations = round_seconds(run)
    fault_rounds = {f.global_round for f in run.faults} | {f.global_round + 1 for f in run.faults}
    clean = [d for g, d in durations.items() if g not in fault_rounds]
    baseline = statistics.median(clean) if clean else 0.0
    lost: dict[str, float] = defaultdict(float)
    for f in run.faults:
        for g in (f.global_round, f.global_round + 1):  # a fault can delay the next round too (rejoins)
            if g in durations:
                lost[f.fault.kind.value] += max(0.0, durations[g] - baseline)
    return dict(lost)


def summary(run: SoakRun, checks: list[Check], final_models: dict[str, str]) -> str:
    cfg = run.config
    durations = round_seconds(run)
    lines = [f"chaos soak: seed {cfg.seed}, {cfg.sites} sites, min_clients {cfg.min_clients}, "
             f"{run.elapsed_s / 60:.1f} min (schedule {schedule_digest(run.schedule)})",
             f"rounds closed: {len(run.round_end)}  jobs: {len(run.jobs)}  "
             f"median round: {statistics.median(durations.values()) if durations else 0:.2f} s"]
    fired = Counter(f.fault.kind.value for f in run.faults if f.fired)
    not_fired = Counter(f.fault.kind.value for f in run.faults if not f.fired)
    lost = time_lost_by_kind(run)
    lines.append(f"{'fault kind':<22}{'injected':>9}{'not fired':>10}{'time lost s':>12}")
    for kind in sorted(set(fired) | set(not_fired)):
        lines.append(f"{kind:<22}{fired[kind]:>9}{not_fired[kind]:>10}{lost.get(kind, 0.0):>12.1f}")
    reasons = Counter()
    for job in run.jobs:
        for entry in _failed_sites(run, job.job_id):
            reasons[entry] += 1
    lines.append("site failures within rounds, by reason: " +
                 (", ".join(f"{r}: {n}" for r, n in reasons.most_common()) or "none"))
    for job in run.jobs:
        lines.append(f"job {job.job_id}: {job.state}" + (f" ({job.error})" if job.error else "")
                     + f", model sha256 {final_models.get(job.job_id, '?')[:16]}")
    slopes = run.memory.slopes_kib_per_min()
    if slopes:
        server = {k: v for k, v in slopes.items() if k == run.study.server}
        sites = [v for k, v in slopes.items() if k != run.study.server]
        lines.append("RSS slope after warm-up (KiB/min): server "
                     + (f"{next(iter(server.values())):+.0f}" if server else "n/a")
                     + (f", daemons median {statistics.median(sites):+.0f} max {max(sites):+.0f}" if sites else ""))
    else:
        lines.append("RSS slope: no process lived long enough to measure (>= 60 s)")
    for c in checks:
        lines.append(f"{'PASS' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
    lines.extend(f"note: {n}" for n in run.notes)
    return "\n".join(lines)


def _failed_sites(run: SoakRun, job_id: str) -> list[str]:
    from .invariants import round_entries
    d = run.study.kits[run.study.server] / "workspace" / "jobs" / job_id
    return [_reason_kind(reason) for e in round_entries(d) for reason in e["failed"].values()]


def _reason_kind(reason: str) -> str:
    """A failure's reason without its specifics (site names, numbers), to count them by kind."""
    text = reason.split(":")[0] if ":" in reason else reason
    return text.strip()[:60]
