"""Job intake on the server (runtime/server/upload_spool.py, job_quota.py, runner.py, job_store.py): uploads
stream to disk with their hash, per-admin quotas refuse with one line saying how to free them, and the
scheduler reads each job's spec once."""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from runtime.audit import AuditLog
from runtime.errors import JobRejected
from runtime.identity import Identity, Kind, Role
from runtime.job_spec import zip_folder
from runtime.server.job_quota import JobQuota
from runtime.server.job_store import JobStore
from runtime.server.registry import Registry
from runtime.server.runner import JobRunner
from runtime.server.taskboard import TaskBoard
from runtime.server.upload_spool import spool

T = TypeVar("T")
TEMPLATE = Path(__file__).resolve().parents[3] / "templates" / "jobs" / "tabular_classifier"
LEAD = Identity("lead@x.org", "x", Kind.ADMIN, Role.LEAD)
OTHER = Identity("other@x.org", "x", Kind.ADMIN, Role.LEAD)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro, debug=True)


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def _runner(tmp_path: Path, quota: JobQuota | None = None) -> JobRunner:
    return JobRunner(JobStore(tmp_path / "jobs"), TaskBoard(clock=lambda: 0.0), Registry(30.0, lambda: 0.0),
                     AuditLog(tmp_path / "audit.jsonl"), 1.5, quota=quota)


def _archive(tmp_path: Path, runner: JobRunner, padding_bytes: int = 0) -> Path:
    """The tabular job as an upload spooled into the store's incoming folder."""
    job = tmp_path / f"job-{padding_bytes}"
    if not job.exists():
        shutil.copytree(TEMPLATE, job)
        if padding_bytes:
            (job / "custom" / "pad.bin").write_bytes(random.Random(0).randbytes(padding_bytes))  # incompressible
    data = zip_folder(job)
    return _run(spool(_chunks(data), runner.store.incoming_dir, 1 << 30)).path


def test_an_upload_streams_to_a_file_in_the_store_with_its_hash(tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()

    spooled = _run(spool(_chunks(b"ab" * 1000, b"cd" * 1000), folder, 10_000))

    assert spooled.path.parent == folder and spooled.path.read_bytes() == b"ab" * 1000 + b"cd" * 1000
    assert (spooled.size_bytes, spooled.sha256) == (4000, hashlib.sha256(spooled.path.read_bytes()).hexdigest())


def test_an_upload_over_the_limit_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(JobRejected, match="larger than 3000 bytes"):
        _run(spool(_chunks(b"x" * 2000, b"x" * 2000), tmp_path, 3000))

    assert list(tmp_path.iterdir()) == []


def test_a_job_is_stored_from_its_spooled_file_which_is_moved_not_copied(tmp_path: Path) -> None:
    runner = _runner(tmp_path)
    path = _archive(tmp_path, runner)
    data = path.read_bytes()

    record = _run(runner.submit(LEAD, path, ["server.rounds=1"]))

    assert not path.exists()
    assert runner.store.archive(record.job_id) == data
    assert record.job_sha256 == hashlib.sha256(data).hexdigest()


def test_a_non_zip_upload_is_refused_in_one_line(tmp_path: Path) -> None:
    runner = _runner(tmp_path)
    path = runner.store.incoming_dir / "junk.upload"
    path.write_bytes(b"this is not a zip")

    with pytest.raises(JobRejected, match="not a valid zip"):
        _run(runner.submit(LEAD, path, []))


def test_the_job_count_quota_is_per_admin_and_says_how_to_free_it(tmp_path: Path) -> None:
    runner = _runner(tmp_path, JobQuota(max_jobs=2, max_bytes=1 << 30))
    for _ in range(2):
        _run(runner.submit(LEAD, _archive(tmp_path, runner), []))

    with pytest.raises(JobRejected, match=r"lead@x.org has 2 jobs stored \(limit 2 per admin\).*delete_job"):
        _run(runner.submit(LEAD, _archive(tmp_path, runner), []))
    _run(runner.submit(OTHER, _archive(tmp_path, runner), []))  # another admin's quota is their own

    job_id = next(r.job_id for r in runner.store.all() if r.submitter == LEAD.name)
    _run(runner.delete(job_id))
    _run(runner.submit(LEAD, _archive(tmp_path, runner), []))  # deleting frees it


def test_the_bytes_quota_counts_what_the_admin_stores(tmp_path: Path) -> None:
    runner = _runner(tmp_path, JobQuota(max_jobs=100, max_bytes=300_000))
    _run(runner.submit(LEAD, _archive(tmp_path, runner, padding_bytes=200_000), []))

    with pytest.raises(JobRejected, match=r"lead@x.org's jobs .*limit 300000 bytes per admin.*delete_job"):
        _run(runner.submit(LEAD, _archive(tmp_path, runner, padding_bytes=200_000), []))


def test_the_spec_is_read_once_per_job_and_forgotten_on_delete(tmp_path: Path) -> None:
    runner = _runner(tmp_path)
    record = _run(runner.submit(LEAD, _archive(tmp_path, runner), []))

    first = runner.spec(record.job_id)
    assert runner.spec(record.job_id) is first  # the scheduler's half-second ticks re-read nothing

    _run(runner.delete(record.job_id))
    with pytest.raises((JobRejected, OSError)):
        runner.spec(record.job_id)


def test_leftover_uploads_are_cleared_when_the_store_opens(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs")
    (store.incoming_dir / "half.upload").write_bytes(b"x")

    reopened = JobStore(tmp_path / "jobs")

    assert list(reopened.incoming_dir.iterdir()) == [] and reopened.all() == []


CUSTOM_AGGREGATOR = '''
import numpy as np

class HalfStep:
    """A job's own aggregator: moves the model half way towards the mean delta."""
    def __init__(self, factor=0.5):
        self.factor, self._sum, self._n = factor, None, 0
    def begin_round(self, model):
        self._sum, self._n = {k: np.zeros_like(v) for k, v in model.items()}, 0
    def fold(self, update):
        for k, v in update.delta.items():
            self._sum[k] += v
        self._n += 1
    @property
    def n_folded(self):
        return self._n
    def close_round(self, model):
        return {k: (v + self.factor * self._sum[k] / self._n).astype(v.dtype) for k, v in model.items()}
    def state(self):
        return {}
    def load_state(self, state):
        pass
    def task_extras(self):
        return {}
    def local_algorithm(self):
        return None
'''


def _custom_job(tmp_path: Path, runner: JobRunner) -> Path:
    job = tmp_path / "custom-job"
    shutil.copytree(TEMPLATE, job)
    (job / "custom" / "half_step.py").write_text(CUSTOM_AGGREGATOR)
    config = (job / "config_fed_server.yml").read_text()
    start = config.index("aggregator:")
    end = config.index("# Other aggregators")
    custom = "aggregator: {name: custom, path: 'half_step:HalfStep', args: {factor: 0.5}}\n"
    (job / "config_fed_server.yml").write_text(config[:start] + custom + config[end:])
    return _run(spool(_chunks(zip_folder(job)), runner.store.incoming_dir, 1 << 30)).path


def test_a_jobs_own_aggregator_is_refused_unless_the_server_allows_job_code(tmp_path: Path) -> None:
    runner = _runner(tmp_path)
    with pytest.raises(JobRejected, match="runs no job code.*allow_job_aggregators"):
        _run(runner.submit(LEAD, _custom_job(tmp_path, runner), []))
    assert runner.store.all() == []


def test_an_allowed_job_aggregator_is_loaded_from_the_jobs_custom_code(tmp_path: Path) -> None:
    import numpy as np

    from runtime.aggregators import Update

    runner = JobRunner(JobStore(tmp_path / "jobs"), TaskBoard(clock=lambda: 0.0), Registry(30.0, lambda: 0.0),
                       AuditLog(tmp_path / "audit.jsonl"), 1.5, allow_job_aggregators=True)
    record = _run(runner.submit(LEAD, _custom_job(tmp_path, runner), []))
    load = runner._aggregator_loader(record.job_id)
    aggregator = load(runner.spec(record.job_id).server.aggregator)
    model = {"w": np.zeros(2, np.float32)}
    aggregator.begin_round(model)
    aggregator.fold(Update(site="a", delta={"w": np.array([2.0, 4.0], np.float32)}, n_samples=1, weight=1.0))
    np.testing.assert_allclose(aggregator.close_round(model)["w"], [1.0, 2.0])
    audit = (tmp_path / "audit.jsonl").read_text()
    assert audit.count("job_code_loaded_on_server") == 1


def _hostile_archive(runner: JobRunner, extra: str, data: bytes = b"x", symlink: bool = False) -> Path:
    """The tabular job's files plus one `extra` entry, zipped by hand as only a hostile client would."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(TEMPLATE.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                zf.writestr(path.relative_to(TEMPLATE).as_posix(), path.read_bytes())
        info = zipfile.ZipInfo(extra)
        if symlink:
            info.external_attr = 0o120777 << 16
        zf.writestr(info, data)
    return _run(spool(_chunks(buf.getvalue()), runner.store.incoming_dir, 1 << 30)).path


@pytest.mark.parametrize(("extra", "symlink", "data", "expected"), [
    ("../../../../escape", False, b"x", "entry '../../../../escape' is unsafe"),
    ("/etc/cron.d/job", False, b"x", "entry '/etc/cron.d/job' is unsafe"),
    ("custom/link", True, b"/etc/passwd", "entry 'custom/link' is unsafe"),
    ("custom/huge.bin", False, bytes(300 << 20), "member 'custom/huge.bin' is larger than 268435456 bytes"),
], ids=["dotdot", "absolute", "symlink", "oversized-member"])
def test_an_archive_no_site_could_unpack_is_refused_at_submit(tmp_path: Path, extra: str, symlink: bool,
                                                               data: bytes, expected: str) -> None:
    # sent past the console (a hand-made Upload): the server queued it, and every site then refused it,
    # round after round; now it is refused once, at submit, and nothing is stored
    runner = _runner(tmp_path)
    with pytest.raises(JobRejected, match=expected):
        _run(runner.submit(LEAD, _hostile_archive(runner, extra, data, symlink), []))
    assert runner.store.all() == []
