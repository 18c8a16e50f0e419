"""The bulk port end to end, with real server and site processes from their kits: the model bytes of every task
and result cross it, and a site whose bulk port cannot be reached (a firewall with no opening for it) still
finishes the job, over the gRPC port, and says so in its log."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from provision.local_study import LocalStudy, free_port, wait_until

from ..faultproxy import FaultProxy

TRIVIAL_JOB = Path(__file__).parents[2] / "bench" / "jobs" / "trivial"
N_PARAMS = 250_000  # float32: a 1 MB model
ROUNDS = 2


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run_job(study: LocalStudy, tmp_path: Path, sites: int) -> dict:
    job = tmp_path / "job"
    shutil.copytree(TRIVIAL_JOB, job)
    record = study.admin_json(f"submit_job {job} --set server.rounds={ROUNDS} --set meta.min_clients={sites} "
                              f"--set client.learner.args.n_params={N_PARAMS}")
    return study.admin_json(f"wait_job {record['job_id']} 300", timeout_s=330)


def test_the_model_bytes_of_every_task_and_result_cross_the_bulk_port(make_study, tmp_path) -> None:
    sites = ["site-1", "site-2"]
    study = make_study(sites=sites).study
    server_bulk = free_port()
    study.write_local(study.server, "server.yml", {"heartbeat_timeout_s": 6.0, "bulk_listen_port": server_bulk})
    # the sites' kits name study.bulk_port: a pass-through proxy there counts what crosses it
    with FaultProxy(target_port=server_bulk, listen_port=study.bulk_port) as proxy:
        try:
            study.start_server()
            study.start_sites()
            final = _run_job(study, tmp_path, len(sites))
        finally:
            study.stop_all()

    assert final["state"] == "finished", final
    model_bytes = 4 * N_PARAMS
    # each round: the model down to each site and an update of the same size back (TLS only adds to it)
    assert proxy.stats.bytes_down >= ROUNDS * len(sites) * model_bytes
    assert proxy.stats.bytes_up >= ROUNDS * len(sites) * model_bytes
    for site in sites:
        assert "using the gRPC port" not in study.log_tail(site, 200_000)


def test_a_site_that_cannot_reach_the_bulk_port_finishes_over_grpc(make_study, tmp_path) -> None:
    sites = ["site-1"]
    study = make_study(sites=sites).study
    # the server listens for bulk elsewhere: nothing answers on the port the site's kit names
    study.write_local(study.server, "server.yml", {"heartbeat_timeout_s": 6.0, "bulk_listen_port": free_port()})
    try:
        study.start(study.server)
        wait_until(lambda: _listening(study.fed_learn_port) and _listening(study.admin_port), 60,
                   "the server to listen")
        study.start_sites()
        final = _run_job(study, tmp_path, len(sites))
        log = study.log_tail("site-1", 200_000)
    finally:
        study.stop_all()

    assert final["state"] == "finished", final
    assert f"bulk port localhost:{study.bulk_port} unreachable" in log
    assert log.count("using the gRPC port") == 1  # said once, not at every task
