"""The dashboard's gate, in-process: without the start's token (the X-Fedkit-Token header; for the live feed
its query parameter) an /api/ request gets 403 and no command reaches the hub; with it, the server's own
refusal comes back as 403; no cookie is ever set (browsers send 127.0.0.1's cookies to every local port); a
foreign Host header is turned away; a taken port is refused in one line. (The browser test covers the real
study.)"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from runtime.admin.client import CommandFailed
from runtime.admin.dashboard.app import create_app
from runtime.admin.dashboard.serve import bind
from runtime.errors import ConfigError

TOKEN = "t0k3n-for-tests"
PORT = 5000
SESSION = {"admin": "member@study.org", "role": "member", "org": "x", "commands": ["help"]}


class FakeHub:
    """Records the commands the app would send to the server; answers abort_job as a server denying it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def command(self, name: str, **args: Any) -> Any:
        self.calls.append((name, args))
        if name == "abort_job":
            raise CommandFailed("denied: role 'member' may not run 'abort_job'")
        return {"ok": True}


def _request(app: Any, method: str, path: str, query: str = "", headers: dict[str, str] | None = None,
             host: str = f"127.0.0.1:{PORT}") -> tuple[int, dict[str, str], bytes]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", host.encode())]
             + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
             "server": ("127.0.0.1", PORT), "client": ("127.0.0.1", 40000)}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


@pytest.fixture
def hub_app() -> tuple[FakeHub, Any]:
    hub = FakeHub()
    return hub, create_app(hub, TOKEN, SESSION)  # type: ignore[arg-type]


def test_without_the_token_no_api_call_answers_and_no_command_is_sent(hub_app):
    hub, app = hub_app
    assert _request(app, "GET", "/api/session")[0] == 403
    assert _request(app, "GET", "/api/session", headers={"x-fedkit-token": "wrong"})[0] == 403
    assert _request(app, "GET", "/api/audit", query=f"token={TOKEN}")[0] == 403  # the query: the live feed's only
    assert _request(app, "GET", "/api/events", query="token=wrong")[0] == 403
    assert _request(app, "POST", "/api/jobs/j1/abort", query=f"token={TOKEN}")[0] == 403
    # a cookie is no credential: another local web server would have received it
    assert _request(app, "POST", "/api/jobs/j1/abort", headers={"cookie": f"fedkit_dashboard_{PORT}={TOKEN}"})[0] == 403
    assert hub.calls == []


def test_the_page_is_code_only_and_sets_no_cookie(hub_app):
    _, app = hub_app
    status, headers, body = _request(app, "GET", "/", query=f"token={TOKEN}")
    assert status == 200 and "set-cookie" not in headers
    assert TOKEN.encode() not in body  # the page holds no secret: the token stays in the tab that was given it
    assert "frame-ancestors 'none'" in headers["content-security-policy"]


def test_with_the_token_calls_go_to_the_server_which_decides(hub_app):
    hub, app = hub_app
    auth = {"x-fedkit-token": TOKEN}
    assert _request(app, "GET", "/api/session", headers=auth)[0] == 200
    status, _, body = _request(app, "POST", "/api/jobs/j1/abort", headers=auth)
    assert status == 403 and b"denied" in body
    assert hub.calls == [("abort_job", {"job_id": "j1"})]
    assert _request(app, "POST", "/api/jobs/..%2Fx/clone", headers=auth)[0] in (400, 404)
    assert len(hub.calls) == 1


def test_a_foreign_host_header_is_turned_away(hub_app):
    hub, app = hub_app
    status, _, _ = _request(app, "GET", "/api/session", headers={"x-fedkit-token": TOKEN}, host="evil.example:5000")
    assert status == 400 and hub.calls == []


def test_a_taken_port_is_refused_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port {port}: .*use --port 0"):
            bind(port)


def test_a_port_out_of_range_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="--port 99999: a port is 0 to 65535"):
        bind(99999)


def test_open_hands_the_browser_a_private_file_not_the_token():
    # a browser's command line is readable by every local user (/proc/PID/cmdline): --open gives it this file
    import stat
    from pathlib import Path

    from runtime.admin.dashboard.serve import _redirect_file, _remove

    url = f"http://127.0.0.1:{PORT}/#token={TOKEN}"
    opener = _redirect_file(url)
    try:
        assert TOKEN not in opener.as_uri()
        assert stat.S_IMODE(opener.stat().st_mode) == 0o600 and stat.S_IMODE(opener.parent.stat().st_mode) == 0o700
        assert f'content="0; url={url}"' in opener.read_text()
    finally:
        _remove(opener)
    assert not Path(opener).parent.exists()
