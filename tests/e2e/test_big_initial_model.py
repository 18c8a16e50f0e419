"""A job whose initial model is 1 GiB (four times the job-archive cap) is submitted with
`submit_job FOLDER --initial-model FILE` over the real admin console and server (mutual TLS on
127.0.0.1): the server streams it to disk beside the archive, checks it, stores it as the job's
models/initial.safetensors byte for byte, and its peak memory stays far below the model's size. A model
whose bytes change on the way, or that is not what it claims, is refused with one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from provision.local_study import LocalStudy, wait_until

MODEL_BYTES = 1 << 30
PEAK_GROWTH_LIMIT_BYTES = 256 << 20  # the model is 1024 MiB; a server that held it would grow by that much


def _sparse_model(path: Path, n_bytes: int = MODEL_BYTES) -> Path:
    """A valid safetensors file of one float32 tensor of zeros, `n_bytes` of data, sparse on disk."""
    header = json.dumps({"big": {"dtype": "F32", "shape": [n_bytes // 4], "data_offsets": [0, n_bytes]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + n_bytes)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(16 << 20):
            digest.update(piece)
    return digest.hexdigest()


def _server_pid(study: LocalStudy) -> int:
    """The server's Python process: the kit's start script may run it as a child."""
    pid = study.procs[study.server].pid
    for _ in range(3):
        if b"runtime.server" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not children:
            break
        pid = int(children[0])
    pytest.fail(f"no server process under {study.procs[study.server].pid}")


def _memory_kib(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def test_a_1_gib_initial_model_is_streamed_to_the_job_without_the_server_holding_it(make_study, tmp_path):
    handle = make_study(sites=["site-1"])
    study = handle.study
    study.start_server()  # no site: the job stays queued, so only the upload and storage path runs
    job = handle.job(tmp_path / "job")
    server = _server_pid(study)
    study.admin_json("list_jobs")  # the admin port has served a call: the server is warm
    before = _memory_kib(server)

    model = _sparse_model(tmp_path / "big.safetensors")
    record = study.admin_json(f"submit_job {job} --initial-model {model} --set meta.min_clients=1",
                              timeout_s=600)
    after = _memory_kib(server)

    stored = study.kits[study.server] / "workspace" / "jobs" / record["job_id"] / "models" / "initial.safetensors"
    wait_until(stored.exists, 30, "the stored initial model")
    assert stored.stat().st_size == model.stat().st_size
    assert _sha256(stored) == _sha256(model)
    growth_kib = after["VmHWM"] - before["VmRSS"]
    print(f"server RSS before {before['VmRSS'] // 1024} MiB, peak after a 1 GiB upload {after['VmHWM'] // 1024} MiB")
    assert growth_kib * 1024 < PEAK_GROWTH_LIMIT_BYTES, f"server peak grew by {growth_kib // 1024} MiB"
    assert not list((study.kits[study.server] / "workspace" / "jobs" / ".incoming").iterdir())

    submitted = [e for e in _audit(study) if e.get("event") == "admin_command" and e.get("command") == "submit_job"]
    assert any(e.get("args", {}).get("initial_model", {}).get("sha256") == _sha256(model) for e in submitted)


def test_a_bad_initial_model_is_refused_with_one_line(make_study, tmp_path):
    handle = make_study(sites=["site-1"])
    study = handle.study
    study.start_server()
    job = handle.job(tmp_path / "job")

    broken = _sparse_model(tmp_path / "broken.safetensors", 1 << 20)
    with open(broken, "r+b") as f:
        f.truncate(broken.stat().st_size - 4)  # the tensor's data runs past the end of the file
    done = study.admin(f"submit_job {job} --initial-model {broken}")
    assert done.returncode != 0
    assert "--initial-model" in done.stderr and "broken.safetensors" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert study.admin_json("list_jobs") == []


def _audit(study: LocalStudy) -> list[dict]:
    path = study.kits[study.server] / "workspace" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
