"""The dashboard's gate, in-process: without the start's token (cookie, and header for a POST) a request
gets 403 and no command reaches the hub; with them, the server's own refusal comes back as 403; a foreign
Host header is turned away; a taken port is refused in one line. (The browser test covers the real study.)"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from runtime.admin.client import CommandFailed
from runtime.admin.dashboard.app import cookie_name, create_app
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
    return hub, create_app(hub, TOKEN, PORT, SESSION)  # type: ignore[arg-type]


def test_without_the_token_nothing_answers_and_no_command_is_sent(hub_app):
    hub, app = hub_app
    cookie = {"cookie": f"{cookie_name(PORT)}=wrong"}
    assert _request(app, "GET", "/")[0] == 403
    assert _request(app, "GET", "/", query="token=wrong")[0] == 403
    assert _request(app, "GET", "/api/session", headers=cookie)[0] == 403
    assert _request(app, "GET", "/api/audit")[0] == 403
    assert _request(app, "POST", "/api/jobs/j1/abort", headers={"x-fedkit-token": TOKEN})[0] == 403  # no cookie
    good_cookie = {"cookie": f"{cookie_name(PORT)}={TOKEN}"}
    assert _request(app, "POST", "/api/jobs/j1/abort", headers=good_cookie)[0] == 403  # no CSRF header
    assert _request(app, "POST", "/api/jobs/j1/abort", headers={**good_cookie, "x-fedkit-token": "x"})[0] == 403
    assert hub.calls == []


def test_the_token_sets_a_strict_httponly_cookie_and_leaves_the_address_bar(hub_app):
    _, app = hub_app
    status, headers, _ = _request(app, "GET", "/", query=f"token={TOKEN}")
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"].lower()
    assert f"{cookie_name(PORT)}={TOKEN}".lower() in cookie and "httponly" in cookie and "samesite=strict" in cookie
    status, headers, body = _request(app, "GET", "/", headers={"cookie": f"{cookie_name(PORT)}={TOKEN}"})
    assert status == 200 and TOKEN.encode() in body  # the page carries the token for its POST header
    assert "frame-ancestors 'none'" in headers["content-security-policy"]


def test_a_post_with_cookie_and_header_goes_to_the_server_which_decides(hub_app):
    hub, app = hub_app
    auth = {"cookie": f"{cookie_name(PORT)}={TOKEN}", "x-fedkit-token": TOKEN}
    status, _, body = _request(app, "POST", "/api/jobs/j1/abort", headers=auth)
    assert status == 403 and b"denied" in body
    assert hub.calls == [("abort_job", {"job_id": "j1"})]
    assert _request(app, "POST", "/api/jobs/..%2Fx/clone", headers=auth)[0] in (400, 404)
    assert len(hub.calls) == 1


def test_a_foreign_host_header_is_turned_away(hub_app):
    hub, app = hub_app
    status, _, _ = _request(app, "GET", "/", query=f"token={TOKEN}", host="evil.example:5000")
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
