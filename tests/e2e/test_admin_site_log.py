"""tail_log SITE: the site sends the end of its own log with its next heartbeat, only when asked."""

from __future__ import annotations

from provision.local_study import wait_until


def test_tail_log_of_a_site_returns_its_recent_log_lines(make_study):
    study = make_study(sites=["site-1"]).study
    study.start_server()
    study.start("site-1")
    wait_until(lambda: any(s["online"] for s in study.admin_json("check_status client")["sites"]), 60,
               "site-1 online")

    data = study.admin_json("tail_log site-1 20")

    assert data["site"] == "site-1"
    assert 0 < len(data["lines"]) <= 20
    assert any("registered with" in line for line in data["lines"])
    # the site's folders leave masked, as in failure reports: its log names the audit file by its full path
    kit = str(study.kits["site-1"])
    assert any("<kit>/workspace/audit.jsonl" in line for line in data["lines"]), data["lines"]
    assert not any(kit in line for line in data["lines"])
    site_audit = (study.kits["site-1"] / "workspace" / "audit.jsonl").read_text()
    assert '"control":"send_log"' in site_audit  # the site records that its log was asked for


def test_tail_log_of_an_offline_site_says_so(make_study):
    study = make_study(sites=["site-1"]).study
    study.start_server()
    study.start("site-1")
    wait_until(lambda: any(s["online"] for s in study.admin_json("check_status client")["sites"]), 60,
               "site-1 online")
    study.kill("site-1")
    wait_until(lambda: not any(s["online"] for s in study.admin_json("check_status client")["sites"]), 60,
               "site-1 to count as offline")

    done = study.admin("tail_log site-1")

    assert done.returncode == 1
    assert "offline" in done.stderr
