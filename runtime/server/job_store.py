"""Jobs on the server's disk: the submitted archive, its record (state, submitter, timings, metrics)
and its outputs (models, per-round metrics). Everything a restart needs to resume lives here.

    <workspace>/jobs/<job_id>/
        job.zip  spec.json  record.json  progress.json  metrics.jsonl
        code_signature.json   (a signed job: the admin's signature over its code hash, passed on to sites)
        models/initial.safetensors  global.safetensors  best.safetensors
    <workspace>/jobs/.incoming/     uploads being received (cleared when the store opens)

A job exists once its record.json does: `create` writes it last, so a reader never sees a record whose
archive or spec is missing. Records are replaced atomically, so a crash leaves the old one or the new one.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..errors import JobRejected

log = logging.getLogger(__name__)

CODE_SIGNATURE_FILE = "code_signature.json"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"


FINAL_STATES = (JobState.FINISHED, JobState.FAILED, JobState.ABORTED)


@dataclass
class JobRecord:
    job_id: str
    name: str
    state: JobState
    submitter: str
    submitter_org: str
    submitter_role: str
    submitted_at: float
    job_sha256: str
    config_hash: str
    overrides: list[str] = field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None
    rounds_done: int = 0
    rounds_total: int = 0
    error: str = ""
    best_round: int | None = None
    best_metric: float | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)
    sites: list[str] = field(default_factory=list)
    code_sha256: str = ""  # runtime.job_code hash of the archive: what sites approve; overrides are separate
    code_signed_by: str = ""  # the admin whose signature over code_sha256 came with the job, if any
    seq: int = 0  # submission order; unlike submitted_at it survives a wall clock stepped back

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        data = {k: v for k, v in data.items() if k in _RECORD_FIELDS}  # a newer server's extra fields
        data["state"] = JobState(data["state"])
        return cls(**data)

    @property
    def queue_key(self) -> tuple[int, float, str]:
        return self.seq, self.submitted_at, self.job_id


_RECORD_FIELDS = frozenset(JobRecord.__dataclass_fields__)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


MAX_JOB_ID_CHARS = 64


class JobStore:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._unreadable: dict[Path, int] = {}  # damaged records already logged, with the version logged
        # uploads stream here, beside the job folders (same file system: a finished one is moved, not copied);
        # a dot folder is never a job (job_dir refuses such ids)
        self.incoming_dir = root / ".incoming"
        shutil.rmtree(self.incoming_dir, ignore_errors=True)  # half-received uploads of a previous run
        self.incoming_dir.mkdir()

    def job_dir(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith(".") or len(job_id) > MAX_JOB_ID_CHARS:
            raise JobRejected(f"no such job '{job_id[:MAX_JOB_ID_CHARS]}'")
        return self.root / job_id

    def create(self, archive: bytes, spec_json: str, record: JobRecord,
               code_signature: dict[str, Any] | None = None) -> JobRecord:
        """Store a new job; its record goes last, so the scheduler never sees a job without its spec."""
        d = self.job_dir(record.job_id)
        (d / "models").mkdir(parents=True)
        (d / "job.zip").write_bytes(archive)
        (d / "spec.json").write_text(spec_json)
        if code_signature is not None:
            _write_json(d / CODE_SIGNATURE_FILE, code_signature)
        self.save(record)
        return record

    def create_from_file(self, archive: Path, spec_json: str, record: JobRecord,
                         code_signature: dict[str, Any] | None = None, initial_model: Path | None = None) -> JobRecord:
        """Like create, moving an uploaded archive (in incoming_dir) into the job's folder, and an uploaded
        initial model, if one came, to models/initial.safetensors (the initial-model workflow's file)."""
        d = self.job_dir(record.job_id)
        (d / "models").mkdir(parents=True)
        os.replace(archive, d / "job.zip")
        if initial_model is not None:
            os.replace(initial_model, d / "models" / "initial.safetensors")
        (d / "spec.json").write_text(spec_json)
        if code_signature is not None:
            _write_json(d / CODE_SIGNATURE_FILE, code_signature)
        self.save(record)
        return record

    def stored_bytes(self, job_id: str) -> int:
        """What the job takes on disk (archive and outputs); 0 for one being deleted."""
        try:
            return self.output_bytes(job_id)
        except OSError:
            return 0

    @staticmethod
    def new_id() -> str:
        return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)

    def next_seq(self) -> int:
        """One more than the highest submission number on disk (callers serialise submissions)."""
        return max((r.seq for r in self.all()), default=0) + 1

    def save(self, record: JobRecord) -> None:
        _write_json(self.job_dir(record.job_id) / "record.json", asdict(record))

    def load(self, job_id: str) -> JobRecord:
        path = self.job_dir(job_id) / "record.json"
        if not path.exists():
            raise JobRejected(f"no such job '{job_id}'")
        try:
            return JobRecord.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as e:  # not an internal error: a file to repair
            raise JobRejected(f"job {job_id}: its record {path} cannot be read ({e}); restore it from a backup, "
                              "or move the job's folder away") from None

    def all(self) -> list[JobRecord]:
        """Every job, in submission order. An unreadable record is logged and skipped, not fatal: one
        damaged job folder must not take the scheduler or list_jobs down."""
        records = []
        for d in sorted(self.root.iterdir()):
            path = d / "record.json"
            try:
                records.append(JobRecord.from_json(json.loads(path.read_text())))
            except FileNotFoundError:
                continue  # not a job yet (being created), or being deleted
            except (OSError, ValueError, TypeError, KeyError) as e:
                self._report_unreadable(path, e)
        return sorted(records, key=lambda r: r.queue_key)

    def _report_unreadable(self, path: Path, error: Exception) -> None:
        """Once per file and version: the scheduler reads every record twice a second while idle, and one
        damaged record logged each time filled the log (about 170,000 lines a day)."""
        try:
            version = path.stat().st_mtime_ns
        except OSError:
            version = 0
        if self._unreadable.get(path) != version:
            self._unreadable[path] = version
            log.error("%s: unreadable job record skipped (%s); restore it from a backup, or move the job's "
                      "folder away", path, error)

    def archive(self, job_id: str) -> bytes:
        return (self.job_dir(job_id) / "job.zip").read_bytes()

    def code_signature(self, job_id: str) -> dict[str, Any] | None:
        """The signature over the job's code that came with it (checked at submit), or None."""
        path = self.job_dir(job_id) / CODE_SIGNATURE_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def models_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "models"

    def append_metrics(self, job_id: str, entry: dict[str, Any]) -> None:
        with (self.job_dir(job_id) / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")

    def keep_metrics(self, job_id: str, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite metrics.jsonl (atomically) with only the entries `keep` accepts."""
        path = self.job_dir(job_id) / "metrics.jsonl"
        if not path.exists():
            return
        kept = [e for e in self.metrics(job_id) if keep(e)]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in kept))
        os.replace(tmp, path)

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        path = self.job_dir(job_id) / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def delete(self, job_id: str) -> None:
        """Remove the record first, so a reader sees the job gone rather than half deleted."""
        d = self.job_dir(job_id)
        (d / "record.json").unlink(missing_ok=True)
        shutil.rmtree(d)

    def output_bytes(self, job_id: str) -> int:
        """Bytes download_job would send (the folder's files but temporary ones, *.tmp), for a progress bar's
        total. A running job replaces files (models, checkpoint references) while this walks its folder: one
        gone is not counted."""
        return sum(_size_if_there(p) for p in self.output_files(job_id))

    def output_files(self, job_id: str) -> list[Path]:
        """What download_job sends of the job's folder: every path under it but temporary files (*.tmp: a
        file being written, the spare model a running job writes over); folders among them."""
        return [p for p in sorted(self.job_dir(job_id).rglob("*")) if not p.name.endswith(".tmp")]


def _size_if_there(path: Path) -> int:
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0
