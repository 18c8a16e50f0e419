"""Hostile or broken input against a real server: every case is refused with a clear log line and an
audit record, and the round it lands in goes on with the honest sites.

One study serves every case (so the file stays fast): site-1 is an honest daemon; site-2 is driven
in-process by this test with its real kit certificate, so the test controls exactly what it sends.
Site-2 registers, heartbeats, long-polls GetTask itself and answers each train round with one hostile
result; the job (tests/e2e/jobs/sleepy) has one round per case. Certificate cases (expired, not yet
valid, revoked, wrong kind for the port) run against the same server once the job is over.
The module fixture records what happened; each test then checks one case.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provision.local_study import LocalStudy, wait_until
from runtime.proto import fedkit_pb2 as pb
from runtime.transport import TlsFiles, admin_stub, federation_stub, open_channel
from runtime.weights import from_bytes, to_bytes

from ..conftest import EXAMPLE_PROJECT, with_sites

SLEEPY_JOB = Path(__file__).parent / "jobs" / "sleepy"
HONEST, HOSTILE, TO_REVOKE, SPARE = "site-1", "site-2", "site-3", "site-4"
MAX_N_SAMPLES = 1000
RPC_S = 15.0
SCENARIO_TIMEOUT_S = 150.0
RECORD_WAIT_S = RPC_S  # an upper bound only: a refusal's record usually lands before the reply

# One train round each; the reason must name what was wrong (case-insensitive substring).
ROUND_CASES: dict[str, str] = {
    "wrong_tensor_names": "unknown tensor",
    "wrong_shape": "shape",
    "wrong_dtype": "dtype",
    "nan": "nan",
    "inf": "inf",
    "more_bytes_than_declared": "longer than the declared",
    "fewer_bytes_than_declared": "ended after",
    "declared_size_over_limit": "exceeds the limit",
    "n_samples_zero": "n_samples",
    "n_samples_absurd": "max_n_samples",
    "replayed_result": "replay",
    "metric_name_with_escapes": "metric name",
    "metric_not_finite": "finite number",
}
# Sent while site-2 holds its round-1 task, before answering it; they use no task of their own.
SIDE_CASES: dict[str, str] = {
    "task_never_sent": "never sent",
    "malformed_protobuf": "",  # any clear refusal
}
CERT_CASES = ["expired", "not_yet_valid", "revoked", "client_cert_on_admin_port", "admin_cert_on_fed_port"]


@dataclass
class Outcome:
    """What one hostile case got back, and what the server wrote while handling it."""

    round: int | None = None
    accepted: bool | None = None
    reason: str = ""
    grpc_code: str = ""
    grpc_details: str = ""
    audit: list[dict[str, Any]] = field(default_factory=list)
    log: str = ""
    harness_error: str = ""  # the case could not be run (e.g. no task came): the test fails with this

    @property
    def refusal_text(self) -> str:
        return f"{self.reason} {self.grpc_details}".lower()


@dataclass
class Run:
    study: LocalStudy
    job_id: str
    final: dict[str, Any]
    rounds: list[dict[str, Any]]
    outcomes: dict[str, Outcome]


# ---- the server's records ----------------------------------------------------------------------------

def _whole_records(path: Path, start: int, text: str) -> list[dict[str, Any]]:
    """The audit records in `text`, read from `start` of a log the server is appending to: a mark taken
    while a record was being written falls inside it (the file grows a page at a time), and the last line
    may still be coming; neither is a record of the case."""
    if start:
        with path.open("rb") as f:
            f.seek(start - 1)
            if f.read(1) != b"\n":  # the mark fell inside a record begun before the case
                text = text.partition("\n")[2]
    lines = text.split("\n")[:-1]  # the part after the last newline is a record still being written
    return [json.loads(line) for line in lines if line.strip()]


class ServerRecords:
    """Audit records and log text the server appends, read as deltas around each case."""

    def __init__(self, study: LocalStudy):
        ws = study.kits[study.server] / "workspace"
        self.audit_path, self.log_path = ws / "audit.jsonl", ws / "log.txt"
        # grpc's C core logs what fedkit code never sees (e.g. failed handshakes) to stderr
        self.stderr_path = study.log_path(study.server)

    def mark(self) -> tuple[int, int, int]:
        return tuple(p.stat().st_size if p.exists() else 0
                     for p in (self.audit_path, self.log_path, self.stderr_path))  # type: ignore[return-value]

    def since(self, mark: tuple[int, int, int]) -> tuple[list[dict[str, Any]], str]:
        texts = []
        for path, start in zip((self.audit_path, self.log_path, self.stderr_path), mark, strict=True):
            with path.open("rb") as f:
                f.seek(start)
                texts.append(f.read().decode(errors="replace"))
        return _whole_records(self.audit_path, mark[0], texts[0]), texts[1] + texts[2]

    async def capture(self, outcome: Outcome, action: Callable[[], Awaitable[pb.SubmitReply | None]],
                      expect_audit: bool = True) -> None:
        """Run `action`, keeping its reply (or gRPC error) and the records the server wrote meanwhile."""
        mark = self.mark()
        try:
            reply = await action()
            if reply is not None:
                outcome.accepted, outcome.reason = reply.accepted, reply.reason
        except grpc.aio.AioRpcError as e:
            outcome.grpc_code, outcome.grpc_details = e.code().name, e.details() or ""
        except Exception as e:  # the harness itself failed: say so in the test that reads this case
            outcome.harness_error = f"{type(e).__name__}: {e}"
        if expect_audit:  # records are written before the reply, but a handshake failure has no reply
            with contextlib.suppress(TimeoutError):
                await asyncio.to_thread(wait_until, lambda: self.since(mark)[0], RECORD_WAIT_S, "an audit record")
        outcome.audit, outcome.log = self.since(mark)


# ---- site-2, in-process -------------------------------------------------------------------------------

def _tls(kit: Path) -> TlsFiles:
    startup = kit / "startup"
    return TlsFiles(startup / "client.crt", startup / "client.key", startup / "rootCA.pem")


class HostileSite:
    """A site that speaks the Federation protocol by hand, with a real site certificate."""

    def __init__(self, tls: TlsFiles, port: int):
        self.channel = open_channel(tls, "localhost", port)
        self.stub = federation_stub(self.channel)
        self.session_id = ""
        self._heartbeat: asyncio.Task | None = None

    async def register(self) -> None:
        reply = await self.stub.Register(pb.RegisterRequest(runtime_version="hostile"), timeout=RPC_S)
        self.session_id = reply.session_id
        self._heartbeat = asyncio.create_task(self._heartbeat_loop())

    async def _heartbeat_loop(self) -> None:
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.stub.Heartbeat(pb.HeartbeatRequest(session_id=self.session_id), timeout=RPC_S)
            await asyncio.sleep(1.0)  # the protocol's own cadence, not a synchronisation

    async def next_task(self, timeout_s: float = 60.0) -> tuple[pb.TaskHeader, bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            stream = self.stub.GetTask(pb.GetTaskRequest(session_id=self.session_id, wait_s=5.0), timeout=RPC_S)
            header, data = None, bytearray()
            async for chunk in stream:
                kind = chunk.WhichOneof("kind")
                if kind == "header":
                    header = chunk.header
                elif kind == "data":
                    data += chunk.data
            if header is not None and header.task_name != "prepare":  # a prepare asks for no answer
                return header, bytes(data)
        raise TimeoutError(f"no task for {HOSTILE} within {timeout_s:g} s")

    async def submit(self, chunks: list[pb.ResultChunk]) -> pb.SubmitReply:
        async def stream() -> AsyncIterator[pb.ResultChunk]:
            for chunk in chunks:
                yield chunk

        return await self.stub.SubmitResult(stream(), timeout=RPC_S)

    async def submit_raw(self, messages: list[bytes]) -> pb.SubmitReply:
        """Bytes straight onto the SubmitResult stream, bypassing protobuf serialization."""
        call = self.channel.stream_unary("/fedkit.Federation/SubmitResult", request_serializer=lambda b: b,
                                         response_deserializer=pb.SubmitReply.FromString)

        async def stream() -> AsyncIterator[bytes]:
            for m in messages:
                yield m

        return await call(stream(), timeout=RPC_S)

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        await self.channel.close()

    def result(self, task_id: str, payload: bytes, n_samples: int = 10, declared: int | None = None,
               metrics: dict[str, Any] | None = None) -> list[pb.ResultChunk]:
        header = pb.ResultHeader(session_id=self.session_id, task_id=task_id, n_samples=n_samples,
                                 metrics_json=json.dumps(metrics or {}),
                                 payload_bytes=len(payload) if declared is None else declared,
                                 payload_sha256=hashlib.sha256(payload).hexdigest() if payload else "")
        return [pb.ResultChunk(header=header), *(pb.ResultChunk(data=payload[i:i + (1 << 20)])
                                                 for i in range(0, len(payload), 1 << 20))]


def _hostile_payload(case: str, model: dict[str, np.ndarray]) -> bytes:
    """The update a case sends; everything not named by the case is a valid zero delta."""
    delta = {k: np.zeros_like(v) for k, v in model.items()}
    first = next(iter(delta))
    if case == "wrong_tensor_names":
        delta = {f"not_{k}": v for k, v in delta.items()}
    elif case == "wrong_shape":
        delta[first] = np.zeros(delta[first].size + 1, dtype=delta[first].dtype)
    elif case == "wrong_dtype":
        delta = {k: v.astype(np.float64) for k, v in delta.items()}
    elif case == "nan":
        delta[first][0] = np.nan
    elif case == "inf":
        delta[first][-1] = np.inf
    return to_bytes(delta)


async def _side_cases(site: HostileSite, records: ServerRecords, outcomes: dict[str, Outcome], rnd: int) -> None:
    outcomes["task_never_sent"] = Outcome(round=rnd)
    await records.capture(outcomes["task_never_sent"],
                          lambda: site.submit(site.result(secrets.token_hex(12), b"")))
    outcomes["malformed_protobuf"] = Outcome(round=rnd)
    await records.capture(outcomes["malformed_protobuf"],
                          lambda: site.submit_raw([b"\x07garbage\xff", b"\x0a\xff\xff\xff\xff\x0f"]))


async def _round_case(site: HostileSite, case: str, header: pb.TaskHeader, model_bytes: bytes) -> pb.SubmitReply:
    model = from_bytes(model_bytes)
    payload = _hostile_payload(case, model)
    n_samples = {"n_samples_zero": 0, "n_samples_absurd": 10**15}.get(case, 10)
    metrics = {"metric_name_with_escapes": {"train": {"loss\x1b]0;pwned\x07": 0.1}},
               "metric_not_finite": {"train": {"loss": float("nan")}}}.get(case)
    chunks = site.result(header.task_id, payload, n_samples=n_samples, metrics=metrics)
    if case == "more_bytes_than_declared":
        chunks = site.result(header.task_id, payload, declared=len(payload) - 100)
    elif case == "fewer_bytes_than_declared":
        chunks = site.result(header.task_id, payload, declared=len(payload) + 100)
    elif case == "declared_size_over_limit":
        chunks = site.result(header.task_id, payload, declared=100 * len(model_bytes))
    elif case == "replayed_result":
        first = await site.submit(chunks)  # a good result first: it must be accepted ...
        if not first.accepted:
            raise AssertionError(f"the valid result before the replay was refused: {first.reason}")
    return await site.submit(chunks)  # ... and the identical second one refused


async def _hostile_job(study: LocalStudy, site: HostileSite, records: ServerRecords, job_dir: Path,
                       outcomes: dict[str, Outcome]) -> str:
    overrides = [f"server.rounds={len(ROUND_CASES)}", "meta.min_clients=1", f"meta.sites=[{HONEST},{HOSTILE}]",
                 f"server.max_n_samples={MAX_N_SAMPLES}", "server.round_timeout_s=30",
                 "client.learner.args.train_s=0"]
    sets = " ".join(f"--set {o}" for o in overrides)
    record = await asyncio.to_thread(study.admin_json, f"submit_job {job_dir} {sets}")
    for number, case in enumerate(ROUND_CASES, start=1):
        outcome = outcomes[case] = Outcome()
        try:
            header, model_bytes = await site.next_task()
        except Exception as e:
            outcome.harness_error = f"no task for this case: {type(e).__name__}: {e}"
            continue
        outcome.round = header.round
        if header.task_name != "train":
            outcome.harness_error = f"expected a train task, got '{header.task_name}' round {header.round}"
            continue
        if number == 1:
            await _side_cases(site, records, outcomes, header.round)
        await records.capture(outcome, lambda h=header, m=model_bytes, c=case: _round_case(site, c, h, m))
    # the validation round after the last train round: answer it plainly so the job can end
    with contextlib.suppress(Exception):
        header, _ = await site.next_task(timeout_s=40)
        if header.task_name == "validate":
            await site.submit(site.result(header.task_id, b"", n_samples=0,
                                          metrics={"validation": {"score": 0.0, "n_samples": 1.0}}))
    return record["job_id"]


# ---- certificates -----------------------------------------------------------------------------------

def _issue_like(real_cert: Path, ca_cert: Path, ca_key: Path, not_before: dt.datetime, not_after: dt.datetime,
                out_dir: Path) -> TlsFiles:
    """A fresh key and a certificate with the same subject and extensions as `real_cert`, signed by the
    study CA, valid only between the given times."""
    real = x509.load_pem_x509_certificate(real_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(real.subject).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after))
    for ext in real.extensions:
        if isinstance(ext.value, x509.SubjectKeyIdentifier):
            builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        else:
            builder = builder.add_extension(ext.value, ext.critical)
    cert = builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out_dir / "client.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (out_dir / "client.key").chmod(0o600)
    shutil.copyfile(ca_cert, out_dir / "rootCA.pem")
    return TlsFiles(out_dir / "client.crt", out_dir / "client.key", out_dir / "rootCA.pem")


async def _register_with(tls: TlsFiles, port: int) -> None:
    channel = open_channel(tls, "localhost", port)
    try:
        await federation_stub(channel).Register(pb.RegisterRequest(runtime_version="hostile"), timeout=RPC_S)
    finally:
        await channel.close()


async def _admin_command_with(tls: TlsFiles, port: int) -> None:
    channel = open_channel(tls, "localhost", port)
    try:
        await admin_stub(channel).Command(pb.AdminRequest(command="check_status", args_json="{}"), timeout=RPC_S)
    finally:
        await channel.close()


def _revoke(study: LocalStudy, site: str) -> None:
    done = subprocess.run([str(Path(sys.executable).parent / "fedkit"), "provision", "revoke", site,
                           "-p", str(study.root / "project.yml"), "-w", str(study.root / "workspace")],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"fedkit provision revoke failed: {done.stderr.strip()}")
    crl = study.root / "workspace" / study.project_name / "crl.pem"
    shutil.copyfile(crl, study.kits[study.server] / "local" / "crl.pem")


async def _cert_cases(study: LocalStudy, records: ServerRecords, tmp: Path, outcomes: dict[str, Outcome]) -> None:
    state = study.root / "workspace" / study.project_name / "state"
    now = dt.datetime.now(dt.UTC)
    spare_cert = study.kits[SPARE] / "startup" / "client.crt"
    windows = {"expired": (now - dt.timedelta(days=30), now - dt.timedelta(days=1)),
               "not_yet_valid": (now + dt.timedelta(days=1), now + dt.timedelta(days=30))}
    for case, (start, end) in windows.items():
        tls = _issue_like(spare_cert, state / "rootCA.pem", state / "rootCA.key", start, end, tmp / case)
        outcomes[case] = Outcome()
        await records.capture(outcomes[case], lambda t=tls: _register_with(t, study.fed_learn_port))

    revoked = outcomes["revoked"] = Outcome()
    try:
        await _register_with(_tls(study.kits[TO_REVOKE]), study.fed_learn_port)  # admitted before revocation
        await asyncio.to_thread(_revoke, study, TO_REVOKE)
    except Exception as e:
        revoked.harness_error = f"could not set up the revocation: {type(e).__name__}: {e}"
    else:
        await records.capture(revoked, lambda: _register_with(_tls(study.kits[TO_REVOKE]), study.fed_learn_port))

    outcomes["client_cert_on_admin_port"] = Outcome()
    await records.capture(outcomes["client_cert_on_admin_port"],
                          lambda: _admin_command_with(_tls(study.kits[HONEST]), study.admin_port))
    outcomes["admin_cert_on_fed_port"] = Outcome()
    await records.capture(outcomes["admin_cert_on_fed_port"],
                          lambda: _register_with(_tls(study.kits[study.admins[0]]), study.fed_learn_port))


# ---- the run -------------------------------------------------------------------------------------------

async def _scenario(study: LocalStudy, tmp: Path) -> tuple[str, dict[str, Outcome]]:
    records = ServerRecords(study)
    outcomes: dict[str, Outcome] = {}
    job_dir = tmp / "job"
    shutil.copytree(SLEEPY_JOB, job_dir)
    site = HostileSite(_tls(study.kits[HOSTILE]), study.fed_learn_port)
    try:
        await site.register()
        job_id = await _hostile_job(study, site, records, job_dir, outcomes)
    finally:
        await site.close()
    await asyncio.to_thread(study.admin_json, f"wait_job {job_id} 60", None, 90)
    await _cert_cases(study, records, tmp / "certs", outcomes)
    return job_id, outcomes


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("hostile")
    study = LocalStudy.create(EXAMPLE_PROJECT, tmp / "study", edit=with_sites([HONEST, HOSTILE, TO_REVOKE, SPARE]))
    study.write_local(study.server, "server.yml", {"heartbeat_timeout_s": 10.0})
    study.write_local(HONEST, "site.yml", {"heartbeat_interval_s": 1.0})
    try:
        study.start_server()
        study.start(HONEST)
        wait_until(lambda: any(s["site"] == HONEST and s["online"]
                               for s in study.admin_json("check_status client")["sites"]), 60, f"{HONEST} online")
        job_id, outcomes = asyncio.run(asyncio.wait_for(_scenario(study, tmp), SCENARIO_TIMEOUT_S))
        shown = study.admin_json(f"show_job {job_id}")
        final = shown["record"]
        rounds = [m for m in shown["metrics"] if m["type"] == "round"]
        yield Run(study=study, job_id=job_id, final=final, rounds=rounds, outcomes=outcomes)
    finally:
        study.stop_all()


def _outcome(run: Run, case: str) -> Outcome:
    outcome = run.outcomes.get(case)
    assert outcome is not None, f"case '{case}' never ran"
    assert not outcome.harness_error, outcome.harness_error
    return outcome


def _refusal_records(outcome: Outcome) -> list[dict[str, Any]]:
    return [r for r in outcome.audit if any(w in r["event"] for w in ("refused", "rejected", "denied"))]


# ---- the tests -------------------------------------------------------------------------------------------

def test_job_finishes_with_the_honest_site_in_every_round(run):
    assert run.final["state"] == "finished", run.final.get("error")
    assert [m["round"] for m in run.rounds] == list(range(1, len(ROUND_CASES) + 1))
    assert all(HONEST in m["sites"] for m in run.rounds)


@pytest.mark.parametrize("case", list(ROUND_CASES))
def test_hostile_result_is_refused_logged_audited_and_the_round_goes_on(run, case):
    outcome = _outcome(run, case)
    expected = ROUND_CASES[case]
    assert outcome.accepted is False, f"accepted (reply: {outcome.reason!r}, grpc: {outcome.grpc_code})"
    assert expected in outcome.refusal_text, f"reason does not say what was wrong: {outcome.refusal_text!r}"
    refusals = [r for r in _refusal_records(outcome) if r.get("site") == HOSTILE]
    assert refusals, f"no audit record of the refusal (new records: {[r['event'] for r in outcome.audit]})"
    assert any(expected in str(r.get("reason", "")).lower() for r in refusals)
    assert HOSTILE in outcome.log and expected in outcome.log.lower(), f"no log line: {outcome.log!r}"
    done = next((m for m in run.rounds if m["round"] == outcome.round), None)
    assert done is not None, f"round {outcome.round} never completed"
    if case == "replayed_result":  # the first, valid result is folded, once
        assert done["sites"] == sorted([HONEST, HOSTILE])
        assert len([r for r in outcome.audit if r["event"] == "result_accepted" and r["site"] == HOSTILE]) == 1
    else:
        assert done["sites"] == [HONEST], "the hostile result must not be folded"
        assert expected in str(done["failed"].get(HOSTILE, "")).lower(), done["failed"]


@pytest.mark.parametrize("case", list(SIDE_CASES))
def test_stray_submission_is_refused_logged_and_audited(run, case):
    outcome = _outcome(run, case)
    assert outcome.accepted is not True, "accepted"
    assert outcome.accepted is False or outcome.grpc_code, "neither a refusal nor an error came back"
    if outcome.grpc_code:
        assert outcome.grpc_code in ("INVALID_ARGUMENT", "UNAUTHENTICATED", "FAILED_PRECONDITION"), \
            f"a hostile request should get a client-error status, not {outcome.grpc_code}: {outcome.grpc_details}"
    assert SIDE_CASES[case] in outcome.refusal_text
    assert _refusal_records(outcome), f"no audit record (new records: {[r['event'] for r in outcome.audit]})"
    assert HOSTILE in outcome.log, f"the log line does not name the site: {outcome.log!r}"


@pytest.mark.parametrize("case", CERT_CASES)
def test_bad_certificate_is_refused(run, case):
    outcome = _outcome(run, case)
    assert outcome.grpc_code in ("UNAUTHENTICATED", "UNAVAILABLE", "PERMISSION_DENIED"), \
        f"the call was not refused ({outcome.grpc_code or 'it succeeded'})"
    registered = [r for r in outcome.audit if r["event"] == "site_registered"]
    assert registered == [], f"registered: {registered}"


HANDSHAKE_CASES = ("expired", "not_yet_valid")


@pytest.mark.parametrize("case", CERT_CASES)
def test_bad_certificate_refusal_is_logged_and_audited(run, case):
    outcome = _outcome(run, case)
    words = {"expired": "expired", "not_yet_valid": "not yet valid", "revoked": "revoked",
             "client_cert_on_admin_port": "admin port", "admin_cert_on_fed_port": "client port"}
    # the server says what was wrong in its log ...
    assert any(w in outcome.log.lower() for w in (words[case], case.replace("_", " "))), \
        f"no log line saying '{words[case]}': {outcome.log[-600:]!r}"
    if case in HANDSHAKE_CASES:
        # refused inside the TLS handshake itself: gRPC offers the application no hook there, so the
        # record is gRPC's own log line (above), and the peer never reaches fedkit's code
        assert outcome.grpc_code == "UNAVAILABLE", outcome.grpc_details  # the connection itself was refused
        return
    # ... and keeps an audit record a security officer can find
    assert _refusal_records(outcome), f"no audit record (new records: {[r['event'] for r in outcome.audit]})"
