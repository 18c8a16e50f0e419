"""Runs the chaos soak: a study from real kits (server, N sites, an admin) on 127.0.0.1 with TLS, every
site dialing the server through one fault proxy, the soak job (tests/e2e/jobs/soak) run round after
round while the seeded schedule's faults are injected at their rounds, then everything stopped by PID and
the invariants checked (invariants.py).

The driver follows the server's audit log: `task_sent` of a round is its mid point, `round_done` its end,
`job_ended` the job's end. A job that fails (too few answers) is recorded with its reason and followed by
a new one, so the soak goes on; global round numbers run on across jobs. Every wait has a bound and is
recorded (name, bound, time taken, whether it ended in time)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from provision.local_study import LocalStudy, free_port

from ..faultproxy import FaultProxy
from .audit_tail import AuditTail
from .faults import Injector, can_mount_tmpfs
from .memory import MemoryLog
from .schedule import Fault, Kind, Phase, make_schedule

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_PROJECT = REPO / "project.yml.example"
JOB = REPO / "tests" / "e2e" / "jobs" / "soak"
POLL_S = 0.1
MEMORY_EVERY_S = 2.0
# a mid-round site kill waits at most this long (and a quarter of the round timeout) for its targets to get
# the task; a target that never does (offline) must not stay held by its `hold` file past the round deadline
KILL_WAIT_BOUND_S = 30.0


@dataclass
class SoakConfig:
    root: Path
    sites: int = 12
    seed: int = 1
    rounds: int = 100_000          # total training rounds over all jobs (the soak ends sooner by `minutes`)
    minutes: float | None = None   # stop (abort the job at a round's end) after this long
    min_clients: int = 2
    heartbeat_timeout_s: float = 6.0
    disconnect_grace_s: float = 2.0
    round_timeout_s: float = 90.0
    # a killed (and restarted) or cut-off site is waited for this long before a round goes on without it: far
    # more than a site's restart takes on a loaded machine (up to ~25 s seen), so it takes part in the round
    # whatever the machine's speed, and a seed replays to the same model
    rejoin_wait_s: float = 60.0
    train_s: float = 0.3
    kinds: tuple[Kind, ...] | None = None
    online_bound_s: float = 120.0

    @property
    def startup_bound_s(self) -> float:
        """The first start of every site: each is a Python process importing fedkit on a shared machine."""
        return max(self.online_bound_s, 30.0 * self.sites)

    @property
    def stuck_bound_s(self) -> float:
        """No round may take longer than this, whatever the faults: two round timeouts and a server restart."""
        return 2 * self.round_timeout_s + self.online_bound_s


@dataclass
class Wait:
    what: str
    bound_s: float
    took_s: float
    ok: bool


@dataclass
class JobRun:
    job_id: str
    offset: int                 # global rounds before this job's round 1
    rounds: int
    state: str = "running"
    error: str = ""


@dataclass
class FiredFault:
    fault: Fault
    fired: bool
    global_round: int


@dataclass
class SoakRun:
    config: SoakConfig
    study: LocalStudy
    schedule: list[Fault]
    jobs: list[JobRun] = field(default_factory=list)
    faults: list[FiredFault] = field(default_factory=list)
    round_end: dict[int, float] = field(default_factory=dict)   # global round -> server time it closed
    waits: list[Wait] = field(default_factory=list)
    memory: MemoryLog = field(default_factory=MemoryLog)
    notes: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    tmpdir: Path | None = None
    fds_before: int = 0
    fds_after: int = 0
    elapsed_s: float = 0.0
    stuck: str = ""
    died: list[str] = field(default_factory=list)  # participants that exited without the driver killing them


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def live_pids_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text` (the soak's root: every kit path is under it),
    other than this process and its ancestors (the command that started the soak may name the root)."""
    needle, found, mine = text.encode(), [], _ancestors()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(entry.name) not in mine and needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rindex(")") + 2:].split()[1])
    return pids


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Driver:
    def __init__(self, config: SoakConfig):
        self.cfg = config
        root = config.root
        self.sites = [f"site-{i}" for i in range(1, config.sites + 1)]
        self.study = LocalStudy.create(EXAMPLE_PROJECT, root / "study", edit=_with_sites(self.sites))
        kinds = config.kinds
        if (kinds is None or Kind.DISK_FULL in kinds) and not can_mount_tmpfs(root / "mount-probe"):
            kinds = tuple(k for k in (kinds or tuple(Kind)) if k is not Kind.DISK_FULL)
            note = "disk_full left out: this process cannot mount a tmpfs (needs root)"
        else:
            note = ""
        self.run = SoakRun(config=config, study=self.study,
                           schedule=make_schedule(config.seed, self.sites, config.rounds, kinds))
        if note:
            self.run.notes.append(note)
        self.server_port = free_port()
        self.data_dirs = {s: root / "data" / s for s in self.sites}
        self.proxy = FaultProxy(target_port=self.server_port, listen_port=self.study.fed_learn_port)
        self.injector = Injector(self.study, self.proxy, self.data_dirs, self.restart_server)
        self.tail = AuditTail(self.study.kits[self.study.server] / "workspace" / "audit.jsonl")
        self._configure()

    def _configure(self) -> None:
        study, cfg = self.study, self.cfg
        study.write_local(study.server, "server.yml", {
            "heartbeat_timeout_s": cfg.heartbeat_timeout_s, "disconnect_grace_s": cfg.disconnect_grace_s,
            "fed_learn_listen_port": self.server_port})
        for site in self.sites:
            self.data_dirs[site].mkdir(parents=True, exist_ok=True)
            study.write_local(site, "site.yml", {"data_root": str(self.data_dirs[site]),
                                                 "heartbeat_interval_s": 1.0, "threads": 1})
        self.run.ports = [self.server_port, study.fed_learn_port, study.admin_port]

    # ---- bounded waits --------------------------------------------------------------------------

    def wait(self, predicate: Any, bound_s: float, what: str) -> bool:
        started = time.monotonic()
        while not (ok := bool(predicate())) and time.monotonic() - started < bound_s:
            time.sleep(POLL_S)
        self.run.waits.append(Wait(what, bound_s, time.monotonic() - started, ok))
        return ok

    def online(self) -> list[str]:
        try:
            status = self.study.admin_json("check_status client", timeout_s=60)
        except (RuntimeError, json.JSONDecodeError, OSError):
            return []
        return sorted(s["site"] for s in status["sites"] if s["online"])

    def restart_server(self) -> None:
        self.study.start_server(timeout_s=self.cfg.online_bound_s)
        self.wait(lambda: _listening(self.server_port), self.cfg.online_bound_s, "server listening behind the proxy")

    # ---- the soak -------------------------------------------------------------------------------

    def execute(self) -> SoakRun:
        """Run the whole soak; always stops every process it started and the proxy."""
        run, cfg = self.run, self.cfg
        run.tmpdir = cfg.root / "tmp"
        run.tmpdir.mkdir(parents=True, exist_ok=True)
        saved_tmp = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(run.tmpdir)  # the study's processes inherit it: their temp files land here
        run.fds_before = _fd_count()
        started = time.monotonic()
        try:
            self.proxy.start()
            self.restart_server()
            for site in sorted({s for f in run.schedule if f.kind is Kind.DISK_FULL for s in f.sites}):
                self.injector.mount_disk(site)
            for site in self.sites:
                self.study.start(site)
            # read from the server's audit, not asked through the console: on a loaded machine each console
            # command (a new process) took over a minute, and the sites' start was measured by the console's
            registered = AuditTail(self.tail.path)
            seen: set[str] = set()

            def all_registered() -> bool:
                seen.update(r["site"] for r in registered.new() if r["event"] == "site_registered")
                return seen >= set(self.sites)

            self.wait(all_registered, cfg.startup_bound_s, "every site registered")
            self._loop()
            self._note_deaths()
        finally:
            run.elapsed_s = time.monotonic() - started
            self.study.stop_all()
            self.proxy.stop()
            self.wait(lambda: not live_pids_naming(str(cfg.root)), 30.0, "every process of the study gone")
            self.injector.unmount_all()
            if saved_tmp is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved_tmp
            run.notes.extend(self.injector.log)
        self.wait(lambda: _fd_count() <= run.fds_before, 10.0, "the driver's file descriptors back to the start")
        run.fds_after = _fd_count()
        return run

    def _submit(self, offset: int) -> JobRun:
        job_dir = self.cfg.root / "job"
        if not job_dir.exists():
            shutil.copytree(JOB, job_dir)
        rounds = self.cfg.rounds - offset
        sets = [f"server.rounds={rounds}", f"meta.min_clients={self.cfg.min_clients}",
                f"server.round_timeout_s={self.cfg.round_timeout_s:g}",
                f"server.rejoin_wait_s={self.cfg.rejoin_wait_s:g}",
                f"client.learner.args.train_s={self.cfg.train_s:g}"]
        job_id = self.study.admin_json(f"submit_job {job_dir} " + " ".join(f"--set {s}" for s in sets))["job_id"]
        job = JobRun(job_id=job_id, offset=offset, rounds=rounds)
        self.run.jobs.append(job)
        return job

    def _loop(self) -> None:
        run, cfg = self.run, self.cfg
        by_round = {f.round: f for f in run.schedule}
        job = self._submit(0)
        started = time.monotonic()  # `minutes` counts from the first job, not from provisioning and startup
        active: Fault | None = None
        fired = False
        first_sent: float | None = None
        sent: set[str] = set()
        stopping = False
        last_progress = last_memory = time.monotonic()
        while True:
            now = time.monotonic()
            if now - last_memory >= MEMORY_EVERY_S:
                run.memory.sample({n: p.pid for n, p in self.study.procs.items()})
                self._note_deaths()
                last_memory = now
            if cfg.minutes is not None and now - started >= cfg.minutes * 60:
                stopping = True
            if now - last_progress > cfg.stuck_bound_s:
                run.stuck = f"no round closed and no task sent for {cfg.stuck_bound_s:g} s"
                run.waits.append(Wait("progress of the study", cfg.stuck_bound_s, now - last_progress, False))
                return
            records = self.tail.new()
            if not records:
                if active is not None and not fired and first_sent is not None and active.phase is Phase.MID \
                        and now - first_sent > min(KILL_WAIT_BOUND_S, cfg.round_timeout_s / 4):
                    self._fire(active)  # the targets never got the task (offline): fire anyway, bounded
                    fired = True
                time.sleep(POLL_S)
                continue
            for rec in records:
                if rec.get("job_id") != job.job_id:
                    continue
                event = rec["event"]
                if event == "task_sent" and rec.get("task") == "train":
                    last_progress = time.monotonic()
                    g = job.offset + int(rec["round"])
                    if active is None or active.round != g or fired or active.phase is not Phase.MID:
                        continue
                    first_sent = first_sent or time.monotonic()
                    sent.add(rec["site"])
                    if set(active.sites) <= sent:
                        self._fire(active)
                        fired = True
                elif event == "round_done":
                    last_progress = time.monotonic()
                    g = self._round_closed(job, rec)
                    if active is not None and active.round == g:
                        if not fired and active.phase is Phase.BETWEEN:
                            self._fire(active)
                            fired = True
                        self._close(active, fired, g)
                        active = None
                    if stopping:
                        self._abort(job)
                        return
                    if (nxt := by_round.get(g + 1)) is not None:
                        active, fired, first_sent, sent = nxt, False, None, set()
                        self.injector.prepare(nxt)
                elif event == "job_ended":
                    job.state, job.error = rec["state"], rec.get("error") or ""
                    if active is not None:
                        self._close(active, fired, active.round)
                        active = None
                    done = self._rounds_done(job)
                    if job.state != "failed" or stopping or job.offset + done >= cfg.rounds:
                        return
                    self.wait(lambda: self.online() == self.sites, cfg.online_bound_s,
                              "every site online before the next job")
                    job = self._submit(job.offset + done)
                    last_progress = time.monotonic()
                    if (nxt := by_round.get(job.offset + 1)) is not None:
                        active, fired, first_sent, sent = nxt, False, None, set()
                        self.injector.prepare(nxt)
                    break  # records after job_ended belong to no job we follow

    def _note_deaths(self) -> None:
        """A participant in `procs` is one the driver did not kill (kill() takes it out first): if it
        exited, it died on its own. It is left dead, as no supervisor would restart it."""
        for name, proc in list(self.study.procs.items()):
            if proc.poll() is not None:
                self.run.died.append(f"{name} (pid {proc.pid}) exited with code {proc.returncode}")
                self.study.procs.pop(name)

    def _round_closed(self, job: JobRun, rec: dict[str, Any]) -> int:
        g = job.offset + int(rec["round"])
        self.run.round_end[g] = datetime.fromisoformat(rec["time"]).timestamp()
        return g

    def _fire(self, fault: Fault) -> None:
        self.injector.fire(fault)

    def _close(self, fault: Fault, fired: bool, g: int) -> None:
        self.injector.cleanup(fault)
        needs_fire = fault.kind in (Kind.SITE_KILL, Kind.SITES_KILL, Kind.SERVER_KILL_MID, Kind.SERVER_KILL_BETWEEN)
        self.run.faults.append(FiredFault(fault, fired or not needs_fire, g))

    def _abort(self, job: JobRun) -> None:
        """Time is up: abort the job (at a round's end) and wait, bounded, for it to end."""
        try:
            self.study.admin_json(f"abort_job {job.job_id}", timeout_s=60)
        except RuntimeError as e:
            self.run.notes.append(f"abort_job: {e}")
        ended: list[dict[str, Any]] = []

        def job_ended() -> bool:
            for r in self.tail.new():  # rounds keep closing until the abort lands (the console takes a while)
                if r.get("job_id") == job.job_id and r["event"] == "round_done":
                    self._round_closed(job, r)
                elif r.get("job_id") == job.job_id and r["event"] == "job_ended":
                    ended.append(r)
            return bool(ended)

        if self.wait(job_ended, self.cfg.round_timeout_s, "the aborted job to end"):
            job.state, job.error = ended[0]["state"], ended[0].get("error") or ""

    def _rounds_done(self, job: JobRun) -> int:
        return int(json.loads((self.job_dir(job.job_id) / "record.json").read_text())["rounds_done"])

    def job_dir(self, job_id: str) -> Path:
        return self.study.kits[self.study.server] / "workspace" / "jobs" / job_id


def _with_sites(sites: list[str]) -> Any:
    def edit(data: dict[str, Any]) -> None:
        others = [p for p in data["participants"] if p.get("type") != "client"]
        data["participants"] = others + [{"type": "client", "name": s, "org": f"org-{s}"} for s in sites]

    return edit
