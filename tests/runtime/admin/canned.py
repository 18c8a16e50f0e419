"""The admin console against canned server replies: what it prints for a command line."""

from __future__ import annotations

import asyncio
import io
from typing import Any

from rich.console import Console

from runtime.admin.console import AdminConsole


class CannedServer:
    """Answers each console command with the reply given for its name."""

    def __init__(self, replies: dict[str, Any]):
        self._replies = replies

    async def command(self, name: str, **args: Any) -> Any:
        return self._replies[name]


def printed(line: str, replies: dict[str, Any]) -> str:
    """What the console prints (200 columns, no markup) for `line`, the server answering with `replies`."""
    out = io.StringIO()
    console = AdminConsole(CannedServer(replies), Console(file=out, width=200, markup=False, highlight=False))  # type: ignore[arg-type]
    asyncio.run(console.run_line(line))
    return out.getvalue()
