"""Found by the chaos soak (issue 16): a site whose disk was full when a task's model arrived died with an
OSError traceback (ENOSPC while writing the model, or making the round's folder) and stayed offline. Now that
task fails with one line naming the folder and the reason, the server records it, and the daemon keeps serving
the job."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess

import pytest

from provision.local_study import wait_until

from ..soak.driver import JOB as SOAK_JOB

DISK_BYTES = 1 << 20
DISK_INODES = 64


def _server_audit(study) -> list[dict]:
    path = study.kits[study.server] / "workspace" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fill(folder) -> None:
    """Write until not one more byte fits (big writes, then page-sized, then single bytes), then create
    empty files until not one more inode is left: even a new folder cannot be made (as on a full ext4)."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        for i in range(DISK_INODES):
            (folder / f"inode-{i}").touch()


def _free(folder) -> None:
    for path in folder.glob("inode-*"):
        path.unlink()
    (folder / "filler").unlink()


def test_a_site_with_a_full_disk_fails_its_task_and_stays_up(make_study, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting the small tmpfs that plays the full disk needs root")
    study = make_study(sites=["site-1", "site-2"]).study
    jobs = study.kits["site-1"] / "workspace" / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    options = f"size={DISK_BYTES},nr_inodes={DISK_INODES},mode=0700"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(jobs)], check=True, timeout=30)
    try:
        _fill(jobs)
        study.start_server()
        for site in study.clients:
            study.start(site)
        wait_until(lambda: sum(r["event"] == "site_registered" for r in _server_audit(study)) >= 2, 60,
                   "both sites registered", interval_s=0.3)
        shutil.copytree(SOAK_JOB, tmp_path / "job")
        job_id = study.admin_json(f"submit_job {tmp_path / 'job'} --set server.rounds=2 --set meta.min_clients=1 "
                                  "--set client.learner.args.train_s=0.1 --set server.round_timeout_s=60")["job_id"]
        wait_until(lambda: any(r["event"] == "round_done" and r.get("job_id") == job_id and r["round"] == 1
                               for r in _server_audit(study)), 120, "round 1 to close", interval_s=0.3)
        assert study.procs["site-1"].poll() is None, "site-1's daemon died on its full disk:\n" + \
            study.log_tail("site-1", 1500)
        metrics = study.kits[study.server] / "workspace" / "jobs" / job_id / "metrics.jsonl"
        round1 = next(e for e in map(json.loads, metrics.read_text().splitlines())
                      if e["type"] == "round" and e["round"] == 1)
        assert round1["sites"] == ["site-2"]
        assert "cannot store the task's model" in round1["failed"]["site-1"]
        assert "No space left on device" in round1["failed"]["site-1"]
        _free(jobs)
        final = study.admin_json(f"wait_job {job_id} 120", timeout_s=150)
        assert final["state"] == "finished"
        assert study.procs["site-1"].poll() is None
    finally:
        study.stop_all()
        subprocess.run(["umount", str(jobs)], timeout=30)
