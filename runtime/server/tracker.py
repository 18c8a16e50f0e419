"""A job's experiment tracking on the server: TensorBoard event files per site and for the global model,
a history of the learners' logged scalars, and a PNG of the learning curves, all in the job's folder
(so download_job carries them):

    jobs/<id>/tensorboard/sites/<site>/events.out.tfevents.*    that site's curves
    jobs/<id>/tensorboard/global/events.out.tfevents.*          the weighted global ones
    jobs/<id>/scalars.jsonl                                      per round: each site's logged scalars, summed up
    jobs/<id>/curves.png                                         the curves, per site and global, drawn
                                                                 when the job is downloaded (`draw_curves`)

Tags in a run: "train/<metric>" (step: round), "validation/<metric>" (step: the round of the model
scored; 0 is the initial model), "local_validation/<metric>" (step: round), and "learner/<name>" for
what the learner logged with context.log_scalar (step: the learner's own).

The controller feeds it the job's metrics entries as they are written (`entry`) and each closed round
(`round_done`, for the logged scalars). The figure is not drawn while the job runs: matplotlib cost the
server more CPU than averaging the model (a quarter to a third of its busy time when a round drew it; about
1 CPU-second to import and 0.5 to draw when only the job's end did, as much as a whole round's transfer).
`download_job` draws it (`draw_curves`) when the job's metrics are newer than the figure, so it is drawn
only for someone who asks, at most once per change; the live curves are the dashboard's and TensorBoard's.
Tracking never fails a study: a server without the tensorboard package writes no event files (one
warning), and a file or figure that cannot be written is logged.
Blocking (files, matplotlib): the controller calls it in a worker thread.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..workflows import RoundOutcome
from .tb_events import EventFile

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
SITES_RUN_DIR = "sites"
GLOBAL_RUN = "global"
SCALARS_FILE = "scalars.jsonl"
METRICS_FILE = "metrics.jsonl"  # written by the job store (JobStore.append_metrics)
CURVES_PNG = "curves.png"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a site name safe as a folder name

Points = list[tuple[str, int, float]]


class JobTracker:
    def __init__(self, job_dir: Path, keep_through_step: int = 0, key_metric: str = ""):
        """`keep_through_step`: the job step of the last checkpoint; history of later rounds is dropped,
        as those rounds run again (see JobStore.keep_metrics)."""
        self._job_dir = job_dir
        self._key_metric = key_metric
        self._started_s = time.time()
        self._files: dict[str, EventFile] = {}
        self._no_events = ""   # why event files are off (the tensorboard package missing)
        self._warned: set[str] = set()
        self._keep_history(keep_through_step)

    # ---- fed by the controller ---------------------------------------------------------------------

    def entry(self, entry: dict[str, Any]) -> None:
        """A metrics entry as the workflow appends it: per-round train and validation figures."""
        by_run: dict[str, Points] = {}
        if entry.get("type") == "round":
            rnd = int(entry.get("round", 0))
            for site, metrics in (entry.get("train") or {}).items():
                by_run.setdefault(_site_run(site), []).extend(_tagged("train", metrics, rnd))
            for site, n in (entry.get("n_samples") or {}).items():
                by_run.setdefault(_site_run(site), []).append(("train/n_samples", rnd, float(n)))
            for site, metrics in (entry.get("local_validation") or {}).items():
                by_run.setdefault(_site_run(site), []).extend(_tagged("local_validation", metrics, rnd))
            by_run.setdefault(GLOBAL_RUN, []).extend(_tagged("train", entry.get("train_global") or {}, rnd))
        elif entry.get("type") == "validation":
            model_round = int(entry.get("model_round", 0))
            for site, metrics in (entry.get("sites") or {}).items():
                by_run.setdefault(_site_run(site), []).extend(_tagged("validation", metrics, model_round))
            by_run.setdefault(GLOBAL_RUN, []).extend(_tagged("validation", entry.get("global") or {}, model_round))
        self._write(by_run)

    def round_done(self, outcome: RoundOutcome) -> None:
        """The logged scalars of a closed round: into each site's event file and the history (the figure
        is drawn from it at the job's end, `draw`)."""
        by_run: dict[str, Points] = {}
        summary: dict[str, dict[str, Any]] = {}
        for site, result in sorted(outcome.results.items()):
            if not result.scalars:
                continue
            by_run[_site_run(site)] = [(f"learner/{name}", step, value) for name, step, value in result.scalars]
            summary[site] = _summarize(result.scalars)
        self._write(by_run)
        if summary:
            line = {"step": outcome.step, "round": outcome.plan.round, "kind": outcome.plan.kind.value,
                    "sites": summary}
            try:
                with (self._job_dir / SCALARS_FILE).open("a") as f:
                    f.write(json.dumps(line, sort_keys=True) + "\n")
            except OSError as e:
                self._warn("history", f"logged scalars not kept for job {self._job_dir.name}: {e}")

    def draw(self) -> None:
        """Write curves.png now (`draw_curves`)."""
        draw_curves(self._job_dir, self._key_metric, only_if_stale=False)

    # ---- inside ----------------------------------------------------------------------------------------

    def _write(self, by_run: dict[str, Points]) -> None:
        if self._no_events:
            return
        for run, points in by_run.items():
            if not points or not run:
                continue
            file = self._files.get(run)
            if file is None:
                file = self._files[run] = EventFile(self._job_dir / TENSORBOARD_DIR / run, self._started_s)
            try:
                file.append(points)
            except ImportError:
                self._no_events = "the tensorboard package is not installed"
                log.warning("job %s: no TensorBoard event files: %s on this server (pip install tensorboard)",
                            self._job_dir.name, self._no_events)
                return
            except OSError as e:
                self._warn(f"events:{run}", f"TensorBoard events of run '{run}' not written: {e}")

    def _keep_history(self, keep_through_step: int) -> None:
        path = self._job_dir / SCALARS_FILE
        lines = _read_jsonl(path)
        kept = [line for line in lines if int(line.get("step", 0)) <= keep_through_step]
        if len(kept) != len(lines):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in kept))
            tmp.replace(path)

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:  # once per kind of trouble and job, not once per round
            self._warned.add(key)
            log.warning("%s", message)


def draw_curves(job_dir: Path, key_metric: str = "", *, only_if_stale: bool = True) -> None:
    """Write the job's curves.png from its metrics and scalar history (replaced atomically); with
    `only_if_stale`, only when either file changed after the figure was drawn. Blocking (matplotlib): call
    it in a worker thread. A figure that cannot be drawn is logged, never raised."""
    sources = [job_dir / METRICS_FILE, job_dir / SCALARS_FILE]
    target = job_dir / CURVES_PNG
    try:
        if only_if_stale and target.exists():
            drawn_ns = target.stat().st_mtime_ns
            if all(not p.exists() or p.stat().st_mtime_ns <= drawn_ns for p in sources):
                return
        from .curves import curves_png  # matplotlib: only where a figure is drawn

        png = curves_png(_read_jsonl(sources[0]), _read_jsonl(sources[1]), key_metric)
        if png is None:
            return
        tmp = job_dir / (CURVES_PNG + ".tmp")
        tmp.write_bytes(png)
        tmp.replace(target)
    except Exception as e:  # noqa: BLE001 - a figure that fails must not fail the study or the download
        log.warning("learning curves not drawn for job %s: %s: %s", job_dir.name, type(e).__name__, e)


def latest_scalars(job_dir: Path) -> dict[str, dict[str, list[float]]]:
    """Per site, the last value each logged scalar had, as {site: {name: [step, value]}} (show_job)."""
    latest: dict[str, dict[str, list[float]]] = {}
    for line in _read_jsonl(job_dir / SCALARS_FILE):
        for site, names in (line.get("sites") or {}).items():
            for name, summary in names.items():
                latest.setdefault(site, {})[name] = summary["last"]
    return latest


def _site_run(site: str) -> str:
    if not _RUN_NAME.match(site):
        return ""  # not a name to make a folder of (sites are named by their certificates; never expected)
    return f"{SITES_RUN_DIR}/{site}"


def _tagged(prefix: str, metrics: dict[str, Any], step: int) -> Points:
    return [(f"{prefix}/{name}", step, float(value)) for name, value in sorted(metrics.items())
            if isinstance(value, int | float) and not isinstance(value, bool) and name != "n_samples"]


def _summarize(points: Iterable[tuple[str, int, float]]) -> dict[str, Any]:
    """Per name: the last point (highest step; later wins a tie), the mean and the count of a round."""
    out: dict[str, Any] = {}
    for name, step, value in points:
        s = out.setdefault(name, {"last": [step, value], "sum": 0.0, "n": 0})
        if step >= s["last"][0]:
            s["last"] = [step, value]
        s["sum"] += value
        s["n"] += 1
    return {name: {"last": s["last"], "mean": _finite_or(s["sum"] / s["n"], s["last"][1]), "n": s["n"]}
            for name, s in out.items()}


def _finite_or(value: float, fallback: float) -> float:
    return value if math.isfinite(value) else fallback  # a sum of huge values overflowed


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for text in path.read_text().splitlines():
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(value, dict):
            out.append(value)
    return out


__all__ = ["CURVES_PNG", "GLOBAL_RUN", "SCALARS_FILE", "TENSORBOARD_DIR", "JobTracker", "draw_curves", "latest_scalars"]
