"""NativeSandbox (bubblewrap) keeps its contract: a tiny probe script started through it cannot see the kit's
key, reach the host's network, or write anything but scratch and outbox; loopback inside still works; kill()
takes every process along, a setsid()-ed grandchild included; cgroup limits hold where they are set."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import secrets
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from provision.local_study import wait_until
from runtime.client import cgroups
from runtime.client.sandbox import SandboxLimits, SandboxUnavailable, WorkerLaunch
from runtime.client.sandbox_native import NativeSandbox
from runtime.kit_config import SandboxSettings
from tests.conftest import pids_naming

RUN_TIMEOUT_S = 60.0


class _Layout:
    def __init__(self, root: Path):
        self.kit = root / "kit"
        self.runtime = self.kit / "runtime"
        self.key = self.kit / "startup" / "client.key"
        self.data = root / "data"
        job = self.kit / "workspace" / "jobs" / "j1"
        self.code, self.scratch, self.inbox, self.outbox = (job / n for n in ("code", "scratch", "inbox", "outbox"))
        for folder in (self.runtime, self.key.parent, self.data, self.code, self.scratch, self.inbox, self.outbox):
            folder.mkdir(parents=True)
        (self.runtime / "__init__.py").write_text("")
        self.key.write_text("-----BEGIN PRIVATE KEY-----\nFAKE\n")
        self.key.chmod(0o600)
        (self.data / "train.csv").write_text("a,b\n1,2\n")
        (self.inbox / "global_in.safetensors").write_text("weights")

    def launch(self, script: str, limits: SandboxLimits | None = None) -> WorkerLaunch:
        probe = self.code / f"probe_{secrets.token_hex(3)}.py"
        probe.write_text(textwrap.dedent(script))
        return WorkerLaunch(argv=(sys.executable, str(probe)),
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(self.kit)},
                            runtime_dir=self.runtime, read_only=(self.code, self.data, self.inbox),
                            writable=(self.scratch, self.outbox), gpus=(), limits=limits or SandboxLimits(),
                            log_path=self.kit / "worker.log", cwd=self.scratch)


@pytest.fixture
def layout(tmp_path: Path) -> _Layout:
    reason = NativeSandbox().unavailable_reason()
    assert reason is None, reason  # bubblewrap is a test dependency here (Debian package bubblewrap)
    return _Layout(tmp_path)


async def _run(launch: WorkerLaunch) -> tuple[dict, int]:
    """Start the probe, read its JSON lines to the end, wait for it; (the lines merged, exit code)."""
    answer, code, _ = await _run_noting_memory(launch)
    return answer, code


async def _run_noting_memory(launch: WorkerLaunch) -> tuple[dict, int, bool]:
    """As _run, and whether the sandbox saw the probe killed for passing its memory limit."""
    sandbox = NativeSandbox()
    sandbox.hand_over((), launch.writable)  # as WorkerHandle.start does: a root daemon's job is another user
    proc = await sandbox.start(launch)
    answer: dict = {}
    try:
        proc.stdin.close()
        output = await asyncio.wait_for(proc.stdout.read(), RUN_TIMEOUT_S)
        code = await asyncio.wait_for(proc.wait(), RUN_TIMEOUT_S)
    finally:
        sandbox.kill(proc)
        await proc.wait()
    for line in output.decode().splitlines():
        answer.update(json.loads(line))
    return answer, code, proc.memory_exhausted


ATTEMPT = """
import json, os, socket, sys
def attempt(fn):
    try:
        fn()
        return "done"
    except Exception as e:
        return type(e).__name__
def read(path):
    return lambda: open(path).read()
def write(path):
    return lambda: open(path, "w").write("x")
def unshare_user():
    import ctypes
    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare")
def family_refused(family):
    try:
        socket.socket(family, socket.SOCK_STREAM if family == 40 else socket.SOCK_RAW).close()
        return 0
    except OSError as e:
        return e.errno
def add_key():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(248 if os.uname().machine == "x86_64" else 217, b"user", b"left-for-the-next-job", b"x", 1,
                    -4) < 0:  # KEY_SPEC_USER_KEYRING
        return ctypes.get_errno()
    return 0
def connect(port):
    def go():
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    return go
"""


def test_probe_cannot_read_the_kit_key_and_sees_only_its_binds(layout):
    launch = layout.launch(ATTEMPT + f"""
print(json.dumps({{"key": attempt(read({str(layout.key)!r})),
                  "startup": os.path.exists({str(layout.key.parent)!r}),
                  "kit_top": sorted(os.listdir({str(layout.kit)!r})),
                  "data": attempt(read({str(layout.data / "train.csv")!r})),
                  "inbox": attempt(read({str(layout.inbox / "global_in.safetensors")!r})),
                  "runtime": os.path.exists({str(layout.runtime / "__init__.py")!r}),
                  "shadow": attempt(read("/etc/shadow")), "home": os.path.exists("/home"),
                  "uid": os.getuid(), "pid": os.getpid(),
                  "nested_userns": attempt(unshare_user), "keyring": add_key()}}))
""")
    answer, code = asyncio.run(_run(launch))
    assert code == 0
    # the user keyring outlives the job: one job could leave there what the next one reads
    assert answer["keyring"] == errno.ENOSYS
    assert answer["key"] == "FileNotFoundError"
    assert answer["startup"] is False
    assert answer["kit_top"] == ["runtime", "workspace"]  # workspace only as the path to the job folders
    assert answer["data"] == "done" and answer["inbox"] == "done" and answer["runtime"] is True
    assert answer["shadow"] == "FileNotFoundError" and answer["home"] is False
    assert answer["uid"] == 65534
    # no user namespaces of its own (bwrap --disable-userns, and the seccomp filter where a root daemon maps
    # the namespace itself)
    assert answer["nested_userns"] in ("OSError", "PermissionError")
    assert answer["pid"] != os.getpid()


def test_a_data_root_around_the_kit_still_hides_the_key(layout, tmp_path):
    launch = layout.launch(ATTEMPT + f"""
print(json.dumps({{"key": attempt(read({str(layout.key)!r})),
                  "data": attempt(read({str(layout.data / "train.csv")!r})),
                  "runtime": os.path.exists({str(layout.runtime / "__init__.py")!r})}}))
""")
    launch = dataclasses.replace(launch, read_only=(*launch.read_only, tmp_path))  # data_root: the kit's parent
    tmp_path.chmod(0o755)  # a data root the job's user may read (pytest makes it 0700)
    answer, code = asyncio.run(_run(launch))
    assert code == 0
    assert answer == {"key": "FileNotFoundError", "data": "done", "runtime": True}


@pytest.mark.parametrize("kit", ["/usr/local/fedkit/site-1", "/opt/fedkit/site-1"])
def test_a_kit_under_a_system_folder_is_covered_before_the_job_folders_are_bound(kit):
    # the whole of /usr is bound read-only: a kit under /usr/local showed the job its startup/ (the key)
    kit_dir = Path(kit)
    job = kit_dir / "workspace" / "jobs" / "j1"
    launch = WorkerLaunch(argv=("/usr/bin/python3",), env={}, runtime_dir=kit_dir / "runtime",
                          read_only=(job / "code",), writable=(job / "scratch",), gpus=(), limits=SandboxLimits(),
                          log_path=Path("/dev/null"), cwd=job / "scratch")
    args = NativeSandbox(euid=1000)._bwrap_argv(launch, [Path("/usr")], [], [])
    covered = any(flag == "--tmpfs" and path == kit for flag, path in zip(args, args[1:], strict=False))
    assert covered == kit.startswith("/usr/")
    if covered:  # the cover before the job's own folders, which land on top of it
        assert args.index(kit) < args.index(str(job / "code"))


def test_probe_writes_only_scratch_and_outbox(layout):
    targets = {"data": layout.data / "x", "runtime": layout.runtime / "evil.py", "code": layout.code / "x",
               "inbox": layout.inbox / "x", "scratch": layout.scratch / "x", "outbox": layout.outbox / "x",
               # the sandbox's own root and /dev: tmpfs that a job once filled past its memory limit
               "root": Path("/x"), "dev": Path("/dev/x"), "etc": Path("/etc/x")}
    launch = layout.launch(ATTEMPT + f"""
targets = {json.dumps({k: str(v) for k, v in targets.items()})}
print(json.dumps({{name: attempt(write(path)) for name, path in targets.items()}}))
""")
    answer, code = asyncio.run(_run(launch))
    assert code == 0
    assert answer["scratch"] == "done" and answer["outbox"] == "done"
    for name in ("data", "runtime", "code", "inbox", "root", "dev", "etc"):
        assert answer[name] == "OSError", (name, answer[name])  # read-only file system
        assert name in ("root", "dev", "etc") or not targets[name].exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="what a site run as root does; CI and make test run as root")
def test_a_root_sites_job_is_an_unprivileged_user_of_the_machine(layout):
    # uid 65534 inside was root outside: the job could write /proc/sys (kernel.core_pattern runs a program as
    # root at the next crash) and every root-owned file a mount showed it writable
    launch = layout.launch(ATTEMPT + f"""
def sysctl():
    with open("/proc/sys/kernel/core_pattern", "r+") as f:
        f.write(f.read())  # the same value: harmless had it passed
open({str(layout.scratch / "made")!r}, "w").close()
print(json.dumps({{"sysctl": attempt(sysctl), "uid": os.getuid(), "tmp": attempt(write("/tmp/x")),
                  "shm": attempt(write("/dev/shm/x")), "hosts": attempt(read("/etc/hosts")),
                  "cpus": attempt(lambda: os.listdir("/sys/devices/system/cpu"))}}))
""")
    answer, code = asyncio.run(_run(launch))
    assert code == 0
    # and what bwrap made as root inside is still the job's to use: torchrun's ranks failed to find
    # localhost (/etc/hosts 0600) and gloo to read /sys (0700)
    assert answer == {"sysctl": "PermissionError", "uid": 65534, "tmp": "done", "shm": "done", "hosts": "done",
                      "cpus": "done"}
    assert (layout.scratch / "made").stat().st_uid == SandboxSettings().run_as_ids()[0]


def test_a_root_daemon_shares_its_private_job_files_with_the_jobs_user(tmp_path):
    sandbox = NativeSandbox(euid=0)
    assert sandbox.worker_user == (65534, 65534)
    code, model = tmp_path / "code", tmp_path / "inbox" / "r1" / "global_in.safetensors"
    (code / "pkg").mkdir(parents=True, mode=0o700)
    (code / "pkg" / "learner.py").write_text("x = 1\n")
    (code / "pkg" / "learner.py").chmod(0o600)
    model.parent.mkdir(parents=True, mode=0o700)
    model.write_bytes(b"weights")
    model.chmod(0o600)
    assert not sandbox.can_read(code / "pkg")
    sandbox.hand_over((code,), ())
    sandbox.share_file(model)
    assert sandbox.can_read(code / "pkg") and sandbox.can_read(model.parent)
    assert (code / "pkg" / "learner.py").stat().st_mode & 0o777 == 0o604 and model.stat().st_mode & 0o777 == 0o604
    assert NativeSandbox(euid=1000).worker_user is None  # an ordinary user's job runs as that user: nothing to do


def test_a_sandbox_that_never_reports_its_namespace_is_refused_in_one_line(layout):
    # a root daemon maps the job's namespace once bwrap reports it; a bwrap that dies first must not hang it
    sandbox = NativeSandbox(bwrap="/bin/true", euid=0)
    with pytest.raises(SandboxUnavailable, match="bwrap did not report its sandbox") as err:
        asyncio.run(sandbox.start(layout.launch("print('never runs')")))
    assert "\n" not in str(err.value)


def test_probe_has_no_network_but_its_own_loopback(layout):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        launch = layout.launch(ATTEMPT + f"""
inside = socket.create_server(("127.0.0.1", 0))
inside_port = inside.getsockname()[1]
print(json.dumps({{"host_listener": attempt(connect({port})),
                  "outside": attempt(lambda: socket.create_connection(("1.1.1.1", 443), timeout=5)),
                  "own_loopback": attempt(connect(inside_port)),
                  "vsock": family_refused(40), "packet": family_refused(17)}}))
""")
        answer, code = asyncio.run(_run(launch))
    finally:
        listener.close()
    assert code == 0
    assert answer["host_listener"] == "ConnectionRefusedError"  # its 127.0.0.1 is not the host's
    assert answer["vsock"] == answer["packet"] == errno.EAFNOSUPPORT  # no namespace covers them: seccomp
    assert answer["outside"] in ("OSError", "TimeoutError")  # network unreachable: no route at all
    assert answer["own_loopback"] == "done"


def test_kill_takes_a_setsid_grandchild_along(layout):
    token = f"fedkit-orphan-{secrets.token_hex(4)}"
    launch = layout.launch(f"""
import os, subprocess, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:  # double fork: reparented, own session; it must still die with the sandbox
        os.execv(sys.executable, [sys.executable, "-c", "import time\\nwhile True: time.sleep(0.2)", {token!r}])
    os._exit(0)
print('{{"started": true}}', flush=True)
sys.stdin.read()  # until the daemon goes away
""")

    async def scenario() -> None:
        sandbox = NativeSandbox()
        proc = await sandbox.start(launch)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), RUN_TIMEOUT_S)
            assert json.loads(line) == {"started": True}
            await asyncio.to_thread(wait_until, lambda: pids_naming(token), 30, "the grandchild to run")
        finally:
            sandbox.kill(proc)
            await proc.wait()

    asyncio.run(scenario())
    wait_until(lambda: not pids_naming(token), 30, "the setsid grandchild to be killed")


def test_memory_limit_stops_a_greedy_job(layout):
    limits = SandboxLimits(memory_bytes=128 << 20, pids=64)
    assert "cgroup" in NativeSandbox().describe_limits(limits)["memory"], "this test host gives root cgroups"
    launch = layout.launch("""
import json
print(json.dumps({"started": True}), flush=True)
block = bytearray(512 << 20)
for i in range(0, len(block), 4096):
    block[i] = 1
print(json.dumps({"allocated": True}), flush=True)
""", limits=limits)
    answer, code, memory_exhausted = asyncio.run(_run_noting_memory(launch))
    assert answer == {"started": True} and code != 0
    assert memory_exhausted  # what lets the site say why the job died (WorkerHandle._exit_reason)


def test_a_job_within_its_memory_limit_is_not_said_to_exhaust_it(layout):
    launch = layout.launch('print(\'{"started": true}\', flush=True)\n',
                           limits=SandboxLimits(memory_bytes=256 << 20, pids=64))
    answer, code, memory_exhausted = asyncio.run(_run_noting_memory(launch))
    assert answer == {"started": True} and code == 0 and not memory_exhausted


def test_pids_limit_stops_a_fork_bomb(layout):
    limits = SandboxLimits(pids=32)
    launch = layout.launch("""
import json, threading, time
started = 0
try:
    for _ in range(200):
        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
        started += 1
    outcome = "all started"
except RuntimeError:
    outcome = "refused"
print(json.dumps({"outcome": outcome, "started": started}), flush=True)
""", limits=limits)
    answer, code = asyncio.run(_run(launch))
    assert answer["outcome"] == "refused" and answer["started"] < 32


@pytest.fixture
def no_cgroups(monkeypatch):
    """A host where the site cannot write cgroups (a site not run as root, no delegated cgroup): the
    limits fall back to what sandbox_enter.py sets."""
    monkeypatch.setattr(cgroups, "plan", lambda limits, *args: cgroups.CgroupPlan({}))


def test_without_cgroups_tmp_and_shm_are_within_the_memory_limit(layout, no_cgroups):
    # RLIMIT_AS does not count tmpfs pages: a job limited to 256 MiB wrote 2 GiB into /dev/shm
    limits = SandboxLimits(memory_bytes=256 << 20, pids=64)
    assert NativeSandbox().describe_limits(limits)["memory"] == \
        "256 MiB (rlimit (address space, per process); /tmp and /dev/shm 128 MiB each; memfd and SysV shm not " \
        "bounded)"
    launch = layout.launch("""
import json
def fill(folder):
    written = 0
    try:
        with open(folder + "/fill", "wb") as f:
            for _ in range(400):
                f.write(b"x" * (1 << 20))
                f.flush()
                written += 1
    except OSError as e:
        return [written, e.errno]
    return [written, 0]
print(json.dumps({"tmp": fill("/tmp"), "shm": fill("/dev/shm")}), flush=True)
""", limits=limits)
    answer, code = asyncio.run(_run(launch))
    for folder in ("tmp", "shm"):
        written, error = answer[folder]
        assert error == errno.ENOSPC and written <= 128, answer


def test_without_cgroups_a_fork_storm_stops_at_the_pids_limit(layout, no_cgroups):
    # the job's user kept its whole process limit: a fork storm left the site unable to start processes
    limits = SandboxLimits(pids=32)
    assert NativeSandbox().describe_limits(limits)["pids"] == "32 (rlimit (processes of the job's user))"
    launch = layout.launch("""
import json, os, time
children, outcome = [], "all started"
try:
    for _ in range(200):
        pid = os.fork()
        if pid == 0:
            time.sleep(5)
            os._exit(0)
        children.append(pid)
except OSError as e:
    outcome = e.errno
for pid in children:
    os.kill(pid, 9)
print(json.dumps({"outcome": outcome, "started": len(children)}), flush=True)
""", limits=limits)
    answer, code = asyncio.run(_run(launch))
    assert answer["outcome"] == errno.EAGAIN and answer["started"] < 200, answer


def test_missing_bwrap_is_one_line_with_the_fix():
    reason = NativeSandbox(bwrap="/nonexistent/bwrap-not-here").unavailable_reason()
    assert reason and "\n" not in reason
    assert "bwrap" in reason and "sandbox.backend: off" in reason


def test_the_daemons_own_interpreter_is_bound_as_its_probe_would_bind_it(tmp_path, monkeypatch):
    """The default worker python (the daemon's own) is not probed with a process of its own: the folders
    bound for it are the ones the probe names, and another interpreter is still asked."""
    from runtime.client import sandbox_native

    monkeypatch.setattr(sandbox_native, "_PREFIXES", {})
    monkeypatch.delenv("PYTHONHOME", raising=False)
    probed = asyncio.run(sandbox_native._ask_prefixes(sys.executable))
    started: list[tuple] = []
    real_exec = asyncio.create_subprocess_exec

    async def counting_exec(*args, **kwargs):
        started.append(args)
        return await real_exec(*args, **kwargs)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", counting_exec)
    assert asyncio.run(sandbox_native._interpreter_prefixes(sys.executable)) == probed
    assert started == []
    other = tmp_path / "python3"  # the same interpreter by another path: not the daemon's own, so asked
    other.symlink_to(sys.executable)
    asyncio.run(sandbox_native._interpreter_prefixes(str(other)))
    assert [a[0] for a in started] == [str(other)]
