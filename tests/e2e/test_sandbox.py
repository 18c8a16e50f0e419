"""A hostile job on a site with the native sandbox: every escape it tries is refused, the key it tries to
smuggle out in a metric name never leaves the site (the task fails with one line, on the server and in the
site's audit), nothing it started outlives it, and the site then runs a normal job to the end."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
from pathlib import Path

import yaml

from provision.local_study import wait_until

from ..conftest import pids_naming

HOSTILE_JOB = Path(__file__).parent / "jobs" / "hostile"
ATTEMPTS = ("read_key", "connect_server", "connect_listener", "write_data_root", "write_runtime")


def _audit(kit: Path) -> list[dict]:
    return [json.loads(line) for line in (kit / "workspace" / "audit.jsonl").read_text().splitlines()]


def test_hostile_job_is_contained_and_the_site_keeps_working(make_study, tmp_path):
    handle = make_study(sites=["site-1"])
    study, site = handle.study, "site-1"
    data_root = handle.data.site_dirs[site]
    study.write_local(site, "site.yml", {"data_root": str(data_root), "heartbeat_interval_s": 1.0,
                                         "sandbox": {"backend": "native"}})
    study.start_server()
    study.start(site)
    wait_until(lambda: any(s["online"] for s in study.admin_json("check_status client")["sites"]), 60,
               "the site online")

    kit = study.kits[site]
    token = f"fedkit-orphan-{secrets.token_hex(4)}"
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        job = tmp_path / "hostile"
        shutil.copytree(HOSTILE_JOB, job)
        client_cfg = yaml.safe_load((job / "config_fed_client.yml").read_text())
        client_cfg["learner"]["args"] = {"server_port": study.fed_learn_port,
                                         "listener_port": listener.getsockname()[1], "orphan_token": token}
        (job / "config_fed_client.yml").write_text(yaml.safe_dump(client_cfg))
        record = study.admin_json(f"submit_job {job}")
        waited = study.admin(f"wait_job {record['job_id']} 240")
    finally:
        listener.close()

    # round 1: every attempt was refused inside the sandbox, and the orphan did start
    shown = study.admin_json(f"show_job {record['job_id']}")
    rounds = [m for m in shown["metrics"] if m["type"] == "round"]
    assert rounds and rounds[0]["round"] == 1
    reported = rounds[0]["train"][site]
    assert {a: reported[f"refused/{a}"] for a in ATTEMPTS} == {a: 1.0 for a in ATTEMPTS}
    assert reported["orphan_started"] == 1.0
    assert not (data_root / "planted.txt").exists()
    assert not (kit / "runtime" / "planted.py").exists()

    # round 2: the key in a metric name is refused with one line, on the server and in the site's audit
    assert waited.returncode == 1 and "worker reply refused: metric name #1" in waited.stderr
    assert len(waited.stderr.strip().splitlines()) == 1
    assert shown["record"]["state"] == "failed" and "worker reply refused" in shown["record"]["error"]
    shown_text = json.dumps(shown)
    assert "worker reply refused: metric name #1" in shown_text
    key_lines = [line for line in (kit / "startup" / "client.key").read_text().splitlines() if "-----" not in line]
    audit = _audit(kit)
    audit_text = json.dumps(audit)
    for line in key_lines:
        assert line not in shown_text and line not in audit_text
    refusals = [e for e in audit if e.get("event") == "task_failed" and e.get("job_id") == record["job_id"]]
    assert refusals and refusals[-1]["reason"].startswith("worker reply refused: metric name")
    started = [e for e in audit if e.get("event") == "worker_started" and e.get("job_id") == record["job_id"]]
    assert started and started[0]["backend"] == "native" and set(started[0]["limits"]) == {"cpus", "memory", "pids"}

    # nothing the job started survives it
    wait_until(lambda: not pids_naming(token), 60, "the hostile job's orphan to be gone")

    # and the site still runs a normal job to the end
    normal = handle.job(tmp_path / "tabular")
    record = study.admin_json(f"submit_job {normal} --set server.rounds=1 --set meta.min_clients=1")
    assert study.admin_json(f"wait_job {record['job_id']} 240")["state"] == "finished"


def test_restart_checks_the_kit_signature_again(make_study):
    handle = make_study(sites=["site-1"])
    study, site = handle.study, "site-1"
    study.start_server()
    proc = study.start(site)
    kit = study.kits[site]

    def starts() -> int:
        return sum(e.get("event") == "client_started" for e in _audit(kit))

    def online() -> bool:
        return any(s["online"] for s in study.admin_json("check_status client")["sites"])

    wait_until(online, 60, "the site online")
    study.admin_json(f"restart client {site}")
    wait_until(lambda: starts() == 2, 60, "the site to start again from its kit")
    assert proc.poll() is None

    with (kit / "runtime" / "client" / "worker.py").open("a") as f:
        f.write("\n# changed after the kit was signed\n")
    study.admin_json(f"restart client {site}")
    wait_until(lambda: proc.poll() is not None, 60, "the site to refuse its changed kit")
    assert proc.returncode == 1
    assert "refusing to start: this kit differs from its signed manifest" in study.log_tail(site)
    assert starts() == 2
