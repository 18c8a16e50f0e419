"""The native sandbox: a job's worker in its own Linux namespaces, through bubblewrap (`bwrap`).

What the worker gets (every path at its host path, see sandbox.py):
    - new user, pid, ipc, uts, net and (where possible) cgroup namespaces; uid/gid 65534 ("nobody")
      inside. The net namespace has only its own loopback: nothing outside is reachable, not even the
      host's 127.0.0.1, while torchrun ranks still meet on the sandbox's own 127.0.0.1;
    - read-only: /usr and the /lib*, /bin, /sbin links, the few /etc files the dynamic linker and Python
      read, the worker interpreter's prefixes (venv and base install), the kit's runtime/ package, the
      job's code, the data root and the daemon's inbox;
    - read-write: scratch and outbox only; a fresh /tmp, /dev and /dev/shm, and its own /proc;
    - GPUs (/dev/nvidia*, /sys) only when the site lists gpus;
    - --die-with-parent and --new-session; kill() kills bwrap, and with it the namespace's init, which
      takes every process of the pid namespace along (a setsid()-ed grandchild included).

Limits go into cgroups where the host lets the daemon write them (cgroups.py); otherwise memory falls
back to RLIMIT_AS (per process, and it counts address space, so it must be generous for torch; /tmp and
/dev/shm are then sized to half the limit each, since tmpfs pages are in no address space), cpus to CPU
affinity, and pids to RLIMIT_NPROC on the job's user (its threads now plus pids: a fork storm stops
there, not at the user's whole limit, which a site running job code as its own user needs to go on).
describe_limits() says which applies.

The uid outside: without a setuid bwrap, uid 65534 inside maps to the uid that started bwrap. For a daemon
run as an ordinary user that is its own uid, and the confinement comes from what is mounted, never from
file permissions (nothing secret is mounted). For a daemon run as root it would be root: job code would
then write any root-owned file a mount shows it writable, /proc/sys included (kernel.core_pattern runs a
program as root at the next crash), and use root's kernel keyring. So a root daemon maps the namespace
itself (bwrap --userns-block-fd): uid 0 inside stays root outside for bwrap's own setup only, and uid 65534
inside is local/site.yml sandbox.run_as (default nobody) outside. bwrap keeps CAP_SETUID/CAP_SETGID for a
one-line step inside (DROP_TO_JOB_USER) that becomes 65534 and so loses every capability before the job's
first instruction. The daemon shares the job's code and inbox with that user (Sandbox.hand_over,
share_file); the data root must be readable by it. bwrap cannot combine --disable-userns with a map it
did not write: the seccomp filter below refuses new user namespaces there as well.

A seccomp filter (seccomp_filter.py) refuses socket families beyond unix, inet and netlink (AF_VSOCK
reaches a virtual machine's host whatever the network namespace) and new user namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path

from ..kit_config import SandboxSettings
from . import cgroups, seccomp_filter
from .sandbox import (
    FIX_HINT,
    LoggedProcess,
    Sandbox,
    SandboxLimits,
    SandboxUnavailable,
    WorkerLaunch,
    WorkerProcess,
    limits_of,
    spawn_worker,
)
from .worker_log import CappedLog

SANDBOX_UID = 65534
PROBE_TIMEOUT_S = 30.0
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "localtime", "nsswitch.conf",
             "host.conf", "gai.conf", "mime.types")
TOP_LEVEL = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
CPU_INFO = "/sys/devices/system/cpu"  # what a job without GPUs sees of /sys (core counts for thread pools)
ENTER_SCRIPT = Path(__file__).with_name("sandbox_enter.py")
# run inside the sandbox as its uid 0 with CAP_SETUID/CAP_SETGID only: become the job's user for good, then
# the worker. Changing every uid from 0 clears every capability (and bwrap set no_new_privs).
DROP_TO_JOB_USER = (f"import os, sys; os.setgroups([]); os.setgid({SANDBOX_UID}); os.setuid({SANDBOX_UID}); "
                    "os.execv(sys.argv[1], sys.argv[1:])")
MAP_TIMEOUT_S = 30.0
_PREFIX_PROBE = ("import json, sys; "
                 "print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]))")


def _tmpfs_size(memory_bytes: int) -> int:
    """Each of /tmp and /dev/shm without a memory cgroup: half the limit, the two together within it."""
    return max(memory_bytes // 2, 1 << 20)


class NativeSandbox(Sandbox):
    name = "native"

    def __init__(self, settings: SandboxSettings | None = None, bwrap: str | None = None,
                 euid: int | None = None):
        self._settings = settings or SandboxSettings()
        self._bwrap = bwrap or shutil.which("bwrap") or ""
        if (os.geteuid() if euid is None else euid) == 0:  # never root outside: see the module docstring
            self.worker_user = self._settings.run_as_ids()
        self._help: str | None = None  # bwrap --help: which options this bwrap has

    def _has_option(self, option: str) -> bool:
        """Whether this bwrap takes `option` (bwrap >= 0.8: --disable-userns, --size). Asked once per sandbox."""
        if self._help is None:
            try:
                done = subprocess.run([self._bwrap, "--help"], capture_output=True, text=True,
                                      timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
                self._help = done.stdout + done.stderr
            except (OSError, subprocess.TimeoutExpired):
                self._help = ""
        return option in self._help

    def _disable_userns_flags(self) -> list[str]:
        """--disable-userns where this bwrap has it: job code then cannot make user namespaces of its own,
        which many kernel exploits need."""
        return ["--disable-userns"] if self._has_option("--disable-userns") else []

    def _tmpfs_bytes(self, limits: SandboxLimits, enforced: Collection[str]) -> int | None:
        """The size of each of the sandbox's /tmp and /dev/shm where the memory limit falls back to an
        address-space rlimit: tmpfs pages are not in a process's address space, so without a size a job
        limited to 256 MiB wrote 2 GiB into /dev/shm (up to half the host's memory each). Half the limit
        each; none where a memory cgroup holds (it counts tmpfs pages), there is no limit, or this bwrap
        cannot size a tmpfs (older than 0.8)."""
        if limits.memory_bytes is None or "memory" in enforced or not self._has_option("--size"):
            return None
        return _tmpfs_size(limits.memory_bytes)

    # ---- can it run here ---------------------------------------------------------------------------

    def unavailable_reason(self) -> str | None:
        if not self._bwrap or not os.access(self._bwrap, os.X_OK):
            return ("bwrap (bubblewrap) is not installed; install it (Debian/Ubuntu: apt-get install bubblewrap) "
                    + FIX_HINT)
        probe = [self._bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
                 "--unshare-uts", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--die-with-parent",
                 "--ro-bind", "/", "/", "--proc", "/proc", "--", "/bin/true"]
        try:
            done = subprocess.run(probe, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"bwrap could not run ({e}); reinstall bubblewrap " + FIX_HINT
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            return (f"bwrap cannot create namespaces here ({first}): user namespaces are disabled or restricted; "
                    "allow them (sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1, or "
                    "kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu 24.04) " + FIX_HINT)
        return None

    def describe_limits(self, limits: SandboxLimits) -> dict[str, str]:
        the_plan = cgroups.plan(limits)
        out = {}
        for key, controller, value in (("cpus", "cpu", limits.cpus), ("memory", "memory", limits.memory_bytes),
                                       ("pids", "pids", limits.pids)):
            if value is None:
                out[key] = "no limit"
                continue
            shown = f"{value >> 20} MiB" if key == "memory" else f"{value:g}"
            how = the_plan.enforced_by(controller) or self._fallback(key, value)
            out[key] = f"{shown} ({how})"
        return out

    def _fallback(self, key: str, value: float) -> str:
        """How a limit holds without a writable cgroup (sandbox_enter.py sets it)."""
        if key == "cpus":
            return "cpu affinity"
        if key == "pids":
            return ("rlimit (processes of the job's user)" if self._job_uid() != 0
                    else "not enforced (no writable cgroup)")
        tmpfs = (f"/tmp and /dev/shm {_tmpfs_size(int(value)) >> 20} MiB each" if self._has_option("--size")
                 else "/tmp and /dev/shm not capped: bwrap older than 0.8")
        # memfd_create and System V shared memory take RAM that no address space or file system counts
        return f"rlimit (address space, per process); {tmpfs}; memfd and SysV shm not bounded"

    def _job_uid(self) -> int:
        """The host uid job code runs as: run_as under a root site, else the site's own."""
        return self.worker_user[0] if self.worker_user is not None else os.getuid()

    # ---- start and kill ----------------------------------------------------------------------------

    async def start(self, launch: WorkerLaunch) -> WorkerProcess:
        if not self._bwrap:
            raise SandboxUnavailable(f"job code refused: {self.unavailable_reason()}")
        prefixes = await _interpreter_prefixes(launch.argv[0])
        # bwrap cannot disable user namespaces where the daemon maps them itself (--userns-block-fd); the
        # seccomp filter refuses them there (the module docstring)
        hardening = [] if self.worker_user is not None else await asyncio.to_thread(self._disable_userns_flags)
        limits = launch.limits
        groups = await asyncio.to_thread(
            lambda: cgroups.WorkerCgroups.create(cgroups.plan(limits), limits, secrets.token_hex(3)))
        enter: list[str] = []
        for procs in groups.procs_files:
            enter += ["--procs", str(procs)]
        enforced = groups.enforced()
        if limits.memory_bytes is not None and "memory" not in enforced:
            enter += ["--rlimit-as", str(limits.memory_bytes)]
        if limits.cpus is not None and "cpu" not in enforced:
            enter += ["--cpus", str(limits.cpus)]
        if limits.pids is not None and "pids" not in enforced and self._job_uid() != 0:
            # the job's user may run `pids` more threads than it runs now: a fork storm no longer takes the
            # user's whole process limit, which a site running job code as its own user needs to go on
            enter += ["--nproc", f"{self._job_uid()}:{limits.pids}"]
        tmpfs_bytes = self._tmpfs_bytes(limits, enforced)
        data_fds: list[int] = []
        mapping = _UserMap(self.worker_user, data_fds) if self.worker_user is not None else None
        proc = None
        try:
            argv = self._bwrap_argv(launch, prefixes, data_fds, hardening, mapping, tmpfs_bytes)
            if enter:
                # -S: no site module (it imports only the standard library), a third of its start-up
                argv = [sys.executable, "-I", "-S", str(ENTER_SCRIPT), *enter, "--", *argv]
            env = {**launch.env, "HOME": str(launch.cwd), "USER": "nobody", "LOGNAME": "nobody", "TMPDIR": "/tmp"}
            proc, log_file = await spawn_worker(argv, env, "/", launch.log_path, pass_fds=data_fds)
            for fd in data_fds:
                os.close(fd)
            data_fds.clear()
            if mapping is not None:
                await mapping.apply()
        except BaseException:
            if proc is not None:  # bwrap started, its namespace was never mapped: it must not go on
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                log_file.close()
            await asyncio.to_thread(groups.remove)
            raise
        finally:
            for fd in data_fds:
                os.close(fd)
            if mapping is not None:
                mapping.close()
        return _SandboxedProcess(proc, groups, log_file)

    def kill(self, proc: WorkerProcess) -> None:
        """SIGKILL bwrap: --die-with-parent kills the namespace's init, and the kernel then kills every
        process of the pid namespace. The cgroup members are killed too, where there is a cgroup."""
        if isinstance(proc, _SandboxedProcess):
            proc.groups.kill_all()
        if proc.returncode is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # ---- the bwrap command line --------------------------------------------------------------------

    def _bwrap_argv(self, launch: WorkerLaunch, prefixes: list[Path], data_fds: list[int],
                    hardening: list[str], mapping: _UserMap | None = None,
                    tmpfs_bytes: int | None = None) -> list[str]:
        args = [self._bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
                "--unshare-cgroup-try", *hardening]
        if mapping is None:  # bwrap maps its own uid (the daemon's, not root) to the sandbox's
            args += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
        else:  # the daemon maps the namespace; bwrap sets up as 0 and the job drops to 65534 (run_as outside)
            args += ["--uid", "0", "--gid", "0", "--userns-block-fd", str(mapping.block_fd), "--info-fd",
                     str(mapping.info_fd), "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        if (syscalls := seccomp_filter.program()) is not None:  # no other socket families, no user namespaces
            args += ["--seccomp", str(_data_fd(syscalls, data_fds))]
        args += ["--hostname", "fedkit-job", "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
        for name in TOP_LEVEL:
            top = Path("/") / name
            if top.is_symlink():
                args += ["--symlink", os.readlink(top), str(top)]
            elif top.is_dir():
                args += ["--ro-bind", str(top), str(top)]
        system = [Path("/etc") / name for name in (*ETC_FILES, "passwd", "group", "hosts")]
        args += _open_dirs(_dirs_above(system if launch.gpus else [*system, Path(CPU_INFO)]))
        for name in ETC_FILES:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        for dest, text in (("/etc/passwd", f"nobody:x:{SANDBOX_UID}:{SANDBOX_UID}:nobody:/nonexistent:/bin/false\n"),
                           ("/etc/group", f"nogroup:x:{SANDBOX_UID}:\n"),
                           ("/etc/hosts", "127.0.0.1 localhost fedkit-job\n::1 localhost\n")):
            args += ["--perms", "0644", "--ro-bind-data", str(_data_fd(text, data_fds)), dest]  # else 0600: root-only
        # modes given: where bwrap sets up as root inside (a root daemon's map), it made these 0755 and root's,
        # which the job's user could not write
        sized = ["--size", str(tmpfs_bytes)] if tmpfs_bytes is not None else []
        args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", *sized, "--tmpfs", "/tmp",
                 "--perms", "1777", *sized, "--tmpfs", "/dev/shm"]
        if launch.gpus:
            args += ["--ro-bind-try", "/sys", "/sys"]
            for dev in sorted(Path("/dev").glob("nvidia*")):
                args += ["--dev-bind-try", str(dev), str(dev)]
        else:
            args += ["--ro-bind-try", CPU_INFO, CPU_INFO]
        binds: list[tuple[str, Path]] = [("--ro-bind", p) for p in prefixes if not _under(p, Path("/usr"))]
        binds.append(("--ro-bind", launch.runtime_dir))
        binds += [("--ro-bind", p) for p in launch.read_only]
        binds += [("--bind", p) for p in launch.writable]
        # a data root, a venv or a system folder (/usr/local/...) that holds the kit would show its startup/
        # (the site's key) and workspace/: an empty tmpfs goes over the kit first, and only the binds inside
        # it (runtime/, the job's folders) on top
        kit = launch.runtime_dir.parent
        shown = [path for _, path in binds] + [Path("/usr")] + [Path("/") / name for name in TOP_LEVEL]
        if any(_under(kit, path) for path in shown):
            binds.append(("--tmpfs", kit))
        binds += [("--dir", up) for up in _dirs_above([path for _, path in binds])]
        # parents before children, so a bind inside another one lands on top of it
        for flag, path in sorted(binds, key=lambda b: (len(b[1].parts), {"--dir": 0, "--tmpfs": 2}.get(b[0], 1))):
            if flag == "--tmpfs":
                args += [flag, str(path)]
            elif flag == "--dir":
                args += _open_dirs([path])
            else:
                args += [flag, str(path), str(path)]
        # the sandbox's own root and /dev are tmpfs its user owns: writable, each could take half the host's
        # memory whatever the job's limit; nothing needs to write there once the mounts are made
        args += ["--remount-ro", "/", "--remount-ro", "/dev"]
        drop = [launch.argv[0], "-I", "-S", "-c", DROP_TO_JOB_USER] if mapping is not None else []
        args += ["--chdir", str(launch.cwd), "--", *drop, *launch.argv]
        return args


class _SandboxedProcess(LoggedProcess):
    """The bwrap process as the daemon sees it; once it has exited, the job's cgroups are emptied and removed."""

    def __init__(self, proc: asyncio.subprocess.Process, groups: cgroups.WorkerCgroups, log_file: CappedLog):
        super().__init__(proc, log_file)
        self.groups = groups
        self._cleaned = False
        self.memory_exhausted = False  # known once it has exited: killed for passing its memory limit

    async def wait(self) -> int:
        code = await super().wait()
        if not self._cleaned:
            self._cleaned = True
            self.memory_exhausted = await asyncio.to_thread(self.groups.memory_exhausted)
            await asyncio.to_thread(self.groups.remove)
        return code


class _UserMap:
    """The user namespace map a root daemon writes for bwrap (--userns-block-fd): bwrap reports its child's
    pid on the info pipe and waits on the block pipe until the child's uid_map and gid_map are written.
    Inside 0 -> outside 0 is bwrap's own setup (it makes the sandbox's root file system); inside 65534 ->
    the run_as user is the job."""

    def __init__(self, user: tuple[int, int], pass_fds: list[int]):
        self._user = user
        self.block_fd, self._block_w = os.pipe()
        self._info_r, self.info_fd = os.pipe()
        pass_fds += [self.block_fd, self.info_fd]  # closed in the daemon once bwrap has them
        self._own = [self._block_w, self._info_r]

    async def apply(self) -> None:
        try:
            info = await asyncio.wait_for(asyncio.to_thread(self._read_info), MAP_TIMEOUT_S)
        except TimeoutError:
            raise SandboxUnavailable(f"job code refused: bwrap did not report its sandbox within {MAP_TIMEOUT_S:g} s "
                                     "(the machine is overloaded?)") from None
        try:
            pid = int(json.loads(info)["child-pid"])
        except (ValueError, KeyError, TypeError):
            raise SandboxUnavailable("job code refused: bwrap did not report its sandbox (no child-pid on "
                                     "--info-fd); check the bubblewrap install " + FIX_HINT) from None
        uid, gid = self._user
        try:
            Path(f"/proc/{pid}/uid_map").write_text(f"0 0 1\n{SANDBOX_UID} {uid} 1\n")
            Path(f"/proc/{pid}/gid_map").write_text(f"0 0 1\n{SANDBOX_UID} {gid} 1\n")
        except OSError as e:
            raise SandboxUnavailable(f"job code refused: cannot map the sandbox's user to {uid}:{gid} "
                                     f"({e.strerror}); check local/site.yml sandbox.run_as") from None
        os.write(self._block_w, b"1")

    def _read_info(self) -> bytes:
        """bwrap's JSON, up to its end (the pipe closes when bwrap execs, or dies)."""
        data = b""
        while chunk := os.read(self._info_r, 4096):
            data += chunk
            if data.rstrip().endswith(b"}"):
                break
        return data

    def close(self) -> None:
        for fd in self._own:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._own.clear()


def _data_fd(data: str | bytes, keep: list[int]) -> int:
    """A pipe already holding `data` (small, so it never blocks), for bwrap's --ro-bind-data or --seccomp."""
    read_fd, write_fd = os.pipe()
    keep.append(read_fd)
    with os.fdopen(write_fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return read_fd


def _dirs_above(dests: list[Path]) -> set[Path]:
    """The folders bwrap would make above these mount points (not "/", nor inside the bound /usr)."""
    return {up for d in dests for up in d.parents if up != Path("/") and not _under(up, Path("/usr"))} - set(dests)


def _open_dirs(dirs: set[Path] | list[Path]) -> list[str]:
    """Make `dirs` 0755, parents first, before bwrap makes them as the host has them (/root, a workspace:
    0700) or 0700 (/etc, /sys): a job whose user is not root inside (a root daemon's map) could not pass
    through them. They are empty folders of the sandbox's own root."""
    args: list[str] = []
    for up in sorted(dirs, key=lambda p: len(p.parts)):
        args += ["--perms", "0755", "--dir", str(up)]
    return args


def _under(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


# (python, its file's identity) -> its prefixes. A probe is an interpreter start: ~30 ms of CPU on every job's
# worker start, which 100 sites on one machine pay 100 times. Asked again when the interpreter's file changes
# or goes (a venv rebuilt or removed), so a broken one is still named as such; a failed probe is not kept.
# The daemon's own interpreter (the default worker python) is not asked: the daemon knows its prefixes
# (measured: 55 ms of CPU off each site's first job when 16 sites start one at once).
_PREFIXES: dict[tuple[str, tuple[int, int, int]], tuple[Path, ...]] = {}


async def _interpreter_prefixes(python: str) -> list[Path]:
    """The folders the worker's interpreter lives in (venv and base install), asked of that interpreter."""
    try:
        st = os.stat(python)
        key = (python, (st.st_dev, st.st_ino, st.st_mtime_ns))
    except OSError:
        return await _ask_prefixes(python)  # says why it does not run
    if key not in _PREFIXES:
        own = python == sys.executable and "PYTHONHOME" not in os.environ  # a probe's -I would ignore it
        _PREFIXES[key] = tuple(_prefixes_of(python, [sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                     sys.base_exec_prefix]) if own else await _ask_prefixes(python))
    return list(_PREFIXES[key])


async def _ask_prefixes(python: str) -> list[Path]:
    proc = await asyncio.create_subprocess_exec(
        python, "-I", "-c", _PREFIX_PROBE, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise SandboxUnavailable(f"job code refused: the worker interpreter {python} did not answer within "
                                 f"{PROBE_TIMEOUT_S:g} s; check local/site.yml python") from None
    if proc.returncode != 0:
        raise SandboxUnavailable(f"job code refused: the worker interpreter {python} does not run "
                                 f"({err.decode(errors='replace').strip()[:200]}); check local/site.yml python")
    return _prefixes_of(python, json.loads(out))


def _prefixes_of(python: str, prefixes: list[str]) -> list[Path]:
    """The interpreter's sys prefixes and the folders of its file (and of the file it links to)."""
    found: list[Path] = []
    # as the interpreter names them (a venv is found through its own path, so not resolved)
    for text in prefixes:
        path = Path(text)
        if path.is_absolute() and path not in found and path != Path("/"):
            found.append(path)
    for exe in (Path(python), Path(python).resolve()):  # the interpreter and the file it links to
        if not any(_under(exe.parent, p) for p in found):
            found.append(exe.parent)
    return found


__all__ = ["NativeSandbox", "limits_of"]
