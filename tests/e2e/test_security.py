"""Identity and integrity over real processes: a foreign CA is refused at the TLS handshake, a site's
certificate cannot act for another site, and a changed kit refuses to start."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

from provision.local_study import LocalStudy, wait_until
from runtime.proto import fedkit_pb2 as pb
from runtime.transport import TlsFiles, federation_stub, open_channel

from ..conftest import EXAMPLE_PROJECT, with_sites


def _online(study: LocalStudy) -> list[str]:
    return [s["site"] for s in study.admin_json("check_status client")["sites"] if s["online"]]


def test_client_from_another_ca_is_refused_at_handshake(make_study, tmp_path):
    ours = make_study(sites=["site-1"]).study
    ours.start_server()

    def same_server(data):
        with_sites(["site-1"])(data)
        server = next(p for p in data["participants"] if p["type"] == "server")
        server["fed_learn_port"], server["admin_port"] = ours.fed_learn_port, ours.admin_port

    foreign = LocalStudy.create(EXAMPLE_PROJECT, tmp_path / "foreign", free_ports=False, edit=same_server)
    try:
        foreign.start("site-1")
        # the site's own diagnosis of the failed handshake (gRPC core's raw lines are off: GRPC_VERBOSITY)
        wait_until(lambda: "certificate this kit's study CA did not issue" in foreign.log_tail("site-1"), 60,
                   "the foreign client to report a failed TLS handshake")
        assert _online(ours) == []
        audit = (ours.kits[ours.server] / "workspace" / "audit.jsonl").read_text()
        assert "site_registered" not in audit
    finally:
        foreign.stop_all()


def _first_task_sent_to(study: LocalStudy, site: str) -> str | None:
    audit = study.kits[study.server] / "workspace" / "audit.jsonl"
    for line in audit.read_text().splitlines():
        record = json.loads(line)
        if record["event"] == "task_sent" and record["site"] == site:
            return record["task_id"]
    return None


async def _submit_as(kit: Path, port: int, task_id: str) -> pb.SubmitReply:
    startup = kit / "startup"
    tls = TlsFiles(startup / "client.crt", startup / "client.key", startup / "rootCA.pem")
    channel = open_channel(tls, "localhost", port)
    try:
        stub = federation_stub(channel)
        session = await stub.Register(pb.RegisterRequest(runtime_version="test"), timeout=10)

        async def chunks():
            yield pb.ResultChunk(header=pb.ResultHeader(session_id=session.session_id, task_id=task_id,
                                                        n_samples=10, metrics_json="{}"))

        return await stub.SubmitResult(chunks(), timeout=10)
    finally:
        await channel.close()


def test_site_certificate_cannot_act_as_another_site(make_study, tmp_path):
    handle = make_study(sites=["site-1", "site-2"])
    study = handle.study
    study.start_server()
    study.start("site-2")
    wait_until(lambda: _online(study) == ["site-2"], 60, "site-2 online")
    job = handle.job(tmp_path / "job")
    study.admin_json(f"submit_job {job} --set meta.min_clients=1 --set meta.sites=[site-2]")
    wait_until(lambda: _first_task_sent_to(study, "site-2") is not None, 120, "a task sent to site-2")
    task_id = _first_task_sent_to(study, "site-2")

    reply = asyncio.run(_submit_as(study.kits["site-1"], study.fed_learn_port, task_id))

    assert not reply.accepted
    assert "never sent to site-1" in reply.reason
    audit = (study.kits[study.server] / "workspace" / "audit.jsonl").read_text()
    assert any(json.loads(line)["event"] == "result_refused" and json.loads(line)["site"] == "site-1"
               for line in audit.splitlines())


def test_tampered_kit_refuses_to_start(make_study):
    study = make_study(sites=["site-1"]).study
    target = study.kits["site-1"] / "runtime" / "weights.py"
    target.write_bytes(target.read_bytes().replace(b"safetensors", b"safetensorz", 1))

    done = subprocess.run(["bash", str(study.kits["site-1"] / "startup" / "start.sh")], capture_output=True,
                          text=True, env=study.env(), timeout=60)

    assert done.returncode != 0
    assert "runtime/weights.py" in done.stderr
    assert "changed" in done.stderr
    assert not (study.kits["site-1"] / "workspace" / "daemon.pid").exists()
