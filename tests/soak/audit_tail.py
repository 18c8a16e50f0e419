"""Following the server's audit log as it grows: new complete records since the last call. The log
survives server restarts (the chain goes on), so one reader follows the whole soak."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class AuditTail:
    def __init__(self, path: Path):
        self.path = path
        self._offset = 0

    def new(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        self._offset += end
        return [json.loads(line) for line in data[:end].split(b"\n") if line.strip()]
