"""DockerSandbox over a real engine: what a hostile job worker in its container can and cannot do."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import docker
import pytest

from provision.local_study import wait_until
from runtime.client.sandbox import SandboxLimits, WorkerLaunch
from runtime.client.sandbox_docker import LABEL_JOB, DockerSandbox
from runtime.kit_config import SandboxSettings
from tests.docker_support import BASE_IMAGE

# a cold run builds the images (torch from wheels) and may debootstrap the base image first
pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]

# Tries each thing a hostile job would, reports the outcomes as one JSON line, then echoes stdin lines
# back until "exit N" (exits with N) or stdin ends; it writes one line to stderr for the log check.
HOSTILE = r'''
import json, os, socket, sys
key, port, code_dir, runtime_dir, scratch = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "done"
    except OSError as e:
        out[name] = type(e).__name__
attempt("read_key", lambda: open(key).read())
attempt("connect_host", lambda: socket.create_connection(("127.0.0.1", port), timeout=3).close())
attempt("write_code", lambda: open(os.path.join(code_dir, "planted.py"), "w").write("x"))
attempt("write_runtime", lambda: open(os.path.join(runtime_dir, "planted.py"), "w").write("x"))
attempt("write_scratch", lambda: open(os.path.join(scratch, "result.txt"), "w").write("ok"))
def loopback():
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
    socket.create_connection(srv.getsockname(), timeout=3).close(); srv.close()
attempt("loopback_inside", loopback)
out["uid"] = os.getuid()
print(json.dumps(out), flush=True)
print("hostile worker stderr line", file=sys.stderr, flush=True)
for line in sys.stdin:
    if line.startswith("exit "):
        sys.exit(int(line.split()[1]))
    print("echo " + line.strip(), flush=True)
'''


def _layout(tmp_path: Path) -> dict[str, Path]:
    kit = tmp_path / "kit"
    paths = {"kit": kit, "runtime": kit / "runtime", "startup": kit / "startup", "code": tmp_path / "job" / "code",
             "data": tmp_path / "data", "scratch": tmp_path / "job" / "scratch"}
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    (paths["startup"] / "client.key").write_text("-----BEGIN PRIVATE KEY----- secret")
    (paths["code"] / "hostile.py").write_text(HOSTILE)
    paths["scratch"].chmod(0o777)  # the worker runs as nobody when the test (the daemon) runs as root
    return paths


def _launch(paths: dict[str, Path], port: int, tmp_path: Path) -> WorkerLaunch:
    argv = ("python3", str(paths["code"] / "hostile.py"), str(paths["startup"] / "client.key"), str(port),
            str(paths["code"]), str(paths["runtime"]), str(paths["scratch"]))
    return WorkerLaunch(argv=argv, env={"PYTHONUNBUFFERED": "1"}, runtime_dir=paths["runtime"],
                        read_only=(paths["code"], paths["data"]), writable=(paths["scratch"],), gpus=(),
                        limits=SandboxLimits(cpus=1.0, memory_bytes=512 << 20, pids=256),
                        log_path=tmp_path / "worker.log", cwd=paths["scratch"])


def _containers(engine_env: dict[str, str], container_id: str) -> list:
    client = docker.DockerClient(base_url=engine_env["DOCKER_HOST"])
    try:
        return client.api.containers(all=True, filters={"id": container_id})
    finally:
        client.close()


def test_hostile_worker_is_confined_and_kill_removes_its_container(docker_engine, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    paths = _layout(tmp_path)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    sandbox = DockerSandbox(SandboxSettings(image=BASE_IMAGE))
    assert sandbox.unavailable_reason() is None

    async def scenario() -> tuple[dict, bytes, dict, int, str]:
        proc = await sandbox.start(_launch(paths, port, tmp_path))
        report = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
        proc.stdin.write(b"hello\n")
        await proc.stdin.drain()
        echoed = await asyncio.wait_for(proc.stdout.readline(), 30)
        inspected = docker_engine_inspect(proc.container_id)
        assert proc.returncode is None
        sandbox.kill(proc)
        code = await asyncio.wait_for(proc.wait(), 60)
        return report, echoed, inspected, code, proc.container_id

    def docker_engine_inspect(container_id: str) -> dict:
        return json.loads(docker_engine.docker("inspect", container_id).stdout)[0]

    report, echoed, inspected, code, container_id = asyncio.run(scenario())
    assert report["read_key"] == "FileNotFoundError"       # the kit's startup/ is not there at all
    assert report["connect_host"] != "done"                # no network: the host's 127.0.0.1 is out of reach
    assert report["write_code"] == "OSError"               # read-only bind (EROFS)
    assert report["write_runtime"] == "OSError"
    assert report["write_scratch"] == "done"
    assert report["loopback_inside"] == "done"             # torchrun ranks can still meet
    assert report["uid"] != 0
    assert (paths["scratch"] / "result.txt").read_text() == "ok"
    assert not (paths["code"] / "planted.py").exists() and not (paths["runtime"] / "planted.py").exists()
    with pytest.raises(BlockingIOError):
        listener.accept()                                  # nothing ever reached the listener
    listener.close()
    assert echoed == b"echo hello\n"
    assert "hostile worker stderr line" in (tmp_path / "worker.log").read_text()
    host = inspected["HostConfig"]
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] and host["AutoRemove"]
    assert host["Memory"] == 512 << 20 and host["NanoCpus"] == 10**9 and host["PidsLimit"] == 256
    assert inspected["Config"]["Labels"][LABEL_JOB] == "worker"
    assert code != 0
    wait_until(lambda: not _containers({"DOCKER_HOST": docker_engine.host}, container_id), 30,
               "the killed worker's container to be removed")


def test_worker_exit_status_stdin_eof_and_auto_remove(docker_engine, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    paths = _layout(tmp_path)
    sandbox = DockerSandbox(SandboxSettings(image=BASE_IMAGE))

    async def scenario() -> tuple[int, bytes, str]:
        proc = await sandbox.start(_launch(paths, 9, tmp_path))
        await asyncio.wait_for(proc.stdout.readline(), 60)
        proc.stdin.write(b"exit 3\n")
        await proc.stdin.drain()
        code = await asyncio.wait_for(proc.wait(), 60)
        rest = await asyncio.wait_for(proc.stdout.readline(), 10)
        return code, rest, proc.container_id

    code, rest, container_id = asyncio.run(scenario())
    assert code == 3 and rest == b""
    wait_until(lambda: not _containers({"DOCKER_HOST": docker_engine.host}, container_id), 30,
               "the exited worker's container to be removed")

    async def closing_stdin() -> int:
        proc = await sandbox.start(_launch(paths, 9, tmp_path))
        await asyncio.wait_for(proc.stdout.readline(), 60)
        proc.stdin.close()  # as WorkerHandle.stop does: the worker reads EOF and ends by itself
        return await asyncio.wait_for(proc.wait(), 60)

    assert asyncio.run(closing_stdin()) == 0


def test_unreachable_engine_is_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no.sock")
    reason = DockerSandbox(SandboxSettings(image="fedkit-anything")).unavailable_reason()
    assert reason is not None and "cannot reach the Docker engine" in reason and "\n" not in reason
    monkeypatch.delenv("FEDKIT_IMAGE", raising=False)
    assert "FEDKIT_IMAGE" in (DockerSandbox(SandboxSettings()).unavailable_reason() or "")
