"""The server's side of a refused TLS handshake: a site with another study's certificate (or an expired one,
or none) is refused inside gRPC core, and the server still logs it in one readable line with the peer's
address and reason, once per host and reason per interval, with one `peer_refused` audit record; its own
stderr stays readable.
Real server process from a real kit, real TLS on loopback."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from collections.abc import Callable

import grpc

from provision.certs import issue_credential, load_ca, private_key_pem
from provision.local_study import LocalStudy, wait_until
from provision.project import ClientSpec
from provision.state import StudyWorkspace
from runtime import kit_config as kc
from runtime.transport import TlsFiles, open_channel

from ..conftest import EXAMPLE_PROJECT, with_sites

DIALS = 3
FOREIGN_CA = "certificate not issued by this study's CA"


def _expired_credential(study: LocalStudy, into) -> tuple:
    """A site certificate our own study CA signed, valid for a day that ended yesterday."""
    ws = StudyWorkspace.for_study(study.root / "workspace", study.project_name)
    now = dt.datetime.now(dt.UTC)
    issued = issue_credential(load_ca(ws.ca_cert_path, ws.ca_key_path, now), ClientSpec(
        type="client", name="site-old", org="old"), now - dt.timedelta(days=2), 1, study.project_name)
    into.mkdir()
    (into / "client.crt").write_bytes(issued.cert_pem)
    (into / "client.key").write_bytes(private_key_pem(issued.key))
    (into / "client.key").chmod(0o600)
    return into / "client.crt", into / "client.key"


def _foreign_study(root) -> LocalStudy:
    """Another study: its own CA, so its site certificate is one our server's CA did not issue."""
    return LocalStudy.create(EXAMPLE_PROJECT, root, edit=with_sites(["site-1"]))


async def _refused(make_channel: Callable[[], grpc.aio.Channel], deadline_s: float = 60.0) -> None:
    """Wait until a new channel has tried, and failed, to connect: one refused handshake at least."""
    async with make_channel() as channel:
        state = channel.get_state(try_to_connect=True)
        async with asyncio.timeout(deadline_s):
            while state is not grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                assert state is not grpc.ChannelConnectivity.READY, "the server accepted a foreign certificate"
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)


def _dial_with(tls: TlsFiles, host: str, port: int) -> None:
    asyncio.run(_refused(lambda: open_channel(tls, host, port)))


def _dial_without_certificate(root_ca: bytes, host: str, port: int) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=root_ca)
    asyncio.run(_refused(lambda: grpc.aio.secure_channel(f"{host}:{port}", creds)))


def test_refused_handshakes_are_logged_once_per_host_and_reason_with_peer_and_reason(make_study, tmp_path):
    study = make_study(sites=["site-1"]).study
    study.start_server()
    server_ws = study.kits[study.server] / "workspace"
    ours, foreign = (s.kits["site-1"] / "startup" for s in (study, _foreign_study(tmp_path / "foreign")))
    host = kc.load_model(ours / kc.CLIENT_CONFIG, kc.ClientKitConfig).server_host
    # our CA to check the server (so the site gets as far as showing its certificate), another study's certificate
    tls = TlsFiles(foreign / "client.crt", foreign / "client.key", ours / kc.ROOT_CA)

    for _ in range(DIALS):  # a site retrying: each dial is a new connection from a new source port
        _dial_with(tls, host, study.fed_learn_port)
    _dial_with(TlsFiles(*_expired_credential(study, tmp_path / "expired"), ours / kc.ROOT_CA), host,
               study.fed_learn_port)
    # a refusal for another reason from the same host: once its line is there, every earlier dial was handled
    _dial_without_certificate((ours / kc.ROOT_CA).read_bytes(), host, study.fed_learn_port)
    wait_until(lambda: "no client certificate" in (server_ws / "log.txt").read_text(), 60,
               "the server to log the dial without a certificate")

    # 'localhost' may be dialled over both [::1] and 127.0.0.1: once per host, however many dials
    log_lines = [line for line in (server_ws / "log.txt").read_text().splitlines() if FOREIGN_CA in line]
    hosts = [re.search(r"federation refused (\[::1\]|127\.0\.0\.1):\d+: " + re.escape(FOREIGN_CA), line)
             for line in log_lines]
    assert log_lines and all(hosts) and len({h.group(1) for h in hosts}) == len(log_lines), log_lines
    audit = [json.loads(line) for line in (server_ws / "audit.jsonl").read_text().splitlines()]
    refusals = [r for r in audit if r["event"] == "peer_refused" and FOREIGN_CA in r["reason"]]
    assert [r["service"] for r in refusals] == ["federation"] * len(log_lines)
    assert sorted(r["peer"] for r in refusals) == sorted(re.search(r"refused (\S+): ", line).group(1)
                                                         for line in log_lines)
    reasons = {r["reason"] for r in audit if r["event"] == "peer_refused"}
    assert reasons == {f"{FOREIGN_CA} (TLS handshake)", "certificate expired (TLS handshake)",
                       "no client certificate (TLS handshake)"}, reasons

    study.stop(study.server)
    stderr = study.log_tail(study.server, 1_000_000)
    assert "listening on" in stderr and "server shutting down" in stderr  # our own lines still pass through
    assert f"federation refused {refusals[0]['peer']}: {FOREIGN_CA}" in stderr
    assert "CallNextHandshakerLocked" not in stderr and "Source Location Trace" not in stderr  # core's trace is ours
    assert "Handshake failed with error" not in stderr  # replaced by the readable line
