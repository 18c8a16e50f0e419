"""The server's experiment tracking: TensorBoard event files read back with TensorBoard's own reader,
the logged-scalar history show_job reads, the curves PNG, and a whole simulated job (the real controller
and FedAvg workflow, in one process) that leaves all of them in its folder."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runtime.job_spec import load_job_spec
from runtime.learner import SiteContext, TrainResult
from runtime.server.tb_events import EventFile
from runtime.server.tracker import CURVES_PNG, SCALARS_FILE, JobTracker, draw_curves, latest_scalars
from runtime.simulate import simulate
from runtime.tasks import TaskKind
from runtime.workflows import RoundOutcome, RoundPlan, SiteResult
from tests.runtime.workflows.numpy_learner import LinearLearner, site_data


def _read(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _is_real_png(path: Path) -> bool:
    from matplotlib.image import imread

    image = imread(path)
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 200 and float(image.std()) > 0.01


def test_event_file_round_trip_through_tensorboards_reader(tmp_path: Path) -> None:
    run = tmp_path / "run"
    events = EventFile(run, started_s=1000.0)
    assert events.append([("a/x", 1, 0.5), ("a/y", 1, 2.0), ("a/x", 2, 0.25)]) == 3
    assert events.append([("a/x", 3, 0.125)]) == 1  # appended to the same file, later
    assert events.append([]) == 0
    assert [p.name for p in run.iterdir()] == [events.path.name]
    assert _read(run) == {"a/x": [(1, 0.5), (2, 0.25), (3, 0.125)], "a/y": [(1, 2.0)]}


def _outcome(kind: TaskKind, rnd: int, step: int, results: dict[str, SiteResult]) -> RoundOutcome:
    return RoundOutcome(plan=RoundPlan(kind=kind, round=rnd), step=step, results=results)


def test_tracker_writes_each_site_and_the_global_run_and_keeps_the_latest_scalars(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    tracker = JobTracker(job, key_metric="auc")
    for rnd in (1, 2):
        validation = {"type": "validation", "model_round": rnd - 1, "global": {"auc": 0.5 + rnd / 10},
                      "sites": {"s1": {"auc": 0.4 + rnd / 10, "n_samples": 10.0}, "s2": {"auc": 0.6 + rnd / 10}}}
        train = {"type": "round", "round": rnd, "train": {"s1": {"loss": 1.0 / rnd}, "s2": {"loss": 2.0 / rnd}},
                 "n_samples": {"s1": 10, "s2": 30}, "train_global": {"loss": 1.75 / rnd}, "local_validation": {}}
        for entry in (validation, train):
            with (job / "metrics.jsonl").open("a") as f:  # the controller appends, then tracks
                f.write(json.dumps(entry) + "\n")
            tracker.entry(entry)
        results = {"s1": SiteResult("s1", TaskKind.TRAIN, scalars=(("batch", 2 * rnd, 1.0), ("batch", 2 * rnd + 1,
                                                                                             0.5 / rnd))),
                   "s2": SiteResult("s2", TaskKind.TRAIN)}
        tracker.round_done(_outcome(TaskKind.TRAIN, rnd, rnd, results))

    s1 = _read(job / "tensorboard" / "sites" / "s1")
    assert s1["train/loss"] == [(1, 1.0), (2, 0.5)]
    assert s1["train/n_samples"] == [(1, 10.0), (2, 10.0)]
    assert s1["validation/auc"] == [(0, pytest.approx(0.5)), (1, pytest.approx(0.6))]
    assert "validation/n_samples" not in s1
    assert s1["learner/batch"] == [(2, 1.0), (3, 0.5), (4, 1.0), (5, 0.25)]
    assert "learner/batch" not in _read(job / "tensorboard" / "sites" / "s2")
    overall = _read(job / "tensorboard" / "global")
    assert overall["validation/auc"] == [(0, pytest.approx(0.6)), (1, pytest.approx(0.7))]
    assert overall["train/loss"] == [(1, 1.75), (2, 0.875)]

    assert latest_scalars(job) == {"s1": {"batch": [5, 0.25]}}
    assert not (job / CURVES_PNG).exists(), "no round draws the figure (matplotlib off the round's path)"
    tracker.draw()  # the job's end
    assert _is_real_png(job / CURVES_PNG)

    # a server restarted after step 1: the history of the round that runs again is dropped
    JobTracker(job, keep_through_step=1)
    assert latest_scalars(job) == {"s1": {"batch": [3, 0.5]}}
    assert len((job / SCALARS_FILE).read_text().splitlines()) == 1


def test_a_server_without_tensorboard_still_runs_the_round(tmp_path: Path, monkeypatch, caplog) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard.compat.proto", None)  # as if the package were absent
    tracker = JobTracker(tmp_path)
    entry = {"type": "round", "round": 1, "train": {"s1": {"loss": 1.0}}, "train_global": {"loss": 1.0}}
    tracker.entry(entry)
    tracker.entry(entry)
    assert not (tmp_path / "tensorboard").exists()
    assert caplog.text.count("tensorboard package is not installed") == 1


class _Logging(LinearLearner):
    """The numpy learner, logging its per-step loss and its round's learning rate."""

    def train(self, weights, round: int) -> TrainResult:
        result = super().train(weights, round)
        for i in range(3):
            self.context.log_scalar("step_loss", result.metrics["mse"] + i)
        self.context.log_scalar("lr", self.lr, step=round)
        return result


def test_a_simulated_job_leaves_event_files_history_and_curves_in_its_folder(tmp_path: Path) -> None:
    spec = load_job_spec({"meta.yml": "name: sim\nmin_clients: 2", "config_fed_client.yml": "learner: {path: a:B}",
                          "config_fed_server.yml": "rounds: 2\nkey_metric: {name: mse, higher_is_better: false}"})
    learners = {}
    for i, site in enumerate(["site-a", "site-b"]):
        x, y = site_data(i, 20 + 10 * i, shift=float(i))
        ctx = SiteContext(site=site, job_id="simulated", data_root=None, work_dir=tmp_path / site)
        learners[site] = _Logging(ctx, x, y)
    result = asyncio.run(simulate(spec, learners, tmp_path / "server"))
    folder = result.folder
    for site in learners:
        tags = _read(folder / "tensorboard" / "sites" / site)
        assert [s for s, _ in tags["train/mse"]] == [1, 2]
        assert [s for s, _ in tags["validation/mse"]] == [0, 1, 2], "round 1 and 2 score models 0 and 1; then 2"
        assert [s for s, _ in tags["learner/step_loss"]] == [0, 1, 2, 3, 4, 5]
        assert tags["learner/lr"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.1))]
    overall = _read(folder / "tensorboard" / "global")
    assert [s for s, _ in overall["validation/mse"]] == [0, 1, 2]
    final = overall["validation/mse"][-1][1]
    assert final == pytest.approx(result.record.final_metrics["mse"], rel=1e-6)
    assert set(latest_scalars(folder)) == set(learners)
    assert _is_real_png(folder / CURVES_PNG)


def test_download_draws_the_curves_only_when_the_metrics_changed(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    tracker = JobTracker(job, key_metric="auc")
    entry = {"type": "round", "round": 1, "train": {"s1": {"loss": 1.0}}, "train_global": {"loss": 1.0}}
    for _ in range(2):
        with (job / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
        tracker.entry(entry)
        tracker.round_done(_outcome(TaskKind.TRAIN, 1, 1, {"s1": SiteResult("s1", TaskKind.TRAIN)}))
    assert not (job / CURVES_PNG).exists(), "a running job's rounds never draw"
    draw_curves(job, "auc")
    first = (job / CURVES_PNG).stat().st_mtime_ns
    assert _is_real_png(job / CURVES_PNG)
    draw_curves(job, "auc")
    assert (job / CURVES_PNG).stat().st_mtime_ns == first, "nothing changed: not drawn again"
    later = {**entry, "round": 2, "train": {"s1": {"loss": 0.5}}}
    os.utime(job / CURVES_PNG, ns=(first - 10**9, first - 10**9))  # the figure is older than what follows
    with (job / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(later) + "\n")
    draw_curves(job, "auc")
    assert (job / CURVES_PNG).stat().st_mtime_ns > first - 10**9, "a new round: drawn again"
