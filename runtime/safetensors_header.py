"""A safetensors file's header alone: names, dtypes and shapes without NumPy and without reading the data.

The site daemon checks what a job's code wrote against the model it received before anything else reads it
(runtime/client/outgoing.py); a daemon that sends weights as they are never imports NumPy for it. The full
checks of the tensors' offsets and values are runtime.weights'.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UpdateRejected

MAX_HEADER_BYTES = 100 << 20  # larger headers are refused unread

Layout = dict[str, tuple[str, tuple[int, ...]]]


def read_layout(path: Path) -> Layout:
    """name -> (safetensors dtype, shape) of every tensor of the file at `path`. Raises UpdateRejected naming
    the file when its header cannot be read."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            n_header = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 <= n_header <= min(MAX_HEADER_BYTES, path.stat().st_size - 8):
                raise ValueError("bad header length")
            header = json.loads(f.read(n_header))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        return {str(name): (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
                for name, info in header.items() if name != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        raise UpdateRejected(f"{path.name}: not a valid safetensors file") from None
