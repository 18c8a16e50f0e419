"""What every long-running fedkit process does the same way: keep what it writes private (umask 077,
workspace 0700), log to its kit's workspace, write its pid file (stop.sh reads it), and turn
SIGTERM/SIGINT into a clean, awaited shutdown."""

from __future__ import annotations

import ctypes
import fcntl
import logging
import logging.handlers
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError
from .plain_text import shown

if TYPE_CHECKING:
    import asyncio

WORKSPACE = "workspace"
PID_FILE = "daemon.pid"
LOCK_FILE = "daemon.lock"
LOG_FILE = "log.txt"
LOG_MAX_BYTES = 64 << 20
LOG_BACKUPS = 4
PR_SET_PDEATHSIG = 1
# Models, logs, audit trails and job folders hold a study's results and a site's file names: owner only.
PRIVATE_UMASK = 0o077
PRIVATE_DIR_MODE = 0o700


def private_umask() -> None:
    """Make every file and folder this process (and its children) creates owner-only (0600 / 0700).

    Called first thing by each runtime entry point, so no later `open` or `mkdir` has to remember a mode.
    """
    os.umask(PRIVATE_UMASK)


def workspace(kit: Path) -> Path:
    """The kit's workspace/, created 0700; one left group- or world-readable by an older run is tightened."""
    ws = kit / WORKSPACE
    ws.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    if ws.stat().st_mode & 0o077:
        ws.chmod(PRIVATE_DIR_MODE)
    return ws


# `log.error(..., extra=FILE_ONLY)`: a line for the workspace log only, not stderr, for a message the process
# prints to stderr itself in its own words (a start that fails: one line there, as the CLI promises)
FILE_ONLY = {"file_only": True}


def log_files(log_path: Path) -> list[Path]:
    """The log and its rotated predecessors that exist, oldest first (log.txt.4 .. log.txt.1, log.txt)."""
    rotated = [log_path.with_name(f"{log_path.name}.{i}") for i in range(LOG_BACKUPS, 0, -1)]
    return [p for p in (*rotated, log_path) if p.exists()]


def log_tail_bytes(log_path: Path, max_bytes: int) -> tuple[bytes, bool]:
    """The last `max_bytes` of the log, reaching into the rotated files when the log has just turned, and
    whether older lines were left out (the first line returned is then cut)."""
    data = b""
    for part in reversed(log_files(log_path)):
        room = max_bytes - len(data)
        with part.open("rb") as f:
            f.seek(max(0, part.stat().st_size - room))
            data = f.read(room) + data
        if len(data) >= max_bytes:
            return data, True
    return data, False


class LineSafeFormatter(logging.Formatter):
    """Log lines no message can forge: what a message carries from elsewhere (a failure reason a site or a
    job's tensor names shaped, a label a job chose) may hold a newline followed by a line of its own, say a
    fake `audit log ...: N records, head HASH` anchor. Control and format characters are escaped (\\x1b),
    and a message's further lines (a traceback, a task dump) are indented, so only fedkit starts a line."""

    def format(self, record: logging.LogRecord) -> str:
        return shown(super().format(record), keep="\n\t").replace("\n", "\n    ")


def setup_logging(log_path: Path, debug: bool = False) -> None:
    fmt = LineSafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.addFilter(lambda record: not getattr(record, "file_only", False))
    # rotated: a site or server runs for months (log.txt.1 .. .4 keep the older lines; the audit log is not
    # rotated, its hash chain spans the file)
    rotating = logging.handlers.RotatingFileHandler(log_path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS)
    for handler in (rotating, stderr):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def hold_workspace(ws: Path, who: str) -> int:
    """Lock the kit's workspace for this process's life, so a second start of the same kit stops here with
    one line instead of running beside the first (two servers answering on one port and rewriting one job
    store, two sites throwing each other off the server, two writers tearing one audit chain). An exclusive
    flock on workspace/daemon.lock: the kernel releases it when the process ends, however it ends, and an
    exec (a restart through start.sh) too, since the descriptor is close-on-exec. Returns the descriptor,
    which must stay open. Raises ConfigError naming the running process."""
    fd = os.open(ws / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        try:
            pid = (ws / PID_FILE).read_text().strip() or "?"
        except OSError:
            pid = "?"
        raise ConfigError(f"{who} is already running from this kit (pid {pid}, {ws / PID_FILE}); stop it with "
                          "startup/stop.sh before starting it again") from None
    return fd


def write_pid(ws: Path) -> Path:
    path = ws / PID_FILE
    path.write_text(f"{os.getpid()}\n")
    return path


def remove_pid(ws: Path) -> None:
    """Remove the pid file if it still names this process (stop.sh must find the one that runs)."""
    path = ws / PID_FILE
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the one that started it dies: a training worker (which may
    hold GPUs) never outlives a site daemon killed outright, whatever sandbox it runs in. No-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so the main coroutine can shut down in order."""
    import asyncio  # here, not at the top: the training worker imports this module and runs no event loop

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, log_task_stacks)
    return stop


def log_task_stacks() -> None:
    """SIGUSR1: write where every asyncio task of this process is waiting into its log, for a process that
    looks stuck (`kill -USR1 PID`, then read the log); py-spy shows threads, not coroutines."""
    import asyncio

    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    lines = [f"SIGUSR1: {len(tasks)} asyncio tasks"]
    for task in tasks:
        lines.append(f"task {task.get_name()}:")
        lines += [f"    {where}" for where in _awaiting(task.get_coro())]
    logging.getLogger("fedkit.tasks").warning("%s", "\n".join(lines))


def _awaiting(coro: object) -> list[str]:
    """The chain of coroutines (and async generators) `coro` is suspended in, outermost first, ending
    with what the innermost awaits. A task's own get_stack() shows only the outermost frame."""
    chain: list[str] = []
    while coro is not None and len(chain) < 64:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            chain.append(repr(coro)[:200])
            break
        chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        coro = (getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
                or getattr(coro, "ag_await", None))
    return chain
