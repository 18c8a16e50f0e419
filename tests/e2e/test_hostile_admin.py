"""A hostile admin against a real server: every trick is refused with one clear line and an audit record,
the server's memory stays bounded, and it keeps serving.

One server (no sites: none of this needs them) from real kits, with a lead who submits and a read-only
member. The hostile requests go over the real admin port with the admins' real certificates, built by
hand where the console would refuse them before sending (alias bomb, zip bomb, a non-zip upload). The
module fixture runs every case once and records the outcome; each test then checks one case.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
import shutil
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from provision.cli import app
from provision.local_study import LocalStudy
from runtime.proto import fedkit_pb2 as pb
from runtime.transport import CHUNK_BYTES, TlsFiles, admin_stub, open_channel

from ..conftest import EXAMPLE_PROJECT, JOB_TEMPLATE

LEAD, MEMBER = "lead@study.org", "member@hospital-b.org"
RPC_S = 120.0
ARCHIVE_LIMIT_BYTES = 64 << 20  # the server's max_job_archive_bytes here: the oversized case stays cheap
BIG_JOB_BYTES = 56 << 20  # each of the concurrent uploads: under the limit, so each is stored
N_CONCURRENT = 4
MAX_JOBS = N_CONCURRENT + 1  # the quota: the concurrent jobs and one more
RSS_GROWTH_BOUND_KB = 300 << 10  # generous: the old server held each upload twice (4 x 2 x 56 MiB)
MAX_AUDIT_RECORD_BYTES = 4096


@dataclass
class Outcome:
    ok: bool
    message: str
    audit: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Run:
    outcomes: dict[str, Outcome]
    rss_before_kb: int
    rss_after_kb: int
    still_serving: Any
    console_submit: Any
    quota_refusal: str
    server_log: str
    audit_path: Path


# ---- building hostile archives -----------------------------------------------------------------------

def _job_files() -> dict[str, bytes]:
    return {p.relative_to(JOB_TEMPLATE).as_posix(): p.read_bytes() for p in sorted(JOB_TEMPLATE.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _zip(files: dict[str, bytes], stored: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data, compress_type=zipfile.ZIP_STORED if name in stored else zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def _alias_bomb() -> bytes:
    lines = ["learner: {path: 'learner:TabularLearner'}", "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 8) + "]" for i in range(1, 8)]
    return ("\n".join(lines) + "\n").encode()


def _zip_bomb() -> bytes:
    return _zip({**_job_files(), "meta.yml": b"name: bomb\n" + b" " * (100 << 20)})


def _big_job(seed: int) -> bytes:
    pad = random.Random(seed).randbytes(BIG_JOB_BYTES)  # incompressible: the archive is as big as its data
    return _zip({**_job_files(), "custom/weights.bin": pad}, stored=("custom/weights.bin",))


# ---- the admin port, by hand ---------------------------------------------------------------------------

def _tls(kit: Path) -> TlsFiles:
    startup = kit / "startup"
    return TlsFiles(startup / "client.crt", startup / "client.key", startup / "rootCA.pem")


async def _upload(tls: TlsFiles, port: int, archive: bytes, args: dict[str, Any] | None = None) -> pb.AdminReply:
    async def chunks() -> AsyncIterator[pb.UploadChunk]:
        header = pb.AdminRequest(command="submit_job", args_json=json.dumps(args or {"overrides": []}))
        yield pb.UploadChunk(header=header)
        for start in range(0, len(archive), CHUNK_BYTES):
            yield pb.UploadChunk(data=archive[start:start + CHUNK_BYTES])

    channel = open_channel(tls, "localhost", port)
    try:
        return await admin_stub(channel).Upload(chunks(), timeout=RPC_S)
    finally:
        await channel.close()


async def _command(tls: TlsFiles, port: int, command: str, args_json: str) -> pb.AdminReply:
    channel = open_channel(tls, "localhost", port)
    try:
        return await admin_stub(channel).Command(pb.AdminRequest(command=command, args_json=args_json),
                                                 timeout=RPC_S)
    finally:
        await channel.close()


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


class _Audit:
    def __init__(self, path: Path):
        self._path = path

    def mark(self) -> int:
        return self._path.stat().st_size

    def since(self, mark: int) -> list[dict[str, Any]]:
        with self._path.open("rb") as f:
            f.seek(mark)
            raw = f.read()
        assert all(len(line) <= MAX_AUDIT_RECORD_BYTES for line in raw.splitlines()), \
            f"an audit record over {MAX_AUDIT_RECORD_BYTES} bytes: {max(len(x) for x in raw.splitlines())}"
        return [json.loads(line) for line in raw.splitlines() if line.strip()]


# ---- the scenario --------------------------------------------------------------------------------------

def _edit(data: dict[str, Any]) -> None:
    kept = [p for p in data["participants"] if p.get("type") != "client"]
    data["participants"] = kept + [{"type": "client", "name": "site-1", "org": "hospital-a"},
                                   {"type": "admin", "name": MEMBER, "org": "hospital-b", "role": "member"}]


async def _cases(study: LocalStudy, audit: _Audit, pid: int) -> dict[str, Outcome]:
    lead, member, port = _tls(study.kits[LEAD]), _tls(study.kits[MEMBER]), study.admin_port
    job = _job_files()
    single = {
        "alias_bomb": lambda: _upload(lead, port, _zip({**job, "config_fed_client.yml": _alias_bomb()})),
        "zip_bomb": lambda: _upload(lead, port, _zip_bomb()),
        "oversized_upload": lambda: _upload(lead, port, b"\0" * (ARCHIVE_LIMIT_BYTES + CHUNK_BYTES)),
        "non_zip_upload": lambda: _upload(lead, port, b"this is a text file, not a zip\n" * 100),
        "member_huge_denied_args": lambda: _command(member, port, "abort_job", json.dumps(
            {"job_id": "20260101-000000-abcdef", "junk": ["y" * 1000] * 60})),
        "huge_args_over_the_edge_cap": lambda: _command(member, port, "abort_job", json.dumps(
            {"job_id": "x", "junk": "z" * (3 << 20)})),
        "overlong_job_id": lambda: _command(lead, port, "show_job", json.dumps({"job_id": "a" * 5000})),
        "malformed_job_id": lambda: _command(lead, port, "show_job", json.dumps({"job_id": "../../etc\x1b[2J"})),
        "overlong_command_name": lambda: _command(member, port, "x" * 100_000, "{}"),
    }
    outcomes: dict[str, Outcome] = {}
    for name, call in single.items():
        mark = audit.mark()
        reply = await call()
        outcomes[name] = Outcome(reply.ok, reply.message, audit.since(mark))
        print(f"{name}: server VmHWM {_vm_hwm_kb(pid)} kB")

    mark = audit.mark()
    archives = [_big_job(seed) for seed in range(N_CONCURRENT)]
    replies = await asyncio.gather(*(_upload(lead, port, a) for a in archives))
    del archives
    records = audit.since(mark)
    for i, reply in enumerate(replies):
        outcomes[f"concurrent_upload_{i}"] = Outcome(reply.ok, reply.message, records)
    return outcomes


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("hostile-admin")
    study = LocalStudy.create(EXAMPLE_PROJECT, root / "study", edit=_edit)
    try:
        study.write_local(study.server, "server.yml", {"max_job_archive_bytes": ARCHIVE_LIMIT_BYTES,
                                                       "max_jobs_per_admin": MAX_JOBS})
        study.start_server()
        ws = study.kits[study.server] / "workspace"
        pid = int((ws / "daemon.pid").read_text())
        assert study.admin_json("list_jobs", admin=LEAD) == []  # up, and its start-up memory touched
        before = _vm_hwm_kb(pid)
        outcomes = asyncio.run(_cases(study, _Audit(ws / "audit.jsonl"), pid))
        after = _vm_hwm_kb(pid)
        print(f"\nserver VmHWM: {before} kB before the hostile admin, {after} kB after "
              f"(+{(after - before) / 1024:.1f} MiB)")
        still_serving = study.admin_json("check_status server", admin=MEMBER)
        job = root / "job"
        shutil.copytree(JOB_TEMPLATE, job)
        console_submit = study.admin_json(f"submit_job {job}", admin=LEAD)
        over = study.admin(f"submit_job {job}", admin=LEAD, as_json=False)
        assert study.stop(study.server) == 0
        yield Run(outcomes, before, after, still_serving, console_submit, over.stderr.strip(),
                  (ws / "log.txt").read_text(), ws / "audit.jsonl")
    finally:
        study.stop_all()


# ---- what a user relies on ------------------------------------------------------------------------------

REFUSALS = {  # case -> words the one line must hold
    "alias_bomb": ["config_fed_client.yml", "aliases", "not allowed"],
    "zip_bomb": ["meta.yml", "larger than"],
    "oversized_upload": ["larger than", str(ARCHIVE_LIMIT_BYTES)],
    "non_zip_upload": ["not a valid zip"],
    "member_huge_denied_args": ["member"],
    "huge_args_over_the_edge_cap": ["limit"],
    "overlong_job_id": ["job id", "malformed"],
    "malformed_job_id": ["job id", "malformed"],
    "overlong_command_name": ["unknown command"],
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_each_hostile_request_is_refused_in_one_clear_line_and_audited(run: Run, case: str) -> None:
    outcome = run.outcomes[case]

    assert not outcome.ok
    assert "\n" not in outcome.message and len(outcome.message) <= 1100, outcome.message[:300]
    assert "internal" not in outcome.message, outcome.message
    assert all(w in outcome.message for w in REFUSALS[case]), outcome.message
    outcomes = [r for r in outcome.audit if r["event"] == "admin_command"]
    assert len(outcomes) == 1 and outcomes[0]["result"] == "error", outcome.audit
    assert outcomes[0]["error"] and outcomes[0]["error"][:40] in outcome.message


def test_state_changing_requests_are_audited_before_they_act(run: Run) -> None:
    for case in ("alias_bomb", "zip_bomb", "oversized_upload", "non_zip_upload"):
        events = [r["event"] for r in run.outcomes[case].audit]
        assert events == ["admin_request", "admin_command"], (case, events)
    # a role that may not run the command does nothing: its denial is the record (a request record each
    # time let a member's script write the trail at its own pace)
    events = [r["event"] for r in run.outcomes["member_huge_denied_args"].audit]
    assert events == ["admin_command"], events


def test_huge_arguments_are_cut_in_the_audit_trail_with_a_marker(run: Run) -> None:
    record = run.outcomes["member_huge_denied_args"].audit[-1]
    assert record["allowed"] is False and record["admin"] == MEMBER
    assert "cut" in json.dumps(record["args"])
    assert record["args"].get("job_id") == "20260101-000000-abcdef" or "_json_prefix" in record["args"]


def test_concurrent_large_uploads_are_all_stored_and_memory_stays_bounded(run: Run) -> None:
    uploads = [o for name, o in run.outcomes.items() if name.startswith("concurrent_upload_")]
    assert len(uploads) == N_CONCURRENT and all(o.ok for o in uploads), [o.message for o in uploads]
    growth_kb = run.rss_after_kb - run.rss_before_kb
    print(f"server VmHWM growth: {growth_kb / 1024:.1f} MiB (bound {RSS_GROWTH_BOUND_KB / 1024:.0f} MiB)")
    assert growth_kb < RSS_GROWTH_BOUND_KB


def test_the_server_keeps_serving_and_the_quota_refuses_in_one_line(run: Run) -> None:
    assert run.still_serving["server"]["queued"], "the accepted jobs are queued"
    assert run.console_submit["state"] == "queued"
    assert "quota" in run.quota_refusal and f"limit {MAX_JOBS} per admin" in run.quota_refusal
    assert "delete_job" in run.quota_refusal and "\n" not in run.quota_refusal


def test_the_audit_head_logged_at_shutdown_anchors_the_log_against_a_cut(run: Run, tmp_path: Path) -> None:
    heads = re.findall(r"audit log \S+: (\d+) records, head ([0-9a-f]{64})", run.server_log)
    assert len(heads) == 2, "one head logged at start and one at shutdown"
    count, head = heads[-1]
    anchored = ["audit", "verify", "--expect-head", head, "--expect-count", count]

    intact = CliRunner().invoke(app, [*anchored[:2], str(run.audit_path), *anchored[2:]])
    cut = tmp_path / "audit.jsonl"
    cut.write_bytes(b"".join(run.audit_path.read_bytes().splitlines(keepends=True)[:-2]))
    broken = CliRunner().invoke(app, [*anchored[:2], str(cut), *anchored[2:]])

    assert intact.exit_code == 0, intact.stderr
    assert broken.exit_code == 1 and broken.stderr.count("\n") == 1 and "missing" in broken.stderr, broken.stderr
