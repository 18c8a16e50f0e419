"""Tamper-evident audit trail: append-only JSON Lines. Each record carries `hash`, the SHA-256 of its
own canonical JSON (without `hash`), and `prev`, the hash of the record before it. An edited record no
longer matches its own hash; a deleted or inserted one breaks the `prev` link of the record after it.
(Anyone able to rewrite the whole file from a point on can recompute the chain: copy the latest hash
elsewhere, e.g. `show_audit`, to anchor it. Deleting the last records leaves a chain that verifies:
the head (last hash) and record count, which servers and sites log at every start and stop, are the
anchors `fedkit audit verify --expect-head/--expect-count` checks a log against.)

Never logs secrets: callers pass only names, hashes and arguments a person typed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import AuditChainBroken

GENESIS = "0" * 64
log = logging.getLogger(__name__)


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str).encode()


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _parsed(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def _whole_record(line: bytes) -> bool:
    """Whether `line` is a record exactly as append() writes it (its own hash matching): one a crash left
    without its newline, not one cut off mid-write."""
    record = _parsed(line)
    return record is not None and record.get("hash") == record_hash(record) and _canonical(record) == line


@dataclass(frozen=True)
class Head:
    """Where a log stands: how many records it holds and the hash of the last (GENESIS when empty)."""

    records: int
    hash: str

    def __str__(self) -> str:
        return f"{self.records} records, head {self.hash}"


class AuditLog:
    """Appends records to one file. Safe to call from several threads; each append is flushed and
    fsynced so a crash loses at most the record being written."""

    def __init__(self, path: Path, clock: Callable[[], str] = _now_iso):
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._count = 0
        self._prev = self._last_hash()

    def _last_hash(self) -> str:
        """The hash to chain the next record to (and the record count). A record cut off by a crash
        mid-write (no final newline) is removed first, so the log stays verifiable: it was never complete."""
        if not self._path.exists() or self._path.stat().st_size == 0:
            return GENESIS
        data = self._path.read_bytes()
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            if _whole_record(data[keep:]):  # written whole, only its newline lost: keep it
                with self._path.open("ab") as f:
                    f.write(b"\n")
                data += b"\n"
            else:
                log.warning("audit log %s: removed %d bytes after its last record, a record a crash cut off "
                            "mid-write", self._path, len(data) - keep)
                with self._path.open("r+b") as f:
                    f.truncate(keep)
                data = data[:keep]
        lines = [ln for ln in data.split(b"\n") if ln.strip()]
        self._count = len(lines)
        if not lines:
            return GENESIS
        if not _whole_record(lines[-1]):  # chaining onto it would extend a log that no longer verifies
            raise AuditChainBroken(f"{self._path}:{len(lines)}: the last line is not an audit record as fedkit "
                                   "writes it; nothing is appended to a log that does not verify (fedkit audit "
                                   "verify names the damage)")
        return _parsed(lines[-1])["hash"]  # type: ignore[index]

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            record = {"time": self._clock(), "event": event, **fields, "prev": self._prev}
            record["hash"] = record_hash(record)
            # 0600 whatever the umask: the trail names jobs, sites and people
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                end = os.fstat(fd).st_size
                data = memoryview(_canonical(record) + b"\n")
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            except OSError:  # a full disk: a record half written would stop every later start; cut it off
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
            finally:
                os.close(fd)
            self._prev = record["hash"]
            self._count += 1
            return record

    def head(self) -> Head:
        """The record count and last hash: log them, so a log later cut at its end can be caught."""
        with self._lock:
            return Head(self._count, self._prev)

    def tail(self, n: int) -> list[dict[str, Any]]:
        if not self._path.exists():
            return []
        lines = [ln for ln in self._path.read_bytes().split(b"\n") if ln.strip()]
        return [json.loads(ln) for ln in lines[-n:]] if n > 0 else []

    @property
    def path(self) -> Path:
        return self._path


@dataclass(frozen=True)
class VerifyReport:
    records: int
    last_hash: str = GENESIS  # anchor it elsewhere: a log cut short at its end still verifies


def check_anchors(path: Path, report: VerifyReport, expect_head: str | None, expect_count: int | None) -> None:
    """Raise AuditChainBroken if a verified log lacks what an anchor logged earlier says it held: at least
    `expect_count` records, and `expect_head` as the hash of record number `expect_count` (of some record,
    without a count). A log that grew since is fine: a running server's log grows past every anchor."""
    if expect_count is not None and report.records < expect_count:
        raise AuditChainBroken(f"{path}: {report.records} records, expected {expect_count}: "
                               f"{expect_count - report.records} record(s) missing (the log was cut)")
    if expect_head is None:
        return
    want = expect_head.strip().lower()
    if expect_count is not None:
        got = _hash_of_record(path, expect_count)
        if got != want:
            raise AuditChainBroken(f"{path}: record {expect_count} has hash {got}, the anchor says {want}: the log "
                                   "was rewritten up to that point (or cut and written again)")
    elif want not in _hashes(path):
        raise AuditChainBroken(f"{path}: no record has hash {want}: the log was cut before that record, or "
                               "rewritten")


def _hashes(path: Path) -> Iterator[str]:
    for line in _lines(path):
        yield line.record["hash"] if line.record is not None else ""


def _hash_of_record(path: Path, number: int) -> str:
    """The hash of record `number` (1-based) of a log verify() passed; GENESIS for 0."""
    for i, digest in enumerate(_hashes(path), start=1):
        if i == number:
            return digest
    return GENESIS


@dataclass(frozen=True)
class _Line:
    lineno: int
    record: dict[str, Any] | None  # None: not a JSON object
    as_written: bool = True  # the bytes are exactly what append() writes for `record`


def _lines(path: Path) -> Iterator[_Line]:
    with path.open("rb") as f:
        yield from _lines_of(f)


def _lines_of(raw_lines: Iterable[bytes]) -> Iterator[_Line]:
    for lineno, raw in enumerate(raw_lines, start=1):
        line = raw.rstrip(b"\n")
        if not line:  # fedkit writes no empty line; tolerated, as a trailing one was
            continue
        record = _parsed(line)  # a line of spaces is not a record: verify names it
        # a duplicate key ("allowed":true,"allowed":false) parses to the last value and hashes fine, while
        # grep and a reader see the first: only the bytes append() writes count
        yield _Line(lineno, record, as_written=record is not None and _canonical(record) == line)


def verify(path: Path) -> VerifyReport:
    """Check the whole chain; raise AuditChainBroken naming the first line that does not follow, and
    saying what happened there where the neighbours tell (modified, inserted, or a record deleted)."""
    count, last = 0, GENESIS
    for line in _checked(path, _lines(path)):
        count, last = count + 1, line.record["hash"]  # type: ignore[index]
    return VerifyReport(records=count, last_hash=last)


def verified_records(path: Path) -> Iterator[dict[str, Any]]:
    """Each record in turn, once its place in the chain is checked as verify() checks it: raises
    AuditChainBroken at the first line that does not follow (a caller summarizing the records must then
    drop what it took from the ones before). One pass, one record in memory at a time. The log may be
    growing: a last line still being written (no newline yet) is left out, not called damage."""
    with path.open("rb") as f:
        whole = (raw for raw in f if raw.endswith(b"\n"))  # only the last line can lack its newline
        for line in _checked(path, _lines_of(whole)):
            yield line.record  # type: ignore[misc]


def _checked(path: Path, lines: Iterator[_Line]) -> Iterator[_Line]:
    """`lines` in turn, each once it follows the one before (one line of lookahead names what happened)."""
    before: _Link | None = None
    prev = _Link(0, GENESIS)
    current = next(lines, None)
    while current is not None:
        following = next(lines, None)
        _check_line(path, current, prev, before, following)
        before, prev = prev, _Link(current.lineno, current.record["hash"])  # type: ignore[index]
        yield current
        current = following


@dataclass(frozen=True)
class _Link:
    """A good record's line (0: the start of the log) and hash."""

    lineno: int
    hash: str

    def __str__(self) -> str:
        return f"line {self.lineno}" if self.lineno else "the start of the log"


def _check_line(path: Path, line: _Line, prev: _Link, before: _Link | None, following: _Line | None) -> None:
    """Raise AuditChainBroken unless `line` follows `prev`, the last good record (`before` is the one
    before that).

    A record whose successor links to `prev` was inserted; a record that links to `before` means the line
    between was inserted; any other broken link is a deletion (or a rewrite of the record before, with its
    hash recomputed: from the file alone the two look the same)."""
    where = f"{path}:{line.lineno}"
    record = line.record
    if record is None:
        raise AuditChainBroken(f"{where}: not a JSON record")
    next_links_past = following is not None and following.record is not None and \
        following.record.get("prev") == prev.hash
    if record.get("hash") == record_hash(record) and not line.as_written:
        raise AuditChainBroken(f"{where}: record was edited (its bytes are not what fedkit writes: a repeated key, "
                               "spaces or a CR; its content still hashes)")
    if record.get("hash") != record_hash(record):
        if next_links_past:
            raise AuditChainBroken(f"{where}: record was inserted (line {following.lineno} follows {prev})")
        raise AuditChainBroken(f"{where}: record was modified (its hash does not match its content)")
    if record.get("prev") == prev.hash:
        return
    if next_links_past:
        raise AuditChainBroken(f"{where}: chain broken: this record was inserted (line {following.lineno} "
                               f"follows {prev})")
    if before is not None and record.get("prev") == before.hash:
        raise AuditChainBroken(f"{where}: chain broken: {prev} was inserted (this record follows {before})")
    if not prev.lineno:
        raise AuditChainBroken(f"{where}: chain broken: the log does not start here (its first records were "
                               "deleted)")
    raise AuditChainBroken(f"{where}: chain broken: this record does not follow {prev} (a record was deleted "
                           f"just before this line, or {prev} was rewritten)")
