"""The segmentation job template as a study over real processes: a server and two sites from their kits,
each site training the MONAI UNet on its own synthetic images (one site NIfTI, the other NumPy), in the
sites' default sandbox. The global model after two FedAvg rounds must segment images no site saw better
than the round-0 model, and the key metric the sites report must be Dice."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sys

import pytest

from provision.demo import SEGMENTATION_TEMPLATE
from provision.demo_segmentation import heldout_metrics, write_segmentation_data
from provision.local_study import wait_until
from runtime.job_spec import load_job_folder
from runtime.learner import SiteContext
from runtime.simulate import simulate

OVERRIDES = ["server.rounds=2", "meta.min_clients=2"]


def _simulated_dice(job, data, sites, folder) -> list[tuple[int, float]]:
    """The same job folder and data in the in-process simulator: (round, global validation Dice) per round."""
    spec = load_job_folder(job, OVERRIDES)
    custom = job / "custom"
    module_spec = importlib.util.spec_from_file_location("segmentation_sim_learner", custom / "learner.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(custom))
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(custom))
    learners = {}
    for site in sites:
        (folder / site).mkdir(parents=True)
        context = SiteContext(site=site, job_id="simulated", data_root=data.site_dirs[site], work_dir=folder / site)
        learners[site] = module.SegmentationLearner(context, **spec.client.learner.args)
    result = asyncio.run(simulate(spec, learners, folder / "server"))
    return [(m["model_round"], m["global"]["dice"]) for m in result.metrics if m["type"] == "validation"]


def test_segmentation_two_sites_two_rounds(make_study, tmp_path):
    handle = make_study(sites=["site-1", "site-2"])
    study = handle.study
    data = write_segmentation_data(tmp_path / "images", study.clients)
    for site in study.clients:  # replace the tabular demo data with the site's images
        study.write_local(site, "site.yml", {"data_root": str(data.site_dirs[site]), "heartbeat_interval_s": 1.0})
    study.start_server()
    for site in study.clients:
        study.start(site)
    wait_until(lambda: sum(s["online"] for s in study.admin_json("check_status client")["sites"])
               == len(study.clients), 60, "every site online")

    job = tmp_path / "job"
    shutil.copytree(SEGMENTATION_TEMPLATE, job)
    record = study.admin_json(f"submit_job {job} " + " ".join(f"--set {o}" for o in OVERRIDES))
    final = study.admin_json(f"wait_job {record['job_id']} 900", timeout_s=960)
    assert final["state"] == "finished", final
    assert final["rounds_done"] == 2
    assert final["sites"] == sorted(study.clients)

    results = tmp_path / "results"
    study.admin_json(f"download_job {record['job_id']} {results}")
    models = results / record["job_id"] / "models"
    before = heldout_metrics(job, models / "initial.safetensors", data.heldout_dir)
    after = heldout_metrics(job, models / "global.safetensors", data.heldout_dir)
    assert before["n_samples"] == after["n_samples"] == 12
    assert after["dice"] > before["dice"], (before, after)
    assert after["loss"] < before["loss"], (before, after)

    shown = study.admin_json(f"show_job {record['job_id']}")
    validations = [m for m in shown["metrics"] if m["type"] == "validation"]
    assert [m["model_round"] for m in validations] == [0, 1, 2]
    assert shown["record"]["best_round"] >= 1, "a trained round, not round 0, has the best Dice"

    # The simulator, given the same job folder and the same data, sees the same Dice per round: the learner
    # is seeded (round-0 model, data order, flips), so only float summation order may differ.
    federated = [(m["model_round"], m["global"]["dice"]) for m in validations]
    simulated = _simulated_dice(job, data, study.clients, tmp_path / "sim")
    print("federated", federated, "simulated", simulated)
    assert [r for r, _ in simulated] == [r for r, _ in federated]
    assert [d for _, d in simulated] == pytest.approx([d for _, d in federated], abs=1e-4)
