"""What every long-running fedkit process does the same way: log to its kit's workspace, write its
pid file (stop.sh reads it), and turn SIGTERM/SIGINT into a clean, awaited shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

WORKSPACE = "workspace"
PID_FILE = "daemon.pid"
LOG_FILE = "log.txt"


def workspace(kit: Path) -> Path:
    ws = kit / WORKSPACE
    ws.mkdir(parents=True, exist_ok=True)
    return ws


def setup_logging(log_path: Path, debug: bool = False) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for handler in (logging.FileHandler(log_path), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        root.addHandler(handler)


def write_pid(ws: Path) -> Path:
    path = ws / PID_FILE
    path.write_text(f"{os.getpid()}\n")
    return path


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so the main coroutine can shut down in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
