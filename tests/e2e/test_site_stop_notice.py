"""A site stopped on purpose (stop.sh, SIGTERM) tells the server with a last heartbeat: check_status shows it
`stopped`, not `dead` like a crashed one, and the server's log and audit say so. Real processes."""

from __future__ import annotations

import json

from provision.local_study import wait_until


def _states(study) -> dict[str, str]:
    return {s["site"]: s["state"] for s in study.admin_json("check_status client")["sites"]}


def test_a_stopped_site_shows_as_stopped_and_a_killed_one_as_dead(make_study):
    study = make_study(sites=["site-1", "site-2"], heartbeat_timeout_s=3.0).study
    study.start_server()
    study.start_sites()

    assert study.stop("site-1") == 0
    assert _states(study)["site-1"] == "stopped"  # at once: no grace period to wait out
    study.kill("site-2")
    wait_until(lambda: _states(study)["site-2"] == "dead", 60, "site-2 to count as dead")
    assert _states(study)["site-1"] == "stopped"

    server_ws = study.kits[study.server] / "workspace"
    audit = [json.loads(line) for line in (server_ws / "audit.jsonl").read_text().splitlines()]
    assert [r["site"] for r in audit if r["event"] == "site_stopped"] == ["site-1"]
    assert "site site-1: stopped by its site" in (server_ws / "log.txt").read_text()

    study.start_sites(["site-1"])  # a new session: back online
    assert _states(study)["site-1"] == "idle"
