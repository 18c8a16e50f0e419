"""A whole study on one machine: provision a project, unzip every kit as site IT would, point each site
at its data, and start or stop participants through their own kit scripts. Used by `fedkit demo`, the
end-to-end tests and the benchmarks, so all three exercise exactly what a hospital runs.

Processes are started in their own session and stopped by PID (SIGTERM, then SIGKILL of that process
group after a grace period), never by name.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runtime.client.worker_threads import granted_cores
from runtime.identity import Kind
from runtime.kitsig import CA_PIN_PATH

from .pipeline import provision
from .project import parse_project

STOP_GRACE_S = 15.0
PR_SET_PDEATHSIG = 1


def cores_per_site(n_sites: int) -> int:
    """The cores each of `n_sites` sites' workers gets when they share this machine (at least one)."""
    return max(1, granted_cores() // max(1, n_sites))


def free_port(rng: random.Random | None = None) -> int:
    """A port free on 127.0.0.1 now, chosen *outside* the kernel's ephemeral range: a port picked here is
    bound later by another process, and in between an outgoing connection (which takes ephemeral ports)
    could otherwise grab it. Collisions with another caller are left to the bind check below."""
    rng = rng or random.SystemRandom()
    low, high = _ephemeral_range()
    first, last = (10_000, low - 1) if low > 11_000 else (high + 1, 65535)
    for _ in range(200):
        port = rng.randint(first, last)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port on 127.0.0.1 outside the ephemeral range")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started it dies, so a study started by
    a test run or the demo never outlives it, even when that run is killed outright (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    """Poll `predicate` until it is true; raise TimeoutError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def _unzip_preserving_modes(zip_path: Path, dest: Path) -> None:
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            target = zf.extract(info, dest)
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                os.chmod(target, mode)


@dataclass
class LocalStudy:
    root: Path
    project_name: str
    server: str
    clients: list[str]
    admins: list[str]
    kits: dict[str, Path]
    fed_learn_port: int
    admin_port: int
    python: str = sys.executable
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    def create(
        cls, project_yml: Path, root: Path, *, free_ports: bool = True, edit: Any = None, python: str = sys.executable
    ) -> LocalStudy:
        """Provision `project_yml` under `root/workspace` and unzip each kit into `root/kits/<name>`.

        With `free_ports`, the server's two ports are replaced by free ones (so studies never collide);
        `edit(data)` may change the parsed project.yml before provisioning (tests use it)."""
        data = yaml.safe_load(project_yml.read_text())
        server_entry = next(p for p in data["participants"] if p.get("type") == "server")
        if free_ports:
            fed_learn = free_port()
            admin = free_port()
            while admin == fed_learn:  # two draws may meet (about once in 23,000)
                admin = free_port()
            server_entry["fed_learn_port"], server_entry["admin_port"] = fed_learn, admin
        if edit is not None:
            edit(data)
        root.mkdir(parents=True, exist_ok=True)
        (root / "project.yml").write_text(yaml.safe_dump(data, sort_keys=False))
        project = parse_project((root / "project.yml").read_text(), str(root / "project.yml"))
        result = provision(project, root / "workspace", dt.datetime.now(dt.UTC))
        kits_dir = root / "kits"
        kits: dict[str, Path] = {}
        for kit in result.kits:
            _unzip_preserving_modes(kit.zip_path, kits_dir)
            kits[kit.name] = kits_dir / kit.name
            # site IT pins the study CA lead IT told them before the first start (the readme's advice)
            (kits[kit.name] / CA_PIN_PATH).parent.mkdir(exist_ok=True)
            (kits[kit.name] / CA_PIN_PATH).write_text(result.ca_fingerprint + "\n")
        by_kind = {k: [kit.name for kit in result.kits if kit.kind is k] for k in Kind}
        return cls(
            root=root,
            project_name=project.name,
            server=by_kind[Kind.SERVER][0],
            clients=by_kind[Kind.CLIENT],
            admins=by_kind[Kind.ADMIN],
            kits=kits,
            fed_learn_port=int(server_entry["fed_learn_port"]),
            admin_port=int(server_entry["admin_port"]),
            python=python,
        )

    # ---- site IT's edits to local/ ---------------------------------------------------------------

    def write_local(self, name: str, file: str, settings: dict[str, Any]) -> None:
        (self.kits[name] / "local" / file).write_text(yaml.safe_dump(settings))

    def update_local(self, name: str, file: str, changes: dict[str, Any]) -> None:
        """Set top-level keys of a participant's local/FILE, keeping the others."""
        path = self.kits[name] / "local" / file
        current = yaml.safe_load(path.read_text()) if path.exists() else {}
        self.write_local(name, file, {**(current or {}), **changes})

    # ---- processes -------------------------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        (self.root / "logs").mkdir(exist_ok=True)
        return self.root / "logs" / f"{name}.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        env["FEDKIT_PYTHON"] = self.python
        return env

    def start(self, name: str) -> subprocess.Popen:
        """Run the participant's own `startup/start.sh` in the background, logging to root/logs/NAME.log."""
        with self.log_path(name).open("ab") as log:
            proc = subprocess.Popen(
                ["bash", str(self.kits[name] / "startup" / "start.sh")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.procs[name] = proc
        return proc

    def start_server(self, timeout_s: float = 60.0) -> subprocess.Popen:
        proc = self.start(self.server)
        wait_until(
            lambda: proc.poll() is not None or _listening(self.fed_learn_port) and _listening(self.admin_port),
            timeout_s,
            "the server to listen",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}: {self.log_tail(self.server)}")
        return proc

    def online_sites(self) -> list[str]:
        """The sites the server counts online now (check_status through the first admin's console)."""
        return sorted(s["site"] for s in self.admin_json("check_status client")["sites"] if s["online"])

    def start_sites(self, sites: list[str] | None = None, timeout_s: float = 60.0) -> None:
        """Start `sites` (default: every client) and wait until the server counts each of them online."""
        sites = sorted(sites if sites is not None else self.clients)
        for site in sites:
            self.start(site)
        wait_until(lambda: set(sites) <= set(self.online_sites()), timeout_s, f"{', '.join(sites)} online")

    def stop(self, name: str, grace_s: float = STOP_GRACE_S) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group we created: the daemon and its worker
            return proc.wait(grace_s)

    def kill(self, name: str) -> None:
        """Simulate a crash: SIGKILL the participant and everything it started."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_GRACE_S)

    def stop_all(self) -> None:
        for name in [n for n in self.procs if n != self.server]:
            self.stop(name)
        if self.server in self.procs:
            self.stop(self.server)

    def log_tail(self, name: str, n_bytes: int = 4000) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace")[-n_bytes:] if path.exists() else ""

    # ---- the admin console, one-shot ---------------------------------------------------------------

    def admin(
        self, command: str, admin: str | None = None, timeout_s: float = 300.0, as_json: bool = True
    ) -> subprocess.CompletedProcess:
        """Run `fl_admin.sh -c COMMAND` from an admin kit (the first admin by default)."""
        kit = self.kits[admin or self.admins[0]]
        args = ["bash", str(kit / "startup" / "fl_admin.sh"), "-c", command] + (["--json"] if as_json else [])
        return subprocess.run(
            args, capture_output=True, text=True, env=self.env(), timeout=timeout_s, stdin=subprocess.DEVNULL
        )

    def admin_live(self, command: str, admin: str | None = None, timeout_s: float = 600.0) -> int:
        """Run `fl_admin.sh -c COMMAND` with its output going straight to this terminal; its exit code."""
        kit = self.kits[admin or self.admins[0]]
        args = ["bash", str(kit / "startup" / "fl_admin.sh"), "-c", command]
        return subprocess.run(args, env=self.env(), timeout=timeout_s, stdin=subprocess.DEVNULL).returncode

    def admin_json(self, command: str, admin: str | None = None, timeout_s: float = 300.0) -> Any:
        done = self.admin(command, admin, timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"'{command}' failed ({done.returncode}): {done.stderr.strip()}")
        return json.loads(done.stdout)


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
