"""What one FedAvg round costs fedkit, against the bytes alone over TLS.

A model of P float32 parameters, a trivial learner (returns a constant delta), N sites as separate
processes started from their kits, over loopback with mutual TLS. Prints per-round median time, bytes
moved per round, peak RSS of all processes, and, in the same run, the time a plain TLS socket needs to
move the same bytes (server sends the model to N receivers and takes N models back), as a ratio; then the
CPU-seconds per round of the server and of the sites (daemons and workers, the trivial learner's own work
included) against the CPU plain TLS takes on each side for the same bytes: the floor under any transport
over TLS on this machine.

    python bench/round_overhead.py                 # P=10M, N=2,4,8, 5 rounds
    python bench/round_overhead.py --params 1000000 --sites 2 --rounds 3
    python bench/round_overhead.py --sites 2 4 --wire int8     # quantized transfer (server.wire_dtype);
                                                               # plain TLS then moves the same, smaller, bytes
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._procs import tree_peak_rss_bytes, tree_pids  # noqa: E402
from provision.local_study import LocalStudy  # noqa: E402

JOB = REPO / "bench" / "jobs" / "trivial"


def _sites_edit(n: int):
    def edit(data):
        others = [p for p in data["participants"] if p.get("type") != "client"]
        data["participants"] = others + [{"type": "client", "name": f"site-{i + 1}", "org": f"org-{i + 1}"}
                                         for i in range(n)]
    return edit


def run_fedkit(params: int, n_sites: int, rounds: int, root: Path, wire: str = "float32") -> dict:
    study = LocalStudy.create(REPO / "project.yml.example", root, edit=_sites_edit(n_sites))
    for site in study.clients:
        study.write_local(site, "site.yml", {"heartbeat_interval_s": 2.0})
    try:
        study.start_server()
        study.start_sites(timeout_s=120)
        job = root / "job"
        shutil.copytree(JOB, job)
        role_cpu = _RoleCpu(study)  # from before the submission: a worker starting at once counts whole
        record = study.admin_json(f"submit_job {job} --set server.rounds={rounds} "
                                  f"--set client.learner.args.n_params={params} --set meta.min_clients={n_sites} "
                                  f"--set server.wire_dtype={wire}")
        study.admin_json(f"wait_job {record['job_id']} 1800", timeout_s=1900)
        cpu_used = role_cpu.stop()
        metrics = study.admin_json(f"show_job {record['job_id']}")["metrics"]
        ends = [m["time"] for m in metrics if m["type"] == "round"]
        per_round = [b - a for a, b in zip(ends, ends[1:], strict=False)]
        wire_bytes = [m["bytes_sent"] for m in metrics if m["type"] == "wire" and m["task"] == "train"]
        wire_error = [m["sent"] for m in metrics if m["type"] == "wire" and m["task"] == "train"][-1:]
        rss = {name: tree_peak_rss_bytes(proc.pid) for name, proc in study.procs.items()}
        steps = _site_steps(study, first_round=2)
    finally:
        study.stop_all()
    cpu = {role: round(seconds / rounds, 3) for role, seconds in cpu_used.items()}
    return {"round_s": statistics.median(per_round), "rounds_measured": len(per_round), "cpu_s_per_round": cpu,
            "server_rss": rss[study.server], "all_rss": sum(rss.values()),
            "kits": study.kits, "server": study.server, "wire_bytes": max(wire_bytes, default=0),
            "wire_error": wire_error[0] if wire_error else None, "site_steps_s": steps}


_STEPS = re.compile(r"train round (\d+): result accepted .*?; (.*)$")


def _site_steps(study: LocalStudy, first_round: int) -> dict[str, float]:
    """Median seconds of each step of a site's training task (download, worker, privacy, upload slot, upload),
    over every site and round from `first_round`, from the line each site logs for an accepted result."""
    seen: dict[str, list[float]] = {}
    for site in study.clients:
        for line in study.log_tail(site, 10 << 20).splitlines():
            if (match := _STEPS.search(line)) and int(match.group(1)) >= first_round:
                for part in match.group(2).split(", "):
                    step, seconds = part.rsplit(" ", 2)[:2]
                    seen.setdefault(step, []).append(float(seconds))
    return {step: round(statistics.median(values), 3) for step, values in seen.items()}


class _RoleCpu:
    """CPU seconds of the server, all site daemons, and all training workers (everything a daemon started:
    workers, their sandboxes, helpers), read from /proc every SAMPLE_S while the job runs. A worker exits
    when its job ends, often before the end is read, and its sandbox's pid namespace dies with it (nobody
    collects its CPU time): reading only the processes alive at the end lost those workers entirely, and
    the workers' figure could even come out negative. Sampling keeps the last reading of every process
    (by pid and start time); what a worker used in its last SAMPLE_S is lost (it is idle by then)."""

    SAMPLE_S = 0.2

    def __init__(self, study: LocalStudy):
        self._study = study
        self._last: dict[tuple[int, str], tuple[str, float]] = {}
        self._first = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> dict[tuple[int, str], tuple[str, float]]:
        seen = {}
        for name, proc in list(self._study.procs.items()):
            for pid in tree_pids(proc.pid):
                role = "server" if name == self._study.server else ("daemons" if pid == proc.pid else "workers")
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2:].split()
                seen[(pid, fields[19])] = (role, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        return seen

    def _run(self) -> None:
        while not self._stop.wait(self.SAMPLE_S):
            self._last.update(self._read())

    def stop(self) -> dict[str, float]:
        """CPU seconds each role used since this was made."""
        self._stop.set()
        self._thread.join()
        self._last.update(self._read())
        totals = {"server": 0.0, "daemons": 0.0, "workers": 0.0}
        for key, (role, seconds) in self._last.items():
            totals[role] += seconds - self._first.get(key, (role, 0.0))[1]
        return totals


# ---- the baseline: the same bytes over plain TLS sockets -----------------------------------------------

def _recv_exact(sock: ssl.SSLSocket, n: int, buf: bytearray) -> None:
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("closed early")
        got += k


def _tls_receiver(port: int, nbytes: int, cafile: str, cert: str, key: str, cpu_out) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.load_cert_chain(cert, key)
    with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
        buf = bytearray(nbytes)
        began = time.process_time()  # after the handshake, as the server's own count
        _recv_exact(s, nbytes, buf)
        s.sendall(buf)  # the "update" back: same size as the model
        cpu_out.send(time.process_time() - began)


class RawTls(NamedTuple):
    """One plain-TLS transfer of a round's bytes: its wall time, and the CPU it took on each side (after
    the handshakes): the floor under what any transport over TLS costs each role on this machine."""

    seconds: float
    server_cpu_s: float
    sites_cpu_s: float


def run_raw_tls(nbytes: int, n_sites: int, server_kit: Path, client_kit: Path) -> RawTls:
    startup, cstartup = server_kit / "startup", client_kit / "startup"
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(startup / "rootCA.pem"))
    ctx.load_cert_chain(str(startup / "server.crt"), str(startup / "server.key"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    payload = bytes(nbytes)
    spawn = mp.get_context("spawn")
    pipes = [spawn.Pipe(duplex=False) for _ in range(n_sites)]
    procs = [spawn.Process(target=_tls_receiver, args=(
        port, nbytes, str(cstartup / "rootCA.pem"), str(cstartup / "client.crt"), str(cstartup / "client.key"),
        sender), daemon=True)  # an interrupted run must not wait on receivers blocked in recv
        for _, sender in pipes]
    for p in procs:
        p.start()
    conns = []
    for _ in range(n_sites):
        raw, _ = listener.accept()
        conns.append(ctx.wrap_socket(raw, server_side=True))
    start, cpu_start = time.perf_counter(), time.process_time()

    def serve(conn: ssl.SSLSocket) -> None:
        conn.sendall(payload)
        _recv_exact(conn, nbytes, bytearray(nbytes))

    threads = [threading.Thread(target=serve, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, server_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    for _, sender in pipes:
        sender.close()  # the receivers hold theirs: a receiver that dies makes recv() raise, not hang
    sites_cpu = sum(receiver.recv() for receiver, _ in pipes)
    for p in procs:
        p.join()
    for c in conns:
        c.close()
    listener.close()
    return RawTls(elapsed, server_cpu, sites_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--wire", default="float32", choices=["float32", "float16", "bfloat16", "int8"])
    args = parser.parse_args()
    rows = []
    for n in args.sites:
        with tempfile.TemporaryDirectory(prefix="fedkit-bench-") as tmp:
            result = run_fedkit(args.params, n, args.rounds, Path(tmp), args.wire)
            # the bytes one transfer moves: the model as encoded for the wire (an update is the same size)
            model_bytes = result["wire_bytes"] or 4 * args.params
            raw = [run_raw_tls(model_bytes, n, result["kits"][result["server"]], result["kits"]["site-1"])
                   for _ in range(3)]
        raw_s = statistics.median(r.seconds for r in raw)
        moved = 2 * n * model_bytes
        row = {"P": args.params, "N": n, "wire": args.wire, "round_s": round(result["round_s"], 3),
               "MB_per_round": round(moved / 1e6, 1),
               "raw_tls_s": round(raw_s, 3), "ratio": round(result["round_s"] / raw_s, 2),
               "server_peak_rss_MB": round(result["server_rss"] / 1e6),
               "all_peak_rss_MB": round(result["all_rss"] / 1e6),
               "cpu_s_per_round": result["cpu_s_per_round"],
               # what plain TLS itself costs each side for the same bytes: fedkit's floor per role
               "raw_tls_cpu_s": {"server": round(statistics.median(r.server_cpu_s for r in raw), 3),
                                 "sites": round(statistics.median(r.sites_cpu_s for r in raw), 3)},
               "wire_error": result["wire_error"], "site_steps_s": result["site_steps_s"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"{'P':>10} {'N':>3} {'round s':>8} {'MB/round':>9} {'raw TLS s':>10} {'ratio':>6} "
          f"{'server RSS MB':>14} {'all RSS MB':>11}")
    for r in rows:
        print(f"{r['P']:>10} {r['N']:>3} {r['round_s']:>8.3f} {r['MB_per_round']:>9.1f} {r['raw_tls_s']:>10.3f} "
              f"{r['ratio']:>6.2f} {r['server_peak_rss_MB']:>14} {r['all_peak_rss_MB']:>11}")
    print("\nCPU-s per round, fedkit against plain TLS moving the same bytes (server; sites: daemons + workers):")
    for r in rows:
        cpu, raw = r["cpu_s_per_round"], r["raw_tls_cpu_s"]
        sites = cpu["daemons"] + cpu["workers"]  # the workers' part includes the trivial learner's own work
        print(f"  N={r['N']}: server {cpu['server']:.3f} vs {raw['server']:.3f} "
              f"({cpu['server'] / max(raw['server'], 1e-3):.2f}x); "
              f"sites {sites:.3f} vs {raw['sites']:.3f} ({sites / max(raw['sites'], 1e-3):.2f}x); "
              f"all {cpu['server'] + sites:.3f} vs {raw['server'] + raw['sites']:.3f} CPU-s on "
              f"{os.cpu_count()} cores")
    print("\nWhere a site's training task goes (median s, rounds 2 on; the rest of a round is the server's):")
    for r in rows:
        print(f"  N={r['N']}: " + ", ".join(f"{step} {s:.3f}" for step, s in r["site_steps_s"].items()))


if __name__ == "__main__":
    main()
