"""The dashboard's routes: one page (static/), its live feed (server-sent events) and a few actions, every one
of them sent to the server as the admin's own command through the Hub, so the server authorizes and audits
it exactly as it does the console's.

Who may talk to it (docs/dashboard.md, "Security model"):
- it listens on 127.0.0.1 only, and answers only Host headers naming 127.0.0.1 or localhost (a web page
  that rebinds its own domain to 127.0.0.1 is turned away);
- the page itself (/ and /static/) is only code and answers anyone; every call that reads or changes the
  study (/api/) needs this start's random token in the X-Fedkit-Token header (the live feed, an
  EventSource, which cannot set headers: in its `token` query parameter), else 403 and nothing is asked
  of the server. The URL printed at start carries the token in its fragment (#token=...), which browsers
  never send to any server; the page keeps it in the tab's sessionStorage, which belongs to this origin
  (this port) alone.
- No cookie: browsers send a cookie for 127.0.0.1 to every port of 127.0.0.1, so any other local web
  server the admin's browser visited received the token (found by a QA pass, which aborted a job with it).
  Another origin can neither read this page's storage nor set the header (no CORS is answered).
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ...errors import FedkitError, ServerUnreachable
from .backend import AUDIT_MAX_RECORDS, Hub

TOKEN_HEADER = "x-fedkit-token"
EVENTS_PATH = "/api/events"
_JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")  # as runtime.admin.client's: a job id, nothing else
FORBIDDEN_HINT = "forbidden: open the URL that `fl_admin.sh dashboard` printed (it carries this start's token)"
# The page loads only its own files: no inline script, no other origin, and it may not be framed.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "x-frame-options": "DENY",
}


class _TokenGate:
    """ASGI middleware: every /api/ request needs the token, in the X-Fedkit-Token header (or, for the live
    feed only, the `token` query parameter). A refused request gets 403 before any route runs, so no
    command reaches the server for it."""

    def __init__(self, app: ASGIApp, token: str):
        self._app = app
        self._token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # no websocket route exists; refuse rather than pass anything unchecked
            return
        request = Request(scope)
        allowed = not request.url.path.startswith("/api/") or self._same(request.headers.get(TOKEN_HEADER))
        if request.url.path == EVENTS_PATH and request.method == "GET":
            allowed = allowed or self._same(request.query_params.get("token"))
        if not allowed:
            await PlainTextResponse(FORBIDDEN_HINT, status_code=403, headers=SECURITY_HEADERS)(scope, receive, send)
            return
        await self._app(scope, receive, _with_headers(send))

    def _same(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode(), self._token.encode())


def _with_headers(send: Send) -> Send:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            present = {k.lower() for k, _ in message.get("headers", [])}
            extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in present]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


def _static_dir() -> str:
    return str(resources.files(__package__) / "static")


def create_app(hub: Hub, token: str, session: dict[str, Any]) -> Starlette:
    """The ASGI app for one start. `session` is the server's `help` answer for this admin (its role and the
    commands the role may run): the page shows abort/clone only where the server would allow them."""
    index_html = (resources.files(__package__) / "static" / "index.html").read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        return HTMLResponse(index_html)  # code only: the study's data comes from /api/ with the token

    async def whoami(request: Request) -> Response:
        return JSONResponse(session)

    async def events(request: Request) -> Response:
        job_id = request.query_params.get("job") or None
        if job_id is not None and not _JOB_ID.fullmatch(job_id):
            return PlainTextResponse("job: not a job id (letters, digits, '.', '_', '-')", status_code=400)

        async def stream() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            async for event, text in hub.subscribe(job_id):
                yield ": keepalive\n\n" if event == "keepalive" else f"event: {event}\ndata: {text}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    async def audit(request: Request) -> Response:
        try:
            n = min(max(int(request.query_params.get("n", "100")), 1), AUDIT_MAX_RECORDS)
        except ValueError:
            return PlainTextResponse(f"n: a whole number from 1 to {AUDIT_MAX_RECORDS}", status_code=400)
        return await _forward(hub, "show_audit", n=n)

    def job_action(command: str) -> Any:
        async def act(request: Request) -> Response:
            job_id = request.path_params["job_id"]
            if not _JOB_ID.fullmatch(job_id):
                return JSONResponse({"error": "not a job id (letters, digits, '.', '_', '-')"}, status_code=400)
            return await _forward(hub, command, job_id=job_id)

        return act

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/api/session", whoami, methods=["GET"]),
        Route(EVENTS_PATH, events, methods=["GET"]),
        Route("/api/audit", audit, methods=["GET"]),
        Route("/api/jobs/{job_id}/abort", job_action("abort_job"), methods=["POST"]),
        Route("/api/jobs/{job_id}/clone", job_action("clone_job"), methods=["POST"]),
        Mount("/static", StaticFiles(directory=_static_dir()), name="static"),
    ]
    middleware = [
        Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost"]),
        Middleware(_TokenGate, token=token),
    ]
    return Starlette(routes=routes, middleware=middleware)


async def _forward(hub: Hub, name: str, **args: Any) -> Response:
    """One admin command; the server's refusal comes back as its own line (403 when it denied the role)."""
    try:
        data = await hub.command(name, **args)
    except ServerUnreachable as e:
        return JSONResponse({"error": " ".join(str(e).split())}, status_code=502)
    except FedkitError as e:
        message = " ".join(str(e).split())
        return JSONResponse({"error": message}, status_code=403 if message.startswith("denied") else 409)
    return Response(json.dumps(data, default=str), media_type="application/json")
