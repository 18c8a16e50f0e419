"""local/privacy.yml `scores:`: how many times jobs may score a model on this site's data.

A validation sends no weights, but its metrics are a function of the site's data and of weights the
server chose: a compromised server scoring crafted models located every validation record of a site from
461 of them. No noise covers metrics, so the site counts them instead. Every task that scores a model
counts once (a validate task; a train task, which scores the model it receives before training), before
any of the job's code runs:

    max_per_job    tasks one job may have score a model here
    max_per_site   all jobs together, ever (a server can invent job ids; delete workspace/scores.json
                   to start counting again)

Past a cap the task is refused and the site declines the rest of the job. Counts live in
workspace/scores.json (written as the DP ledgers are: whole, synced, then renamed). Without caps nothing is
counted or written.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from pydantic import Field

from ..errors import JobRejected
from ..kit_config import SettingsModel
from .durable import write_durably

SCORES_FILE = "scores.json"
_LOCK = threading.Lock()


class ScoreCaps(SettingsModel):
    max_per_job: int | None = Field(None, ge=1, description="tasks one job may have score a model on this site's "
                                                             "data (validate, and train, which scores the model "
                                                             "it receives); null = no cap")
    max_per_site: int | None = Field(None, ge=1, description="all jobs together, ever; null = no cap")


class ScoresExhausted(JobRejected):
    """A cap of local/privacy.yml `scores:` has no room for this task: the site declines the job."""


def count_score(workspace: Path, job_id: str, caps: ScoreCaps) -> None:
    """Count one scoring task of `job_id`, or raise ScoresExhausted (counting nothing) when a cap is reached."""
    if caps.max_per_job is None and caps.max_per_site is None:
        return
    path = workspace / SCORES_FILE
    with _LOCK:
        try:
            counts = json.loads(path.read_text())
        except FileNotFoundError:
            counts = {"total": 0, "jobs": {}}
        except (OSError, ValueError) as e:
            raise JobRejected(f"{path} is unreadable ({e}); restore it, or delete it to count from zero") from None
        job = int(counts["jobs"].get(job_id, 0))
        for count, cap, setting in ((job, caps.max_per_job, "max_per_job"),
                                    (int(counts["total"]), caps.max_per_site, "max_per_site")):
            if cap is not None and count >= cap:
                raise ScoresExhausted(f"job {job_id}: this site has scored {count} models for "
                                      f"{'this job' if setting == 'max_per_job' else 'all jobs together'}, its "
                                      f"cap (local/privacy.yml scores.{setting}); it answers no more of the job")
        counts["jobs"][job_id] = job + 1
        counts["total"] = int(counts["total"]) + 1
        write_durably(path, json.dumps(counts, sort_keys=True))
