"""Start the dashboard for one admin kit: connect to the server as that admin (as the console does), bind
127.0.0.1, print the URL with this start's token, and serve until Ctrl-C (or SIGTERM).

The token travels in the URL's fragment (#token=...), which a browser never sends to a server. `--open`
hands the browser a private file that redirects to that URL, not the URL itself: a browser's command
line is readable by every user of the machine (/proc/PID/cmdline)."""

from __future__ import annotations

import asyncio
import contextlib
import html
import secrets
import socket
import sys
import tempfile
import webbrowser
from pathlib import Path

import uvicorn

from ...errors import ConfigError
from ..client import AdminClient
from .app import create_app
from .backend import Hub

HOST = "127.0.0.1"  # never another address: the page is for the person at this machine
SHUTDOWN_GRACE_S = 2.0  # open live feeds are cut after this on Ctrl-C
OPENER_KEEP_S = 60.0  # --open: the redirect file is deleted after the browser had this long to read it


def bind(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:port (0: a free port the system picks), with a one-line error."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: a port is 0 to 65535 (0: a free one)")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"--port {port}: cannot listen on {HOST}:{port} ({e.strerror}); "
                          "use --port 0 for a free port") from None
    sock.listen(64)
    return sock


class _Server(uvicorn.Server):
    """uvicorn waits for open responses to finish before it stops; the pages' live feeds never would, so
    they are ended first."""

    def __init__(self, config: uvicorn.Config, hub: Hub):
        super().__init__(config)
        self._hub = hub

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._hub.end_streams()
        await super().shutdown(sockets)


async def serve(kit: Path, port: int = 0, open_browser: bool = False) -> int:
    async with AdminClient(kit) as client:
        session = await client.command("help")  # the role's commands; fails here, in one line, if unreachable
        session = {**session, "project": client.config.project,
                   "server": f"{client.config.server_host}:{client.config.admin_port}"}
        sock = bind(port)
        actual_port = sock.getsockname()[1]
        token = secrets.token_urlsafe(32)
        hub = Hub(client)
        app = create_app(hub, token, session)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        server = _Server(config, hub)
        url = f"http://{HOST}:{actual_port}/#token={token}"
        print(f"fedkit dashboard for {session['admin']} ({session['role']}) on {session['server']}: {url}",
              flush=True)
        print("keep this URL to yourself (it lets its holder act as you); Ctrl-C stops the dashboard",
              file=sys.stderr, flush=True)
        if open_browser:
            opener = _redirect_file(url)
            webbrowser.open(opener.as_uri())
            asyncio.get_running_loop().call_later(OPENER_KEEP_S, _remove, opener)
        try:
            await server.serve(sockets=[sock])
        finally:
            await hub.close()
            sock.close()
            if open_browser:
                _remove(opener)
    return 0


def _remove(opener: Path) -> None:
    opener.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        opener.parent.rmdir()


def _redirect_file(url: str) -> Path:
    """A page (0600, in a 0700 folder) that sends the browser on to `url`, so the token is on no command line."""
    path = Path(tempfile.mkdtemp(prefix="fedkit-dashboard-")) / "open.html"
    target = html.escape(url, quote=True)
    path.write_text(f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0; url={target}">'
                    f'<title>fedkit dashboard</title><a href="{target}">open the fedkit dashboard</a>\n')
    path.chmod(0o600)
    return path
