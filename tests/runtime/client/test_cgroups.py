"""Where a worker's limits can go: cgroup v1 controllers below our own group, or on cgroup v2 the
nearest writable group that hands the controller to its children (a v2 group holding processes, like
the daemon's own, cannot)."""

from __future__ import annotations

from pathlib import Path

from runtime.client.cgroups import WorkerCgroups, plan
from runtime.client.sandbox import SandboxLimits

LIMITS = SandboxLimits(cpus=2.0, memory_bytes=256 << 20, pids=100)


def _v2_tree(root: Path) -> str:
    """A fake cgroup2 mount: the top enables memory and pids; our service's own group enables nothing."""
    (root / "system.slice" / "fedkit.service").mkdir(parents=True)
    (root / "cgroup.subtree_control").write_text("cpu memory pids\n")
    (root / "system.slice" / "cgroup.subtree_control").write_text("memory pids\n")
    (root / "system.slice" / "fedkit.service" / "cgroup.subtree_control").write_text("\n")
    return f"30 25 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw\n"


def test_v2_limits_share_the_writable_group_that_delegates_the_most(tmp_path):
    mountinfo = _v2_tree(tmp_path)
    the_plan = plan(LIMITS, mountinfo=mountinfo, proc_cgroup="0::/system.slice/fedkit.service\n")
    assert the_plan.targets == {"memory": (tmp_path, 2), "pids": (tmp_path, 2), "cpu": (tmp_path, 2)}
    assert the_plan.enforced_by("memory") == "cgroup v2"
    no_cpu = SandboxLimits(memory_bytes=1 << 30, pids=100)  # a tie: the nearest group wins
    assert plan(no_cpu, mountinfo=mountinfo, proc_cgroup="0::/system.slice/fedkit.service\n").targets == {
        "memory": (tmp_path / "system.slice", 2), "pids": (tmp_path / "system.slice", 2)}


def test_v1_controllers_come_first_and_missing_ones_stay_unenforced(tmp_path):
    (tmp_path / "memory" / "mine").mkdir(parents=True)
    mountinfo = f"40 25 0:30 / {tmp_path / 'memory'} rw - cgroup cgroup rw,memory\n"
    the_plan = plan(LIMITS, mountinfo=mountinfo, proc_cgroup="4:memory:/mine\n0::/\n")
    assert the_plan.targets == {"memory": (tmp_path / "memory" / "mine", 1)}
    assert the_plan.enforced_by("pids") is None


def test_no_cgroups_at_all_means_no_targets():
    assert plan(LIMITS, mountinfo="", proc_cgroup="").targets == {}


def test_groups_are_created_with_their_limits_and_removed(tmp_path):
    mountinfo = _v2_tree(tmp_path)
    the_plan = plan(LIMITS, mountinfo=mountinfo, proc_cgroup="0::/system.slice/fedkit.service\n")
    groups = WorkerCgroups.create(the_plan, LIMITS, "job")
    [procs] = groups.procs_files  # one v2 group holds every limit: a process is in one v2 group only
    folder = procs.parent
    assert folder.parent == tmp_path
    assert groups.enforced() == {"memory": "cgroup v2", "pids": "cgroup v2", "cpu": "cgroup v2"}
    assert (folder / "memory.max").read_text() == str(256 << 20)
    assert (folder / "pids.max").read_text() == "100"
    assert (folder / "cpu.max").read_text() == "200000 100000"
    groups.remove(wait_s=0)
