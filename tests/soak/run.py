"""One soak, start to end: drive it, check the invariants, write the summary."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .driver import Driver, SoakConfig, SoakRun
from .invariants import Check, check_all, round_entries
from .report import summary


@dataclass
class SoakResult:
    run: SoakRun
    checks: list[Check]
    final_models: dict[str, str]  # job_id -> sha256 of its global model file
    text: str
    participants: list[tuple[int, list[str]]]  # (global round, the sites it folded), over every job

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)


def soak(config: SoakConfig) -> SoakResult:
    driver = Driver(config)
    run = driver.execute()
    checks = check_all(run)
    models, participants = {}, []
    for job in run.jobs:
        path = driver.job_dir(job.job_id) / "models" / "global.safetensors"
        models[job.job_id] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "none"
        entries = round_entries(driver.job_dir(job.job_id))
        participants += [(job.offset + e["round"], sorted(e["sites"])) for e in entries]
    return SoakResult(run, checks, models, summary(run, checks, models), participants)
