"""One soak, start to end: drive it, check the invariants, write the summary."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .driver import Driver, SoakConfig, SoakRun
from .invariants import Check, check_all
from .report import summary


@dataclass
class SoakResult:
    run: SoakRun
    checks: list[Check]
    final_models: dict[str, str]  # job_id -> sha256 of its global model file
    text: str

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)


def soak(config: SoakConfig) -> SoakResult:
    driver = Driver(config)
    run = driver.execute()
    checks = check_all(run)
    models = {}
    for job in run.jobs:
        path = driver.job_dir(job.job_id) / "models" / "global.safetensors"
        models[job.job_id] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "none"
    return SoakResult(run, checks, models, summary(run, checks, models))
