"""The global model the soak must end with, computed without the server: from the recorded participants
of each round (the job's metrics: `sites` and `n_samples` of every `round` entry) and the learner's own
(site, round) -> delta function, with the same IEEE operations as FedAvg: a weighted sum, one division,
a float32 step. The deltas are small integers and n_samples integers, so the sum is exact in any order in
FedAvg's float32 and in float64 here, and one division of exact values rounds to the same float32 either
way (float64 carries more than twice float32's digits): the result is bit-exact, not approximately equal."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

JOB = Path(__file__).resolve().parents[1] / "e2e" / "jobs" / "soak"
N_PARAMS = 64


@cache
def learner_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak_job_learner", JOB / "custom" / "learner.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_model(rounds: list[dict[str, Any]], n_params: int = N_PARAMS) -> np.ndarray:
    """The model after the recorded `rounds` (metrics entries of type 'round', in order) from zeros."""
    lm = learner_module()
    x = np.zeros(n_params, dtype=np.float32)
    for entry in rounds:
        acc = np.zeros(n_params, dtype=np.float64)
        total = 0.0
        for site in entry["sites"]:
            n = int(entry["n_samples"][site])
            if n != lm.soak_n_samples(site):
                raise AssertionError(f"round {entry['round']}: {site} reported n_samples {n}, "
                                     f"expected {lm.soak_n_samples(site)}")
            acc += lm.soak_delta(site, int(entry["round"]), n_params) * float(n)
            total += float(n)
        x = x + (acc / total).astype(np.float32)
    return x
