"""A site with `nproc: 2` trains with two torchrun ranks (DDP over gloo on this CPU machine); the
daemon still speaks to one worker, and the round is aggregated as usual."""

from __future__ import annotations

import shutil
from pathlib import Path

JOB = Path(__file__).parent / "jobs" / "ddp"


def test_site_trains_with_two_ranks_under_torchrun(make_study, tmp_path):
    handle = make_study(sites=["site-1", "site-2"])
    study = handle.study
    study.write_local("site-1", "site.yml", {"data_root": str(handle.data.site_dirs["site-1"]),
                                             "heartbeat_interval_s": 1.0, "nproc": 2})
    study.start_server()
    study.start_sites()
    job = tmp_path / "job"
    shutil.copytree(JOB, job)

    record = study.admin_json(f"submit_job {job}")
    final = study.admin_json(f"wait_job {record['job_id']} 240")

    assert final["state"] == "finished"
    rounds = [m for m in study.admin_json(f"show_job {record['job_id']}")["metrics"] if m["type"] == "round"]
    n_train = sum(1 for _ in (handle.data.site_dirs["site-1"] / "train.csv").open()) - 1
    for entry in rounds:
        assert entry["train"]["site-1"]["world_size"] == 2.0
        assert entry["train"]["site-1"]["samples_all_ranks"] == float(n_train)  # both shards trained
        assert entry["train"]["site-2"]["world_size"] == 1.0
