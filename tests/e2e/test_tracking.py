"""Experiment tracking end to end: the tabular template's learner logs its per-batch loss with
context.log_scalar; two real sites send it with their results; the downloaded job holds TensorBoard event
files (read back with TensorBoard's own reader) with each site's per-round metrics, the global validation
and the logged loss, and a curves PNG; show_job shows the last logged value per site."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_two_sites_two_rounds_leave_tensorboard_files_and_curves(make_study, tmp_path: Path) -> None:
    sites = ["site-1", "site-2"]
    handle = make_study(sites=sites)
    study = handle.study
    study.start_server()
    study.start_sites(sites)

    job = handle.job(tmp_path / "job")
    record = study.admin_json(f"submit_job {job} --set server.rounds=2 --set meta.min_clients=2")
    final = study.admin_json(f"wait_job {record['job_id']} 240")
    assert final["state"] == "finished", final

    results = tmp_path / "results"
    study.admin_json(f"download_job {record['job_id']} {results}")
    folder = results / record["job_id"]
    board = folder / "tensorboard"
    for site in sites:
        tags = _scalars(board / "sites" / site)
        assert [step for step, _ in tags["train/loss"]] == [1, 2], f"{site}: train loss of rounds 1 and 2"
        assert [step for step, _ in tags["validation/auc"]] == [0, 1, 2], f"{site}: models 0, 1 and 2 scored"
        assert all(0.0 <= v <= 1.0 for _, v in tags["validation/auc"])
        losses = tags["learner/batch_loss"]
        steps = [step for step, _ in losses]
        assert len(steps) >= 4 and steps == list(range(len(steps))), "one point per batch, counted across rounds"
        assert all(v > 0 for _, v in losses)
    overall = _scalars(board / "global")
    assert [step for step, _ in overall["validation/auc"]] == [0, 1, 2]
    assert overall["validation/auc"][-1][1] == pytest.approx(final["final_metrics"]["auc"], rel=1e-6)
    assert [step for step, _ in overall["train/loss"]] == [1, 2]

    png = folder / "curves.png"
    image = imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.shape[0] > 200 and image.shape[1] > 400 and float(image.std()) > 0.01, "a figure, not a blank"

    shown = study.admin_json(f"show_job {record['job_id']}")
    assert set(shown["scalars"]) == set(sites)
    for site in sites:
        step, value = shown["scalars"][site]["batch_loss"]
        assert (step, value) == pytest.approx(_scalars(board / "sites" / site)["learner/batch_loss"][-1])
    text = study.admin(f"show_job {record['job_id']}", as_json=False)
    assert text.returncode == 0, text.stderr
    assert "logged scalars" in text.stdout and "batch_loss" in text.stdout
