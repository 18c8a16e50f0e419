"""What a site's audit and log say when it refuses a job or a task fails, with ClientDaemon driven task by task
against a fake server (no network, no worker):

- every refusal by this site's own policy (local/job_policy.yml allowed_orgs / allowed_roles and `code:`,
  local/privacy.yml under `on_weaker_job: refuse` or a dp_budget) is one `job_refused` record with who
  submitted the job, its hashes and the reason; once per job, though the server tasks a refusing site again
  every round (and first with a `prepare`);
- the report of a failed task is audited as `error_reported`, never as `update_sent`, and the site's log says
  the server took a failure report, not that a result was accepted; the server gets the same message as ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from runtime import kit_config as kc
from runtime.audit import AuditLog
from runtime.client.daemon import ClientDaemon, _Task
from runtime.client.job_policy import JobPolicy
from runtime.client.privacy_policy import PrivacyPolicy
from runtime.job_code import code_hash_of_zip
from runtime.job_spec import ClientJobConfig, sha256_hex, zip_folder
from runtime.proto import fedkit_pb2 as pb
from runtime.task_config import TaskConfig

REPO = Path(__file__).resolve().parents[3]
JOB = REPO / "templates" / "jobs" / "tabular_classifier"
SUBMITTER = {"name": "lead@study.org", "org": "coordinating-center", "role": "lead"}
ARCHIVE = zip_folder(JOB)
# the server tasks a site that refused a job again: its prepare while round 0 runs elsewhere, then every round
TASKS = (("prepare", 0), ("train", 1), ("train", 2))


class FakeServer:
    """The two stubs the daemon calls for a task: GetJob streams the job's archive, SubmitResult takes the
    result stream (kept, message by message) and answers `accepted`."""

    def __init__(self, accepted: bool = True, reason: str = "") -> None:
        self.accepted, self.reason = accepted, reason
        self.results: list[list[bytes]] = []
        self.job_fetches = 0

    def GetJob(self, request: pb.GetJobRequest) -> AsyncIterator[Any]:  # noqa: N802 (the gRPC name)
        self.job_fetches += 1

        async def chunks() -> AsyncIterator[Any]:
            yield SimpleNamespace(data=ARCHIVE)

        return chunks()

    async def SubmitResult(self, chunks: AsyncIterator[bytes], timeout: float) -> Any:  # noqa: N802
        self.results.append([message async for message in chunks])
        return SimpleNamespace(accepted=self.accepted, reason=self.reason)


def _daemon(tmp_path: Path, server: FakeServer, policy: JobPolicy | None = None,
            privacy: PrivacyPolicy | None = None) -> ClientDaemon:
    kit = tmp_path / "kit"
    (kit / kc.STARTUP).mkdir(parents=True, exist_ok=True)
    (kit / kc.LOCAL).mkdir(exist_ok=True)
    (kit / kc.STARTUP / kc.ROOT_CA).write_text("not read by an approved_hashes rule\n")
    ws = kit / "workspace"
    ws.mkdir(exist_ok=True)
    cfg = kc.ClientKitConfig(project="study", name="site-1", org="org-site-1", server_host="127.0.0.1",
                             fed_learn_port=1)
    daemon = ClientDaemon(kit, cfg, kc.SiteLocalSettings(), ws, AuditLog(ws / "audit.jsonl"),
                          policy or JobPolicy(), asyncio.Event(), privacy=privacy)
    daemon._stub = daemon._bulk = server  # what run() would set from the channel
    daemon._session_id = "session-1"
    return daemon


def _task(daemon: ClientDaemon, job_id: str, name: str, round: int, config: TaskConfig | None = None,
          config_error: str = "") -> _Task:
    if config is None and not config_error:
        client = ClientJobConfig.model_validate(yaml.safe_load((JOB / "config_fed_client.yml").read_text()))
        config = TaskConfig(job_name="tabular", workflow="fedavg", rounds=2, client=client.model_dump(mode="json"),
                            submitter=SUBMITTER)
    header = pb.TaskHeader(task_id=f"{job_id}-{name}-{round}", job_id=job_id, task_name=name, round=round,
                           config_json=config.model_dump_json() if config else "", timeout_s=60,
                           job_sha256=sha256_hex(ARCHIVE))
    round_dir = daemon._ws / "jobs" / job_id / "inbox" / f"round_{round:04d}_{name}"
    round_dir.mkdir(parents=True, exist_ok=True)
    return _Task(header=header, round_dir=round_dir, payload_path=None, config=config, config_error=config_error)


def _run_tasks(daemon: ClientDaemon, job_id: str, tasks: tuple[tuple[str, int], ...] = TASKS, **kw: Any) -> None:
    async def go() -> None:
        for name, round in tasks:
            await daemon._do_task(_task(daemon, job_id, name, round, **kw))

    asyncio.run(go())


def _events(daemon: ClientDaemon, event: str) -> list[dict[str, Any]]:
    lines = (daemon._ws / "audit.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


REFUSALS = {
    "org": (dict(policy=JobPolicy(allowed_orgs=["org-site-1"])), "org_role",
            "site policy refuses job {job}: org 'coordinating-center' of lead@study.org is not allowed here"),
    "role": (dict(policy=JobPolicy(allowed_roles=["project_admin"])), "org_role",
             "site policy refuses job {job}: role 'lead' of lead@study.org may not run jobs here"),
    "code": (dict(policy=JobPolicy.model_validate({"code": {"approved_hashes": ["0" * 64]}})), "code",
             "site policy refuses job {job}: its code hash {code} is not in approved_hashes"),
    "privacy_floor": (dict(privacy=PrivacyPolicy.model_validate(
        {"on_weaker_job": "refuse", "gaussian_dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}})), "privacy",
        "site privacy policy refuses job {job}: it asks for no gaussian_dp"),
    "dp_budget": (dict(privacy=PrivacyPolicy.model_validate({"dp_budget": {"epsilon": 1.0, "delta": 1e-5}})),
                  "privacy", "site privacy policy refuses job {job}: this site has a DP budget"),
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_each_refusal_by_site_policy_is_one_job_refused_record(tmp_path: Path, kind: str) -> None:
    policies, rule, reason = REFUSALS[kind]
    server = FakeServer()
    daemon = _daemon(tmp_path, server, **policies)
    code = code_hash_of_zip(ARCHIVE)

    _run_tasks(daemon, "job-a")  # its prepare and two rounds: each refused again
    _run_tasks(daemon, "job-b", TASKS[1:])  # another job: its own record

    refused = _events(daemon, "job_refused")
    assert [r["job_id"] for r in refused] == ["job-a", "job-b"], "one record per refused job, not per task"
    for record, job in zip(refused, ("job-a", "job-b"), strict=True):
        assert record["submitter"] == SUBMITTER and record["job_name"] == "tabular"
        assert record["rule"] == rule
        assert record["reason"].startswith(reason.format(job=job, code=code)), record["reason"]
        assert record["job_sha256"] == sha256_hex(ARCHIVE)
        assert record["code_sha256"] == (code if kind == "code" else "")  # known only once the archive came
    # every task still fails with the reason, and each task but the prepare tells the server
    failed = [r for r in _events(daemon, "task_failed") if r["job_id"] == "job-a"]
    assert [(r["task"], r["round"]) for r in failed] == list(TASKS)
    # (the code rule's also says the site keeps the code for its IT to review)
    assert all(r["reason"].startswith(refused[0]["reason"]) for r in failed)
    assert len(server.results) == 4  # job-a rounds 1 and 2, job-b rounds 1 and 2
    assert _events(daemon, "job_received") == [] and _events(daemon, "update_sent") == []
    if kind != "code":
        assert server.job_fetches == 0, "refused before its archive is fetched"


def test_a_task_failure_that_is_no_refusal_writes_no_job_refused(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, FakeServer())
    _run_tasks(daemon, "job-a", (("train", 1),), config_error="task settings from the server unreadable at 'x'")
    assert _events(daemon, "job_refused") == []
    assert [r["reason"] for r in _events(daemon, "task_failed")] == ["task settings from the server unreadable at 'x'"]


def test_an_error_report_is_audited_as_one_and_never_as_an_update_sent(tmp_path: Path, caplog) -> None:
    server = FakeServer()
    daemon = _daemon(tmp_path, server, policy=JobPolicy(allowed_orgs=["org-site-1"]))
    caplog.set_level(logging.INFO, logger="fedkit.client")

    _run_tasks(daemon, "job-a", (("train", 1),))

    reason = ("site policy refuses job job-a: org 'coordinating-center' of lead@study.org is not allowed here "
              "(allowed orgs: org-site-1)")
    assert _events(daemon, "update_sent") == []
    (reported,) = _events(daemon, "error_reported")
    assert (reported["job_id"], reported["task"], reported["round"], reported["reason"]) == \
        ("job-a", "train", 1, reason)
    lines = [r.getMessage() for r in caplog.records if r.name == "fedkit.client"]
    assert not any("result accepted" in line for line in lines), lines
    assert f"job job-a train round 1 failed: {reason}" in lines
    assert "job job-a train round 1: the server took this site's failure report" in lines

    # the server gets one header with the error, no weights, no metrics, no trailer; a refusal by the site's
    # policy declines the whole job (the server tasks the site no more for it)
    (messages,) = server.results
    assert messages == [pb.ResultChunk(header=pb.ResultHeader(
        session_id="session-1", task_id="job-a-train-1", n_samples=0, metrics_json="{}", payload_bytes=0,
        error=reason, lease_id="", payload_sha256="", declines_job=True)).SerializeToString()]
    assert reported["declines_job"] is True


def test_an_error_report_the_server_refuses_is_not_called_a_refused_update(tmp_path: Path, caplog) -> None:
    daemon = _daemon(tmp_path, FakeServer(accepted=False, reason="result arrived after its round closed (late)"),
                     policy=JobPolicy(allowed_roles=["project_admin"]))
    caplog.set_level(logging.INFO, logger="fedkit.client")

    _run_tasks(daemon, "job-a", (("train", 1),))

    assert _events(daemon, "update_sent") == [] and _events(daemon, "update_refused_by_server") == []
    (refused,) = _events(daemon, "error_report_refused_by_server")
    assert refused["reason"] == "result arrived after its round closed (late)" and refused["task"] == "train"
    lines = [r.getMessage() for r in caplog.records if r.name == "fedkit.client"]
    assert ("job job-a train round 1: server refused this site's failure report: result arrived after its round "
            "closed (late)") in lines
    assert not any("result accepted" in line or "refused our result" in line for line in lines), lines


@pytest.mark.parametrize(("privacy", "refused"), [
    ({"gaussian_dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}}, "a filter floor"),
    ({"percentile": {"fraction": 0.5}}, "a filter floor"),
    ({"build_initial_model": False}, "build_initial_model: false"),
    ({"gaussian_dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}, "build_initial_model": True}, None),
    ({}, None),
], ids=["dp-floor", "percentile-floor", "said-no", "dp-floor-said-yes", "no-floor"])
def test_a_site_under_a_filter_floor_builds_no_round_0_model_from_job_code(tmp_path: Path, privacy: dict,
                                                                          refused: str | None) -> None:
    """A round-0 model's tensor names and shapes are the job's code's choice and pass every filter, so a
    site whose floor changes values refuses to build one, before any job code runs, unless it says yes."""
    server = FakeServer()
    daemon = _daemon(tmp_path, server, privacy=PrivacyPolicy.model_validate(privacy))
    _run_tasks(daemon, "job-a", (("init", 0),))
    reasons = [r["reason"] for r in _events(daemon, "job_refused")]
    if refused is None:
        assert reasons == [] and server.job_fetches == 1  # it went on to fetch the job (its worker then ran)
        return
    assert len(reasons) == 1 and refused in reasons[0] and "ship initial_model" in reasons[0], reasons
    assert server.job_fetches == 0, "refused before the job's archive is fetched"
    (messages,) = server.results
    assert b"ship initial_model" in messages[0]  # the site's own reason leaves
    # refusing to build round 0 is not refusing the job: the server must not leave the site out of its rounds
    header = pb.ResultChunk.FromString(messages[0]).header
    assert not header.declines_job


class _HeartbeatRecorder:
    def __init__(self) -> None:
        self.requests: list[pb.HeartbeatRequest] = []

    async def Heartbeat(self, request: pb.HeartbeatRequest, timeout: float) -> pb.HeartbeatReply:  # noqa: N802
        self.requests.append(request)
        return pb.HeartbeatReply()


def test_only_a_stop_asked_for_is_told_to_the_server_as_one(tmp_path: Path) -> None:
    # a daemon ending on a crash or a full disk must count as dead on the server, not as stopped by its site IT
    daemon = _daemon(tmp_path, FakeServer())
    daemon._registered_once = True
    daemon._stub = recorder = _HeartbeatRecorder()
    asyncio.run(daemon._say_stopping())
    assert recorder.requests == []
    daemon._stop.set()  # stop.sh's SIGTERM, a shutdown or restart asked by an admin
    asyncio.run(daemon._say_stopping())
    assert [(r.session_id, r.stopping) for r in recorder.requests] == [("session-1", True)]


class _SlowWorker:
    """A worker whose stop takes a while (SIGTERM, grace, SIGKILL): the daemon's other tasks run meanwhile."""

    def __init__(self, job_id: str, release: asyncio.Event | None = None) -> None:
        self.job_id, self._release = job_id, release
        self.killed = self.stopped = False

    def kill(self) -> None:
        self.killed = True

    async def stop(self) -> None:
        if self._release is not None:
            await self._release.wait()
        self.stopped = True


def test_an_abort_while_the_next_job_starts_leaves_that_job_alone(tmp_path: Path) -> None:
    # found by a hostile researcher aborting their own job while another's was queued: the next job's task
    # ran with the daemon's job reset to "" ("invalid id '' from the server", and its DP release charged to
    # no ledger), and the abort's stop could stop the next job's worker
    daemon = _daemon(tmp_path, FakeServer())

    async def scenario() -> tuple[str, _SlowWorker, _SlowWorker]:
        release = asyncio.Event()
        first = _SlowWorker("job-1", release)
        daemon._worker, daemon._job_id, daemon._round = first, "job-1", 3
        abort = asyncio.create_task(daemon._abandon_job("job-1"))
        await asyncio.sleep(0.01)  # the abort waits for job-1's worker to stop...
        second = _SlowWorker("job-2")
        daemon._worker, daemon._job_id, daemon._round = second, "job-2", 0  # ...while job-2's task begins
        release.set()
        await abort
        return daemon._job_id, first, second

    job_id, first, second = asyncio.run(scenario())
    assert first.killed and first.stopped
    assert job_id == "job-2" and daemon._worker is second and not (second.killed or second.stopped)


def test_a_spent_dp_budget_answers_no_validation_either_and_declines_the_job(tmp_path: Path) -> None:
    # a validation sends no weights, but the scores of weights the server chose read the data too: a
    # compromised server located every validation record by bisecting on hundreds of them, outside any budget
    privacy = PrivacyPolicy.model_validate({"gaussian_dp": {"noise_multiplier": 1.0, "clip_norm": 1.0},
                                            "dp_site_budget": {"epsilon": 0.1, "delta": 1e-5}})  # no release fits
    server = FakeServer()
    daemon = _daemon(tmp_path, server, privacy=privacy)
    _run_tasks(daemon, "invented-job", (("validate", 1),))
    (failed,) = _events(daemon, "task_failed")
    assert failed["task"] == "validate" and "DP budget for all jobs is exhausted" in failed["reason"]
    assert [r["budget"] for r in _events(daemon, "dp_budget_exhausted")] == ["dp_site_budget"]
    (reported,) = _events(daemon, "error_reported")
    assert reported["declines_job"] is True  # the server leaves the site out of the rest of the job
    assert server.job_fetches == 0 and _events(daemon, "update_sent") == []
