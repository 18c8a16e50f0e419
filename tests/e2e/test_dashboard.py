"""The study dashboard in a real browser (Playwright driving the distribution's headless Chromium) over a real
study from kits on 127.0.0.1: the sites online, a job's rounds arriving live with their curve points, a site
SIGKILLed mid-round shown dead before the round ends, the finished job's cross-site heatmap holding exactly
cross_site.json's values, a DP site's total over all jobs and what its `reports:` policy kept back, a
`member` without abort buttons whose forged abort the server refuses and audits, and no API answer
without the start's token (no cookie either). Screenshots of every page go to test-artifacts/dashboard/.

Needs: `apt-get install -y chromium` and the dev extra `playwright` (no browser download: the system's
Chromium is launched by path)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provision.demo_data import write_demo_data
from provision.local_study import LocalStudy, _die_with_parent, wait_until

from ..conftest import EXAMPLE_PROJECT, REPO, with_sites

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install -e .[dev] (playwright)")

SITES = ["site-1", "site-2", "site-3"]
MEMBER = "member@study.org"
SLEEPY_JOB = Path(__file__).parent / "jobs" / "sleepy"
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
HEARTBEAT_TIMEOUT_S = 5.0
TRAIN_S = 25.0  # each round lasts at least this long: room to see a killed site die before its round ends
UI_TIMEOUT_MS = 90_000


@pytest.fixture
def study(tmp_path: Path) -> Iterator[LocalStudy]:
    """Three sites, the example's admins plus a read-only member, short heartbeats; stopped at the end."""

    def edit(data: dict[str, Any]) -> None:
        with_sites(SITES)(data)
        data["participants"].append({"type": "admin", "name": MEMBER, "org": "coordinating-center", "role": "member"})

    study = LocalStudy.create(EXAMPLE_PROJECT, tmp_path / "study", edit=edit)
    try:
        data = write_demo_data(tmp_path / "study" / "data", SITES)
        study.write_local(study.server, "server.yml", {"heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S})
        for site in SITES:
            study.write_local(site, "site.yml", {"data_root": str(data.site_dirs[site]),
                                                 "heartbeat_interval_s": 1.0, "threads": 1})
        # site-1 adds DP with a budget for all its jobs, and lets only the key metric and n_samples leave:
        # the job page says both (the sleepy job's train metric `round` is withheld from every train result)
        study.write_local("site-1", "privacy.yml", {
            "gaussian_dp": {"noise_multiplier": 1.0, "clip_norm": 1.0},
            "dp_site_budget": {"epsilon": 1000.0, "delta": 1e-5},
            "reports": {"metric_names": ["score", "n_samples"]}, "build_initial_model": True})
        yield study
    finally:
        study.stop_all()  # the dashboards too: they are registered in study.procs


def _start_dashboard(study: LocalStudy, admin: str) -> str:
    """`fl_admin.sh dashboard --port 0` from the admin's kit; the URL it prints (with this start's token)."""
    name = f"dashboard-{admin}"
    log_path = study.log_path(name)
    with log_path.open("ab") as log:
        study.procs[name] = subprocess.Popen(
            ["bash", str(study.kits[admin] / "startup" / "fl_admin.sh"), "dashboard", "--port", "0"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=study.env(),
            start_new_session=True, preexec_fn=_die_with_parent)

    def url() -> str | None:
        words = [w for w in log_path.read_text(errors="replace").split() if w.startswith("http://127.0.0.1:")]
        return words[0] if words else None

    wait_until(lambda: url() is not None or study.procs[name].poll() is not None, 60, f"{name} to print its URL")
    assert url() is not None, study.log_tail(name)
    return url()  # type: ignore[return-value]


def _audit(study: LocalStudy) -> list[dict[str, Any]]:
    path = study.kits[study.server] / "workspace" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _metrics(study: LocalStudy, job_id: str) -> list[dict[str, Any]]:
    path = study.kits[study.server] / "workspace" / "jobs" / job_id / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _http_status(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _abort_records(study: LocalStudy, admin: str) -> list[dict[str, Any]]:
    return [r for r in _audit(study) if r["event"] == "admin_command" and r.get("command") == "abort_job"
            and r.get("admin") == admin]


@pytest.mark.timeout(600)
def test_dashboard_follows_a_study_live_and_holds_the_admins_rights(study, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "the dashboard test drives the distribution's Chromium: apt-get install -y chromium"
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)

    study.start_server()
    for site in SITES:
        study.start(site)
    admin, member = study.admins[0], MEMBER
    admin_url, member_url = _start_dashboard(study, admin), _start_dashboard(study, member)
    base, fragment = admin_url.split("/#", 1)
    assert fragment.startswith("token="), "the token travels in the fragment, which no server is ever sent"

    # without the token no API call answers, and nothing reaches the server; the page itself is only code
    commands_before = sum(1 for r in _audit(study) if r["event"] == "admin_command")
    assert _http_status(base + "/") == 200
    assert _http_status(base + "/api/session") == 403
    assert _http_status(base + "/api/events") == 403
    assert _http_status(base + "/api/events?token=wrong") == 403
    assert _http_status(base + "/api/jobs/some-job/abort", "POST", {"X-Fedkit-Token": "wrong"}) == 403
    assert sum(1 for r in _audit(study) if r["event"] == "admin_command") == commands_before

    playwright_api.expect.set_options(timeout=UI_TIMEOUT_MS)  # its own default is 5 s, too short under load
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(UI_TIMEOUT_MS)
            member_page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            member_page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(admin_url)
            playwright_api.expect(page.locator("#conn")).to_have_text("live")
            assert "token=" not in page.url, "the token leaves the address bar once the page has it"
            member_page.goto(member_url)

            # no cookie is set (a browser sends 127.0.0.1's cookies to every local port, to any other local
            # web server too), so a request from this browser without the header is refused
            assert page.context.cookies() == []
            refused = page.request.post(base + "/api/jobs/some-job/abort")
            assert refused.status == 403
            assert not [r for r in _audit(study) if r.get("command") == "abort_job"], "no command may reach the server"

            # ---- study: every site online, idle
            sites = page.locator("#sites-table tbody tr")
            playwright_api.expect(sites).to_have_count(len(SITES))
            for site in SITES:
                playwright_api.expect(page.locator(f'#sites-table tr[data-site="{site}"]')).to_have_attribute(
                    "data-state", "idle")
            page.screenshot(path=str(ARTIFACTS / "study.png"), full_page=True)

            job = tmp_path / "sleepy"
            shutil.copytree(SLEEPY_JOB, job)
            job_id = study.admin_json(
                f"submit_job {job} --set server.rounds=2 --set server.workflows=[fedavg,cross_site] "
                f"--set meta.min_clients=2 --set client.learner.args.train_s={TRAIN_S} "
                "--set server.round_timeout_s=300")["job_id"]

            # ---- jobs (while the job runs): abort is offered to the project admin, not to the member
            page.goto(f"{base}/#jobs")
            playwright_api.expect(page.locator(f'#jobs-table tr[data-job="{job_id}"] button[data-action="abort"]')
                                  ).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "jobs.png"), full_page=True)
            member_page.goto(member_url.split("/#", 1)[0] + "/#jobs")
            member_row = member_page.locator(f'#jobs-table tr[data-job="{job_id}"]')
            playwright_api.expect(member_row).to_be_visible()
            assert member_page.locator("#jobs-table button").count() == 0
            member_page.screenshot(path=str(ARTIFACTS / "jobs-member.png"), full_page=True)

            # a forged abort from the member's own page, with its token: the server refuses and audits it
            forged = member_page.evaluate("""async (jobId) => {
                const token = sessionStorage.getItem("fedkit-token");
                const r = await fetch(`/api/jobs/${jobId}/abort`, {method: "POST", headers: {"X-Fedkit-Token": token}});
                return {status: r.status, body: await r.json()};
            }""", job_id)
            assert forged["status"] == 403, forged
            assert forged["body"]["error"].startswith("denied"), forged
            denied = _abort_records(study, member)
            assert len(denied) == 1 and denied[0]["allowed"] is False and denied[0]["args"]["job_id"] == job_id, denied
            assert study.admin_json(f"show_job {job_id}")["record"]["state"] in ("queued", "running")

            # ---- one job: round 1 appears, with its curve point, while the job runs, without a reload
            page.evaluate("window.__notReloaded = true")
            page.goto(f"{base}/#job/{job_id}")
            page.evaluate("window.__notReloaded = true")
            round1 = page.locator('#rounds-table tr[data-round="1"]')
            playwright_api.expect(round1).to_be_visible()
            playwright_api.expect(page.locator("#job-facts")).to_have_attribute("data-state", "running")
            assert int(page.locator("#chart").get_attribute("data-points") or 0) >= 1
            assert page.evaluate("window.__notReloaded === true"), "the page must update live, not reload"
            page.screenshot(path=str(ARTIFACTS / "job-running.png"), full_page=True)

            # ---- a site killed mid-round shows as dead before that round ends
            wait_until(lambda: any(r["event"] == "task_sent" and r.get("site") == "site-3" and r.get("round") == 2
                                   and r.get("task") == "train" for r in _audit(study)), 120,
                       "round 2 sent to site-3")
            study.kill("site-3")
            page.goto(f"{base}/#study")
            playwright_api.expect(page.locator('#sites-table tr[data-site="site-3"]')).to_have_attribute(
                "data-state", "dead")
            assert not [m for m in _metrics(study, job_id) if m["type"] == "round" and m["round"] == 2], \
                "site-3 must show as dead while round 2 is still open"
            playwright_api.expect(page.locator("#server-line")).to_have_attribute("data-round", "2")
            page.screenshot(path=str(ARTIFACTS / "study-site-dead.png"), full_page=True)

            # ---- the finished job: rounds, curve, and the heatmap equal to cross_site.json
            page.goto(f"{base}/#job/{job_id}")
            playwright_api.expect(page.locator("#job-facts")).to_have_attribute("data-state", "finished",
                                                                                 timeout=240_000)
            playwright_api.expect(page.locator("#rounds-table tr[data-round]")).to_have_count(2)
            assert int(page.locator("#chart").get_attribute("data-points") or 0) >= 2
            best_round = study.admin_json(f"show_job {job_id}")["record"]["best_round"]
            playwright_api.expect(page.locator("#rounds-table .best")).to_have_count(1)  # the best model, once
            best_row = page.locator("#rounds-table tr", has=page.locator(".best")).inner_text()
            assert best_row.startswith((f"model {best_round}", str(best_round + 1))), (best_row, best_round)
            assert page.evaluate("window.__notReloaded === true")
            page.screenshot(path=str(ARTIFACTS / "job.png"), full_page=True)

            # site-1's privacy, as show_job has it: its DP total of all jobs, and what its `reports:` kept back
            shown_job = study.admin_json(f"show_job {job_id}")
            dp = [r["dp"] for m in shown_job["metrics"] for site, r in (m.get("privacy") or {}).items()
                  if site == "site-1" and isinstance(r, dict) and r.get("dp")]
            assert dp, "site-1 sent no DP release"
            site_releases = max(d["site_releases"] for d in dp)
            playwright_api.expect(page.locator('#dp-table tr[data-site="site-1"]')).to_contain_text(
                f"at δ 0.00001 after {site_releases} releases")
            kept = [m["sites"]["site-1"] for m in shown_job["metrics"]
                    if m["type"] == "site_reports" and "site-1" in m["sites"]]
            withheld = sum(1 for k in kept if k.get("metrics_withheld"))
            assert withheld >= 2, kept  # one per train result: rounds 1 and 2
            cells = page.locator('#reports-table tr[data-site="site-1"] td')
            playwright_api.expect(cells).to_have_count(5)
            assert [cells.nth(i).inner_text() for i in range(4)] == ["site-1", str(withheld), "0", "0"]
            assert page.locator('#reports-table tr[data-site="site-2"]').count() == 0  # no policy: nothing kept

            report = json.loads((study.kits[study.server] / "workspace" / "jobs" / job_id / "cross_site.json")
                                .read_text())
            page.goto(f"{base}/#cross/{job_id}")
            cells = page.locator("#heatmap td.cell")
            playwright_api.expect(cells).to_have_count(len(report["models"]) * len(report["sites"]))
            shown = {(c.get_attribute("data-model"), c.get_attribute("data-site")): c.get_attribute("data-value")
                     for c in cells.all()}
            key = report["key_metric"]
            expected = {(m, s): report["matrix"][m].get(s, {}).get(key) for m in report["models"]
                        for s in report["sites"]}
            assert set(shown) == set(expected)
            for cell, value in expected.items():
                assert (float(shown[cell]) if shown[cell] else None) == value, (cell, shown[cell], value)
            page.screenshot(path=str(ARTIFACTS / "cross-site.png"), full_page=True)

            # ---- audit: the member's denied abort is on the trail; the page says what it cannot verify
            page.goto(f"{base}/#audit")
            playwright_api.expect(page.locator("#audit-table tr.denied").first).to_be_visible()
            playwright_api.expect(page.locator("#audit-verify")).to_contain_text("does not report")
            page.screenshot(path=str(ARTIFACTS / "audit.png"), full_page=True)
            member_page.goto(member_url.split("/#", 1)[0] + "/#audit")
            playwright_api.expect(member_page.locator("#audit-error")).to_contain_text("denied")
            member_page.screenshot(path=str(ARTIFACTS / "audit-member.png"), full_page=True)
        finally:
            browser.close()
    print(f"dashboard screenshots: {ARTIFACTS}")
