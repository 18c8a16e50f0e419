"""A private Docker engine for the `docker` tests, with everything slow cached between runs.

No image registry is reachable from CI, so nothing is pulled: the base image is a Debian bookworm root file
system made by debootstrap (Python 3.11, like the host) and imported, and pip installs from a folder of
wheels downloaded on the host. The engine's data root lives under the cache folder (FEDKIT_DOCKER_CACHE,
default /var/cache/fedkit-docker), so a warm run reuses the base image and the built layers. The engine
is started once per test session with host networking only (no bridge, no iptables) and stopped by PID.

Also runnable by hand to get the same engine for poking around (stop it with Ctrl-C):
    python -m tests.docker_support
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from provision.local_study import wait_until

CACHE = Path(os.environ.get("FEDKIT_DOCKER_CACHE", "/var/cache/fedkit-docker"))
BASE_IMAGE = "fedkit-test-base:bookworm"
DEBIAN_MIRROR = os.environ.get("FEDKIT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
ENGINE_START_TIMEOUT_S = 120.0
ENGINE_STOP_GRACE_S = 30.0
# Test containers carry this label, so whatever a failed test left behind is removed at the end.
TEST_LABEL = "org.fedkit.test"


class DockerUnavailable(RuntimeError):
    """This machine cannot run the private engine (a tool is missing, or we are not root)."""


def missing_tools() -> str | None:
    """One line naming what the docker tests need and this machine lacks, or None."""
    if os.geteuid() != 0:
        return "the docker tests start their own dockerd and need root"
    missing = [t for t in ("dockerd", "docker", "debootstrap") if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)}: apt-get install docker.io debootstrap (see .ci/run)"
    return None


@dataclass
class Engine:
    """A dockerd of our own: its socket, its process (None: one started by hand, left running) and log."""

    proc: subprocess.Popen | None
    socket: Path
    log: Path

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def env(self) -> dict[str, str]:
        """os.environ pointed at this engine (for docker, docker.sh and the SDK)."""
        return {**os.environ, "DOCKER_HOST": self.host}

    def docker(self, *args: str, timeout_s: float = 600.0, check: bool = True,
               input_bytes: bytes | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(["docker", *args], env=self.env(), capture_output=True, timeout=timeout_s,
                              input=input_bytes)
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed: {done.stderr.decode(errors='replace')[-2000:]}")
        return done

    def ping(self) -> bool:
        alive = self.proc is None or self.proc.poll() is None
        return alive and self.docker("info", timeout_s=30, check=False).returncode == 0

    def stop(self) -> None:
        """SIGTERM dockerd (it stops its containers and its containerd), SIGKILL after a grace period."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(ENGINE_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(ENGINE_STOP_GRACE_S)


def start_engine(cache: Path = CACHE) -> Engine:
    """Start dockerd with its data under `cache` and its socket and state under `cache/run`."""
    run = cache / "run"
    run.mkdir(parents=True, exist_ok=True)
    pidfile = run / "dockerd.pid"
    _refuse_running_engine(pidfile)
    socket = run / "docker.sock"
    log = cache / "dockerd.log"
    cmd = ["dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false",
           "--data-root", str(cache / "data"), "--exec-root", str(run / "exec"),
           "--host", f"unix://{socket}", "--pidfile", str(pidfile)]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    engine = Engine(proc=proc, socket=socket, log=log)
    try:
        wait_until(engine.ping, ENGINE_START_TIMEOUT_S, "the private dockerd to answer", interval_s=0.5)
    except TimeoutError:
        engine.stop()
        tail = log.read_text(errors="replace")[-2000:]
        raise DockerUnavailable(f"dockerd did not come up; the end of {log}:\n{tail}") from None
    return engine


def _refuse_running_engine(pidfile: Path) -> None:
    """A live dockerd from an earlier run still owns this data root: say so rather than fight over it."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        pidfile.unlink(missing_ok=True)
        return
    if comm == "dockerd":
        raise DockerUnavailable(f"a dockerd (pid {pid}) already runs on {pidfile.parent}; stop it: kill {pid}")
    pidfile.unlink(missing_ok=True)


def ensure_base_image(engine: Engine, cache: Path = CACHE) -> str:
    """BASE_IMAGE in the engine: a debootstrapped bookworm (python3, venv, CA certificates), made once."""
    if engine.docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    rootfs = cache / "rootfs"
    if not (rootfs / "usr" / "bin" / "python3").exists():
        partial = cache / "rootfs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                        "bookworm", str(partial), DEBIAN_MIRROR], check=True, capture_output=True, timeout=1200)
        shutil.rmtree(rootfs, ignore_errors=True)
        partial.rename(rootfs)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    done = subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=engine.env(),
                          capture_output=True, timeout=600)
    assert tar.stdout is not None
    tar.stdout.close()
    tar.wait()
    if done.returncode != 0:
        raise RuntimeError(f"docker import failed: {done.stderr.decode(errors='replace')}")
    return BASE_IMAGE


def ensure_wheels(*requirements: Path, cache: Path = CACHE) -> Path:
    """A folder with a wheel for every pinned requirement of every given file (kits of each kind pin
    different packages) and their dependencies, for offline builds.

    Tried offline first, from the folder itself; only what is missing is downloaded (with this venv's pip,
    which reaches the local torch CPU wheel)."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-d", str(wheels),
           *(arg for path in requirements for arg in ("-r", str(path)))]
    if subprocess.run([*pip, "--no-index", "--find-links", str(wheels)], capture_output=True).returncode == 0:
        return wheels
    done = subprocess.run(pip, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"pip download failed: {done.stderr[-2000:]}")
    return wheels


def remove_test_containers(engine: Engine) -> None:
    """Remove every container the tests or the sites under test started (by label), running or not."""
    for label in (TEST_LABEL, "org.fedkit.participant", "org.fedkit.job"):
        ids = engine.docker("ps", "-aq", "--filter", f"label={label}", check=False).stdout.decode().split()
        if ids:
            engine.docker("rm", "-f", *ids, check=False)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    """The private engine with the base image in it, for the whole session; stopped by PID at the end.

    FEDKIT_TEST_DOCKER_HOST=unix://PATH uses an engine already running (say `python -m tests.docker_support`)
    and leaves it running."""
    given = os.environ.get("FEDKIT_TEST_DOCKER_HOST", "")
    if given:
        engine = Engine(proc=None, socket=Path(given.removeprefix("unix://")), log=CACHE / "dockerd.log")
    else:
        reason = missing_tools()
        if reason:
            pytest.fail(f"docker tests: {reason}; or deselect them with -m 'not docker'")
        engine = start_engine()
    try:
        ensure_base_image(engine)
        yield engine
    finally:
        remove_test_containers(engine)
        engine.stop()


def main() -> int:
    reason = missing_tools()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops dockerd too, like Ctrl-C
    engine = start_engine()
    t0 = time.monotonic()
    print(f"base image {ensure_base_image(engine)} ready in {time.monotonic() - t0:.1f} s")
    assert engine.proc is not None
    print(f"export DOCKER_HOST={engine.host}   # Ctrl-C stops dockerd (pid {engine.proc.pid})")
    try:
        engine.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
