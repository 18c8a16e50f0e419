"""A running job's checkpoint: where it is in its workflows and everything they need to go on, in one
file written atomically after every round. A server killed at any moment resumes from the last one:
the round in flight then runs again, and a resumed job ends with the same model as an uninterrupted one.

    models/checkpoint.safetensors   tensors "<group>::<name>" (the global model, optimizer moments,
                                    control variates), and in its metadata, as JSON: the workflow's index
                                    in the job's list, the job-wide step, the workflow's own state and the
                                    job's results so far (best round, best metric, ...)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file as _st_load
from safetensors.numpy import save_file as _st_save

from ..errors import FedkitError
from ..weights import Weights, _contiguous

CHECKPOINT_FILE = "checkpoint.safetensors"
META_KEY = "fedkit_checkpoint"
SEPARATOR = "::"


class CheckpointUnreadable(FedkitError):
    """The checkpoint of a running job cannot be read (disk damage, a foreign file)."""


@dataclass
class Checkpoint:
    workflow_index: int = 0       # the workflow in progress (or the next one, when between two)
    step: int = 0                 # the last round (job-wide) whose results are in
    state: dict[str, Any] = field(default_factory=dict)       # the workflow's own state (JSON)
    results: dict[str, Any] = field(default_factory=dict)     # workflows.JobResults, as a dict
    tensors: dict[str, Weights] = field(default_factory=dict)


def save_checkpoint(models_dir: Path, checkpoint: Checkpoint) -> None:
    flat = {f"{group}{SEPARATOR}{name}": arr for group, tensors in checkpoint.tensors.items()
            for name, arr in tensors.items()}
    meta = {k: v for k, v in asdict(checkpoint).items() if k != "tensors"}
    path = models_dir / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    _st_save(_contiguous(flat), str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True, default=_jsonable)})
    tmp.replace(path)


def load_checkpoint(models_dir: Path) -> Checkpoint | None:
    """The last checkpoint, or None for a job that has not finished a round yet."""
    path = models_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
        flat = _st_load(str(path))
    except Exception as e:
        raise CheckpointUnreadable(f"{path}: cannot resume from it: {e}") from None
    tensors: dict[str, Weights] = {}
    for key, arr in flat.items():
        group, _, name = key.partition(SEPARATOR)
        tensors.setdefault(group, {})[name] = arr
    return Checkpoint(tensors=tensors, **meta)


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"not JSON: {type(value).__name__}")
