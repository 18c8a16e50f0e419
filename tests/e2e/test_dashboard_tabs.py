"""The dashboard open in many tabs at once, in a real browser (the distribution's headless Chromium driven by
Playwright) against the real dashboard app and poll loop, with a stand-in for the server. A browser opens at
most six HTTP/1.1 connections to one host and port; each tab's live feed held one of them for good, so a
seventh tab got neither its feed nor its page's data and hung on "connecting…". Tabs now share one feed per
job they show (a SharedWorker), so a dozen tabs stay live, and a tab closed gives its share back.

Needs: `apt-get install -y chromium` and the dev extra `playwright`."""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from runtime.admin.dashboard.app import create_app
from runtime.admin.dashboard.backend import Hub

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install -e .[dev] (playwright)")

TABS = 12  # twice the browser's connections per host
TOKEN = "tabs-test-token"
UI_TIMEOUT_MS = 60_000
SESSION = {"admin": "admin@study.org", "role": "project_admin", "org": "cc", "project": "tabs",
           "server": "localhost:8003", "commands": ["check_status", "list_jobs", "show_job", "show_audit"]}


class _Server:
    """Answers the poll loop's questions as a server with two sites and `jobs` jobs would; the status line
    carries a counter that moves every poll, so a live page keeps changing."""

    def __init__(self, jobs: int):
        self.polls = 0
        self.jobs = [f"job-{i}" for i in range(jobs)]
        self.shown: list[str] = []

    async def command(self, name: str, **args: Any) -> Any:
        if name == "check_status":
            self.polls += 1
            return {"server": {"uptime_s": self.polls, "sites_online": 2, "running_job": None,
                               "running_job_name": None, "round": None, "rounds_total": None, "queued": []},
                    "sites": [{"site": s, "org": "o", "state": "idle", "online": True, "last_heartbeat_s_ago": 0.5,
                               "job_id": None, "round": None} for s in ("site-1", "site-2")]}
        if name == "list_jobs":
            return [{"job_id": j, "name": j, "state": "finished", "submitter": "admin@study.org",
                     "submitter_role": "project_admin", "submitted_at": 1.0 + i, "seq": i, "rounds_done": 1,
                     "rounds_total": 1, "config_hash": "0" * 64, "overrides": [], "best_metric": None,
                     "best_round": None} for i, j in enumerate(self.jobs)]
        if name == "show_job":
            self.shown.append(args["job_id"])
            return {"job_id": args["job_id"], "name": args["job_id"], "state": "finished", "metrics": []}
        if name == "show_audit":
            return {"records": []}
        raise AssertionError(f"unexpected command {name}")


@pytest.fixture
def dashboard() -> Iterator[tuple[str, _Server, Hub]]:
    """The dashboard app on 127.0.0.1 (a free port), in a thread of this process; stopped at the end."""
    server = _Server(jobs=3)
    hub = Hub(server, interval_s=0.2)  # type: ignore[arg-type]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(hub, TOKEN, SESSION), log_level="warning", lifespan="off"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(uv.serve(sockets=[sock]),), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", server, hub
    finally:
        asyncio.run_coroutine_threadsafe(hub.end_streams(), loop).result(10)
        uv.should_exit = True
        thread.join(30)
        sock.close()


def _uptime(page: Any) -> int:
    text = page.locator("#server-line").text_content() or ""
    return int(text.split()[2]) if text.startswith("server up ") else -1


@pytest.mark.timeout(300)
def test_a_dozen_tabs_stay_live_and_share_one_feed_per_job(dashboard):
    base, server, hub = dashboard
    chromium = shutil.which("chromium")
    assert chromium, "this test drives the distribution's Chromium: apt-get install -y chromium"
    playwright_api.expect.set_options(timeout=UI_TIMEOUT_MS)
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            context = browser.new_context()
            pages = []
            for i in range(TABS):  # half on the study page, half on one job each of three
                page = context.new_page()
                page.set_default_timeout(UI_TIMEOUT_MS)
                page.goto(f"{base}/#token={TOKEN}")
                if i % 2:
                    page.evaluate(f"location.hash = 'job/job-{i % 3}'")
                pages.append(page)
            for i, page in enumerate(pages):
                playwright_api.expect(page.locator("#conn")).to_have_text("live")
                playwright_api.expect(page.locator("#server-line")).to_contain_text("2 site(s) online")
                if i % 2:
                    playwright_api.expect(page.locator("#page-job")).to_be_visible()
            # every tab keeps moving with the server, the last opened too: not one frozen snapshot
            first = {i: _uptime(p) for i, p in enumerate(pages)}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(_uptime(p) <= first[i] for i, p in enumerate(pages)):
                time.sleep(0.2)
            assert all(_uptime(p) > first[i] for i, p in enumerate(pages)), "a tab stopped following the study"
            # the page's own requests still get through with every tab open (the audit page's fetch)
            pages[-1].evaluate("location.hash = 'audit'")
            playwright_api.expect(pages[-1].locator("#audit-error")).to_be_hidden()
            assert {"job-0", "job-1", "job-2"} <= set(server.shown)
            assert hub.feeds == 4, "one feed each for the study page and the three jobs, whatever the tabs"
            for i in (3, 9):  # the tabs on job-0: closing them closes its feed, and only that one
                pages[i].close(run_before_unload=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and hub.feeds != 3:
                time.sleep(0.2)
            assert hub.feeds == 3
            # a browser without SharedWorker: the tab opens a feed of its own, as before
            own = browser.new_context()
            own.add_init_script("window.SharedWorker = undefined")
            lone = own.new_page()
            lone.goto(f"{base}/#token={TOKEN}")
            playwright_api.expect(lone.locator("#conn")).to_have_text("live")
            playwright_api.expect(lone.locator("#server-line")).to_contain_text("2 site(s) online")
            assert hub.feeds == 4
        finally:
            browser.close()
