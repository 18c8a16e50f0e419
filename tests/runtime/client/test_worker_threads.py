"""The training worker's CPU threads (runtime/client/worker_threads.py): the site's setting, else the cores
it is granted split between its ranks, reach torch in the real worker process."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from runtime.client import worker_threads
from runtime.client.job_folders import JobFolders
from runtime.client.sandbox import OffSandbox
from runtime.client.worker_handle import WorkerHandle
from runtime.client.worker_threads import granted_cores, threads_per_rank
from runtime.kit_config import SandboxSettings, SiteLocalSettings
from runtime.weights import save_file

REPO = Path(__file__).resolve().parents[3]

LEARNER = textwrap.dedent('''
    import torch
    from runtime.learner import Learner

    class Threads(Learner):
        def train(self, weights, round):
            raise NotImplementedError

        def validate(self, weights):
            return {"threads": float(torch.get_num_threads())}
''')


@pytest.mark.parametrize(("settings", "nproc", "expected"), [
    (SiteLocalSettings(threads=3), 1, 3),
    (SiteLocalSettings(threads=3), 4, 3),                                    # per rank, as set
    (SiteLocalSettings(sandbox=SandboxSettings(cpus=4)), 2, 2),              # the sandbox's cores, split
    (SiteLocalSettings(sandbox=SandboxSettings(cpus=1.5)), 1, 2),
    (SiteLocalSettings(sandbox=SandboxSettings(cpus=1)), 4, 1),              # never below one
    (SiteLocalSettings(sandbox=SandboxSettings(cpus=64)), 1, 8),             # no more than the machine has
])
def test_threads_follow_the_site_setting_else_the_granted_cores(settings, nproc, expected, monkeypatch) -> None:
    monkeypatch.setattr(worker_threads, "granted_cores", lambda: 8)  # an 8-core machine
    assert threads_per_rank(settings, nproc) == expected


def test_settings_this_machine_cannot_honour_are_named_at_start() -> None:
    from runtime.client.__main__ import machine_mismatches

    asks = SiteLocalSettings(gpus=[0, 1], sandbox=SandboxSettings(cpus=64))
    assert machine_mismatches(asks, cores=2, nvidia_devices=["nvidia0"]) == [
        "local/site.yml gpus lists 1, which this machine does not show (/dev/nvidiaN; it shows 1): jobs asking "
        "for them fail or train on CPU",
        "local/site.yml sandbox.cpus is 64, above the 2 cores this site may use: a job gets 2 threads per rank at "
        "most"]
    assert machine_mismatches(asks, cores=64, nvidia_devices=["nvidia0", "nvidia1"]) == []
    assert machine_mismatches(SiteLocalSettings(), cores=2, nvidia_devices=[]) == []
    limited = SiteLocalSettings(sandbox=SandboxSettings(memory_mb=4096))
    (line,) = machine_mismatches(limited, cores=2, nvidia_devices=[], memory_cgroup=False)
    assert line.startswith("local/site.yml sandbox.memory_mb is 4096, but this site cannot create a memory cgroup")
    assert machine_mismatches(limited, cores=2, nvidia_devices=[], memory_cgroup=True) == []


def test_by_default_a_worker_gets_the_machines_cores_split_between_its_ranks() -> None:
    assert threads_per_rank(SiteLocalSettings(), 1) == granted_cores()
    assert threads_per_rank(SiteLocalSettings(), 2 * granted_cores()) == 1


async def _worker_threads(tmp_path: Path, threads: int) -> float:
    folders = JobFolders(tmp_path / "job")
    folders.create()
    (folders.code / "custom").mkdir(parents=True)
    (folders.code / "custom" / "threads_learner.py").write_text(LEARNER)
    weights = folders.inbox / "global.safetensors"
    save_file({}, weights)
    worker = await WorkerHandle.start(sandbox=OffSandbox(), python="", kit=REPO, folders=folders, site="s",
                                      job_id="j", data_root="", gpus=[], learner="threads_learner:Threads",
                                      learner_args={}, log_path=tmp_path / "worker.log", threads=threads)
    try:
        reply = await worker.call({"op": "validate", "weights": str(weights)}, 120.0)
        return reply["metrics"]["threads"]
    finally:
        await worker.stop()


def test_the_real_worker_runs_torch_with_the_sites_thread_count(tmp_path: Path) -> None:
    assert asyncio.run(_worker_threads(tmp_path, 1)) == 1.0
    if granted_cores() > 1:  # torch never runs more threads than there are cores
        assert asyncio.run(_worker_threads(tmp_path / "b", 2)) == 2.0


def test_what_a_sites_differential_privacy_leaves_open_is_said_at_start() -> None:
    from runtime.client.__main__ import privacy_gaps
    from runtime.client.privacy_policy import PrivacyPolicy

    noise = {"gaussian_dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}}
    open_reports, no_budget = privacy_gaps(PrivacyPolicy.model_validate(noise))
    assert "metrics, logged scalars and error messages leave as its code writes them" in open_reports
    assert "sets no dp_budget or dp_site_budget" in no_budget and "average the noise away" in no_budget
    budgeted = PrivacyPolicy.model_validate({**noise, "dp_site_budget": {"epsilon": 8.0, "delta": 1e-5},
                                             "reports": {"metric_names": ["auc"]}})
    assert privacy_gaps(budgeted) == [] and privacy_gaps(PrivacyPolicy()) == []
