"""A running job's checkpoint: where it is in its workflows and everything they need to go on, in one
file written atomically after every round. A server killed at any moment resumes from the last one:
the round in flight then runs again, and a resumed job ends with the same model as an uninterrupted one.

    models/checkpoint.safetensors   tensors "<group>::<name>" (the global model, optimizer moments,
                                    control variates), and in its metadata, as JSON: the workflow's index
                                    in the job's list, the job-wide step, the workflow's own state and the
                                    job's results so far (best round, best metric, ...)
    models/checkpoint-ref.<group>.<sha16>.safetensors
                                    a group the workflow hands over already serialized (the global model,
                                    runtime.model_bytes.SerializedModel): a hard link to the file it was
                                    written to (global.safetensors), named in the metadata with its SHA-256,
                                    so the model is written once per round, not twice. The global file is
                                    replaced by rename, and a replaced file is written over only while no
                                    other name links it (SerializedModel.save), so the link keeps the
                                    checkpointed round's bytes even after later rounds replace it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file as _st_load
from safetensors.numpy import save_file as _st_save

from ..errors import FedkitError
from ..model_bytes import SerializedModel
from ..weights import Weights, _contiguous

CHECKPOINT_FILE = "checkpoint.safetensors"
META_KEY = "fedkit_checkpoint"
SEPARATOR = "::"
REFS_KEY = "fedkit_checkpoint_refs"
REF_PREFIX = "checkpoint-ref."


class CheckpointUnreadable(FedkitError):
    """The checkpoint of a running job cannot be read (disk damage, a foreign file)."""


@dataclass
class Checkpoint:
    workflow_index: int = 0       # the workflow in progress (or the next one, when between two)
    step: int = 0                 # the last round (job-wide) whose results are in
    state: dict[str, Any] = field(default_factory=dict)       # the workflow's own state (JSON)
    results: dict[str, Any] = field(default_factory=dict)     # workflows.JobResults, as a dict
    # a group is tensors, or (when saving) the same tensors already serialized and written to a file
    tensors: dict[str, Weights | SerializedModel] = field(default_factory=dict)


def save_checkpoint(models_dir: Path, checkpoint: Checkpoint) -> None:
    flat = {f"{group}{SEPARATOR}{name}": arr for group, tensors in checkpoint.tensors.items()
            if not isinstance(tensors, SerializedModel) for name, arr in tensors.items()}
    refs = {group: _reference(models_dir, group, model) for group, model in checkpoint.tensors.items()
            if isinstance(model, SerializedModel)}
    meta = {k: v for k, v in asdict(checkpoint).items() if k != "tensors"}
    path = models_dir / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    _st_save(_contiguous(flat), str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True, default=_jsonable),
                                                     REFS_KEY: json.dumps(refs, sort_keys=True)})
    tmp.replace(path)
    keep = {ref["file"] for ref in refs.values()}
    for old in models_dir.glob(REF_PREFIX + "*"):  # the previous rounds' references, now unreferenced
        if old.name not in keep:
            old.unlink(missing_ok=True)


def _reference(models_dir: Path, group: str, model: SerializedModel) -> dict[str, str]:
    """Make `model`'s bytes available under a name of their own, by hard link to the file they were
    written to (no copy), or written out when there is none; returns its entry in the metadata."""
    name = f"{REF_PREFIX}{re.sub(r'[^A-Za-z0-9_-]', '_', group)}.{model.sha256[:16]}.safetensors"
    target = models_dir / name
    if not target.exists():
        tmp = target.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        try:
            if model.path is None:
                raise OSError("not written yet")
            os.link(model.path, tmp)
        except OSError:  # no file, or a file system without hard links
            if model.path is not None and model.path.exists():
                shutil.copyfile(model.path, tmp)
            else:
                model.write(tmp)
        tmp.replace(target)
    return {"file": name, "sha256": model.sha256}


def load_checkpoint(models_dir: Path) -> Checkpoint | None:
    """The last checkpoint, or None for a job that has not finished a round yet."""
    path = models_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            meta = json.loads(metadata[META_KEY])
            refs = json.loads(metadata.get(REFS_KEY, "{}"))
        flat = _st_load(str(path))
    except Exception as e:
        raise CheckpointUnreadable(f"{path}: cannot resume from it: {e}") from None
    tensors: dict[str, Weights | SerializedModel] = {}
    for key, arr in flat.items():
        group, _, name = key.partition(SEPARATOR)
        tensors.setdefault(group, {})[name] = arr  # type: ignore[index]
    for group, ref in refs.items():
        tensors[group] = _load_reference(path, models_dir / ref["file"], ref["sha256"])
    return Checkpoint(tensors=tensors, **meta)


def _load_reference(checkpoint: Path, path: Path, sha256: str) -> Weights:
    """The referenced model, hashed a chunk at a time and then read once into the arrays' buffer: a 2 GB
    model costs 2 GB on resume, not twice that."""
    try:
        model = SerializedModel.read(path)
        if model.sha256 != sha256:
            raise CheckpointUnreadable(f"{checkpoint}: cannot resume from it: {path.name} does not match the "
                                       "SHA-256 the checkpoint recorded (changed on disk)")
        return model.weights()
    except OSError as e:
        raise CheckpointUnreadable(f"{checkpoint}: cannot resume from it: {path.name} unreadable "
                                   f"({e.strerror})") from None
    except CheckpointUnreadable:
        raise
    except Exception as e:
        raise CheckpointUnreadable(f"{checkpoint}: cannot resume from it: {path.name}: {e}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"not JSON: {type(value).__name__}")
