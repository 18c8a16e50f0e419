"""The console: parses a command line, calls the server, renders the answer (rich tables for people,
JSON for scripts). Used both one-shot (`fl_admin.sh -c "list_jobs"`) and interactively."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shlex
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from ..errors import FedkitError, JobRejected, ServerUnreachable
from ..job_check import require_static_ok
from ..privacy_report import describe_chain
from ..tasks import TaskKind
from .client import AdminClient, unreadable_job_files
from .cross_site_table import cross_site_output
from .sanitize import SafeConsole, clean_remote
from .scalars_view import scalar_lines

USAGE = {
    "help": "help [COMMAND]                          the commands your role may run, or one command's usage",
    "check_status": "check_status server|client [SITE...]    online sites, last heartbeat, running job and round",
    "submit_job": "submit_job FOLDER [--set KEY=VALUE...] [--initial-model FILE]  queue a job (overrides: "
                  "server.rounds=5, ...; FILE: a safetensors model too large for the job folder)",
    "list_jobs": "list_jobs                               every job: state, submitter, config, timings, results",
    "show_job": "show_job JOB_ID                         one job: settings, timings, per-round metrics per site",
    "wait_job": "wait_job JOB_ID [TIMEOUT_S]             follow a job until it ends, printing each round",
    "abort_job": "abort_job JOB_ID                        stop a queued or running job",
    "clone_job": "clone_job JOB_ID                        queue the same job, with the same overrides, again",
    "delete_job": "delete_job JOB_ID                       remove a job that is not running, and its results",
    "download_job": "download_job JOB_ID [DEST] [--zip]      models, metrics, log lines into DEST/JOB_ID (default .)",
    "tail_log": "tail_log server|SITE [N]                the last N lines (default 50) of a log",
    "sys_info": "sys_info server|SITE                    host, Python, load; a site's as it reported it",
    "shutdown": "shutdown client SITE | shutdown server  stop a site (at its next heartbeat) or the server",
    "restart": "restart client SITE                     restart a site's daemon (at its next heartbeat)",
    "show_audit": "show_audit [N]                          the last N (default 20) audit records",
}


class UsageError(FedkitError):
    """A console command line that does not parse."""


FINAL_STATES = ("finished", "failed", "aborted")
SERVER_RETRY_S = 5.0  # wait_job: how often it tries again while the server is unreachable
WIDE_TABLE_COLUMNS = 150  # list_jobs prints a table from this terminal width on, two lines per job below it
Transfer = Callable[[int, int], None]  # (bytes done, bytes in all; 0 when unknown)


def _cleaned(record: dict[str, Any]) -> dict[str, Any]:
    """A job record with its text fit for a terminal (clean_remote), one level deep (overrides: a list)."""
    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return clean_remote(value)
        return [clean(v) for v in value] if isinstance(value, list) else value
    return {k: clean(v) for k, v in record.items()}


def _fmt_time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _fmt_best(record: dict[str, Any]) -> str:
    return f"{record['best_metric']:.4f} (r{record['best_round']})" if record["best_metric"] is not None else "-"


def _fmt_took(record: dict[str, Any]) -> str:
    """Wall time from start to end (or to now, for a running job)."""
    start = record.get("started_at")
    if not start:
        return "-"
    end = record.get("finished_at") or time.time()
    return f"{end - start:.1f} s"


def _fmt_metrics(m: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(m.items())) or "-"


class AdminConsole:
    """Runs console lines. `out` should have markup off (see __main__), since what it prints comes from
    people: job names, overrides such as `meta.sites=[site-1]`, error messages."""

    def __init__(self, client: AdminClient, out: Console, as_json: bool = False):
        self._client = client
        self._out = out
        self._json = as_json
        self._handlers: dict[str, Callable[[list[str]], Awaitable[Any]]] = {
            "help": self._help, "check_status": self._check_status, "submit_job": self._submit_job,
            "list_jobs": self._list_jobs, "show_job": self._show_job, "wait_job": self._wait_job,
            "abort_job": self._simple("abort_job"), "clone_job": self._simple("clone_job"),
            "delete_job": self._simple("delete_job"), "download_job": self._download_job,
            "tail_log": self._tail_log, "sys_info": self._sys_info, "shutdown": self._shutdown,
            "restart": self._restart, "show_audit": self._show_audit,
        }

    @property
    def commands(self) -> list[str]:
        return sorted(self._handlers)

    async def run_line(self, line: str) -> None:
        try:
            words = shlex.split(line)
        except ValueError as e:  # an unclosed quote, a trailing backslash: exit 2 in one line, not a traceback
            raise UsageError(f"the command line does not parse: {str(e).lower()} (put \\ before a quote or "
                             "backslash that is part of a word, as in dr.o\\'brien)") from None
        if not words:
            return
        handler = self._handlers.get(words[0])
        if handler is None:
            raise UsageError(f"unknown command '{words[0]}' (try 'help')")
        result = await handler(words[1:])
        if self._json and result is not None:
            # plain print: rich would wrap long lines and break the JSON a script parses
            print(json.dumps(result, default=str), flush=True)

    # ---- commands --------------------------------------------------------------------------------

    async def _help(self, args: list[str]) -> Any:
        if args:
            return await self._help_one(args[0])
        data = await self._client.command("help")
        allowed = set(data["commands"])
        if not self._json:
            self._out.print(f"role: {data['role']}")
            for name in sorted(USAGE):
                mark = "" if _console_allowed(name, allowed) else "  (not allowed for your role)"
                self._out.print(f"  {USAGE[name]}{mark}")
        return data

    async def _help_one(self, name: str) -> Any:
        """`help CMD`: its usage, and whether this admin's role may run it."""
        if name not in USAGE:
            raise UsageError(f"unknown command '{name}' (try 'help')")
        data = await self._client.command("help")
        allowed = _console_allowed(name, set(data["commands"]))
        if not self._json:
            self._out.print(USAGE[name], markup=False, highlight=False)
            if not allowed:
                self._out.print(f"(role '{data['role']}' may not run it)", markup=False)
        return {"command": name, "usage": USAGE[name], "allowed": allowed}

    async def _check_status(self, args: list[str]) -> Any:
        target = args[0] if args else "server"
        if target not in ("server", "client") or (target == "server" and len(args) > 1):
            raise UsageError("usage: check_status server | check_status client [SITE...]")
        data = await self._client.command("check_status", sites=args[1:])
        if not self._json:
            s = data["server"]
            running = f"{s['running_job']} ({s['running_job_name']}) {_fmt_step(s)}" if s["running_job"] else "no job"
            self._out.print(f"server: up {s['uptime_s']:.0f} s, {s['sites_online']} site(s) online, running "
                            f"{running}, {len(s['queued'])} queued{': ' if s['queued'] else ''}"
                            f"{' '.join(s['queued'])}", markup=False, highlight=False)
            if target == "client":
                self._out.print(self._sites_table(data["sites"]))
        return data

    @staticmethod
    def _sites_table(sites: list[dict[str, Any]]) -> Table:
        table = Table("site", "org", "online", "state", "last heartbeat")
        for site in sites:
            table.add_row(clean_remote(site["site"]), clean_remote(site["org"]), "yes" if site["online"] else "NO",
                          site.get("state", ""), f"{site['last_heartbeat_s_ago']} s ago")
        return table

    async def _submit_job(self, args: list[str]) -> Any:
        if not args:
            raise UsageError("usage: submit_job FOLDER [--set KEY=VALUE ...] [--initial-model FILE]")
        folder, overrides, rest = Path(args[0]), [], args[1:]
        initial_model: Path | None = None
        while rest:
            if rest[0] not in ("--set", "--initial-model") or len(rest) < 2:
                raise UsageError(f"unexpected '{rest[0]}': use --set KEY=VALUE or --initial-model FILE")
            if rest[0] == "--set":
                if "=" not in rest[1]:  # the line does not parse: 2, as any other
                    raise UsageError(f"--set {rest[1]}: use --set KEY=VALUE (e.g. --set server.rounds=5)")
                overrides.append(rest[1])
            else:
                if initial_model is not None:
                    raise UsageError("--initial-model is given twice: a job has one initial model")
                initial_model = Path(rest[1])
                if not initial_model.is_file():  # the line parses: a missing file is a failure (1), not 2
                    raise JobRejected(f"--initial-model {initial_model}: no such file")
            rest = rest[2:]
        # the static part of `fedkit job check`: every config problem, one line each, before the upload
        with unreadable_job_files(folder):
            await asyncio.to_thread(require_static_ok, folder, overrides)
        with self._transfer_bar(f"uploading {folder.name}") as progress:
            record = await self._client.submit_job(folder, overrides, progress, initial_model=initial_model)
        if not self._json:
            self._out.print(f"submitted job {record['job_id']} ({record['name']}), state {record['state']}")
            if record.get("waiting_for"):  # e.g. a misspelt site name: say so now, not after a silent wait
                self._out.print(clean_remote(f"it waits: {record['waiting_for']}"), markup=False, highlight=False)
            elif record.get("unknown_sites"):  # it can start without them: a misspelt name would pass unseen
                self._out.print(clean_remote("note: never seen by this server (check the names): "
                                             f"{', '.join(record['unknown_sites'])}; the job runs without them"),
                                markup=False, highlight=False)
            self._out.print(_fmt_code(record), markup=False, highlight=False)
        return record

    async def _list_jobs(self, args: list[str]) -> Any:
        if args:
            raise UsageError("usage: list_jobs (it takes no arguments; show_job JOB_ID shows one job)")
        jobs = await self._client.command("list_jobs")
        shown = [_cleaned(j) for j in jobs]  # names and overrides are what submitters wrote
        if not self._json and not jobs:
            self._out.print("no jobs yet")
        elif not self._json and self._out.width < WIDE_TABLE_COLUMNS:
            self._print_jobs_narrow(shown)
        elif not self._json:
            # one row per run, with what makes runs comparable: config hash, overrides, timings, results
            table = Table("job id", "name", "state", "submitter", "submitted", "took", "rounds", "config",
                          "overrides", "best", "final metrics")
            table.columns[0].no_wrap = True
            for j in shown:
                table.add_row(j["job_id"], j["name"], j["state"], j["submitter"], _fmt_time(j["submitted_at"]),
                              _fmt_took(j), f"{j['rounds_done']}/{j['rounds_total']}", j["config_hash"][:8],
                              " ".join(j["overrides"]) or "-", _fmt_best(j), _fmt_metrics(j["final_metrics"]))
            self._out.print(table)
        return jobs

    def _print_jobs_narrow(self, jobs: list[dict[str, Any]]) -> None:
        """Two lines per job, for a terminal too narrow for the table's eleven columns."""
        for j in jobs:
            self._out.print(f"{j['job_id']}  {j['name']}  {j['state']}  by {j['submitter']}  submitted "
                            f"{_fmt_time(j['submitted_at'])}, took {_fmt_took(j)}", markup=False, soft_wrap=True)
            self._out.print(f"    rounds {j['rounds_done']}/{j['rounds_total']}, config {j['config_hash'][:8]}, "
                            f"overrides: {' '.join(j['overrides']) or '-'}, best {_fmt_best(j)}, final: "
                            f"{_fmt_metrics(j['final_metrics'])}", markup=False, soft_wrap=True)

    async def _show_job(self, args: list[str]) -> Any:
        if len(args) != 1:
            raise UsageError("usage: show_job JOB_ID")
        data = await self._client.command("show_job", job_id=args[0])
        if not self._json:
            self._print_job_header(data)
            for part in cross_site_output(data.get("cross_site"), self._out.width):  # the study's result, first
                self._out.print(part, markup=False, highlight=False)
            table = Table("round", "site", "n_samples", "train metrics", "validation of model")
            if data.get("metrics_skipped"):  # a long job's entries do not all fit one reply
                self._out.print(f"(the first {data['metrics_skipped']} of {data['metrics_total']} metric entries "
                                f"are not shown: download_job {data['record']['job_id']} DIR has them all, in "
                                "metrics.jsonl)", markup=False, highlight=False)
            for entry in data["metrics"]:
                if entry["type"] == "round":
                    for site in entry["sites"]:
                        table.add_row(str(entry["round"]), site, str(entry["n_samples"][site]),
                                      _fmt_metrics(entry["train"][site]), "")
                    for site, reason in entry["failed"].items():
                        table.add_row(str(entry["round"]), site, "-", clean_remote(f"FAILED: {reason}"), "")
                elif entry["type"] == "shared":  # weights shared outside training: round 0, cross-site
                    what = "initial model" if entry["task"] == TaskKind.INIT else "local model"
                    for site in entry["sites"]:
                        table.add_row(f"{entry['round']} ({entry['task']})", site, "-", f"sent its {what}", "")
                    for site, reason in entry["failed"].items():
                        table.add_row(f"{entry['round']} ({entry['task']})", site, "-",
                                      clean_remote(f"FAILED: {reason}"), "")
                elif entry["type"] == "round_failed":  # the round that ended the job: who answered, who not
                    label = str(entry["round"]) if entry["task"] == TaskKind.TRAIN else \
                        f"{entry['round']} ({entry['task']})"
                    for site in entry["sites"]:  # (n_samples and train: absent from entries of older servers)
                        table.add_row(label, site, str(entry.get("n_samples", {}).get(site, "-")),
                                      _fmt_metrics(entry.get("train", {}).get(site) or {})
                                      + " (answered; the round failed for want of others)", "")
                    for site, reason in entry["failed"].items():
                        table.add_row(label, site, "-", clean_remote(f"FAILED: {reason}"), "")
                elif entry["type"] == "validation":
                    # the sites that scored it: those whose result the round took, not always all
                    table.add_row(f"model {entry['model_round']}", _scored_by(entry["sites"]), "", "",
                                  _fmt_metrics(entry["global"]) + ("  [best]" if entry["is_best"] else "")
                                  + _compared_on(entry))
                # other entries (models scored by evaluate/cross_site, wire statistics) have their own sections
            self._out.print(table)
            for line in scalar_lines(data.get("scalars")):
                self._out.print(line, markup=False, highlight=False, soft_wrap=True)
            for line in _privacy_lines(data["metrics"]):
                self._out.print(line, markup=False, highlight=False, soft_wrap=True)
        return data

    def _print_job_header(self, data: dict[str, Any]) -> None:
        """Who ran what, with which settings, when, and how it ended: enough to compare two runs."""
        r = data["record"]
        lines = [
            f"job {r['job_id']} ({r['name']}): {r['state']}, rounds {r['rounds_done']}/{r['rounds_total']}"
            + (f", queue position {data['queue_position']}" if data.get("queue_position") else ""),
            f"submitted by {r['submitter']} ({r['submitter_org']}, {r['submitter_role']})",
            f"config {r['config_hash']}, overrides: {' '.join(r['overrides']) or '-'}, "
            f"archive sha256 {r['job_sha256'][:16]}",
            _fmt_code(r),
            f"submitted {_fmt_time(r['submitted_at'])}, started {_fmt_time(r['started_at'])}, "
            f"finished {_fmt_time(r['finished_at'])}, took {_fmt_took(r)}",
            "best: " + (f"{r['best_metric']:.4f} (model of round {r['best_round']})"
                        if r["best_metric"] is not None else "-")
            + f"; final metrics: {_fmt_metrics(r['final_metrics'])}",
        ]
        if data.get("waiting_for"):
            lines.insert(1, f"waiting: {data['waiting_for']}")
        if r["error"]:
            lines.append(f"error: {r['error']}")
        for line in lines:
            self._out.print(clean_remote(line), markup=False, soft_wrap=True)

    async def _wait_job(self, args: list[str]) -> Any:
        """Follow a job: the server answers when a round's metrics arrive or the job ends (or after its
        own wait limit), so following a long job costs one call, and one audit record, per change."""
        if not args or len(args) > 2:
            raise UsageError("usage: wait_job JOB_ID [TIMEOUT_S]")
        job_id = args[0]
        timeout_s = _number(args[1], "TIMEOUT_S") if len(args) > 1 else 3600.0
        deadline = time.monotonic() + timeout_s
        seen = 0
        columns: list[str] = []
        shown: set[int] = set()  # the rounds whose row is printed
        while True:
            left_s = max(0.1, deadline - time.monotonic())
            try:
                data = await self._client.command("wait_job", job_id=job_id, seen_metrics=seen,
                                                  wait_s=min(20.0, left_s))
            except ServerUnreachable:  # restarted or crashed: a job resumes when its server is back
                if time.monotonic() + SERVER_RETRY_S >= deadline:
                    raise
                if not self._json:
                    self._out.print(f"server unreachable; still waiting for job {job_id} (retrying every "
                                    f"{SERVER_RETRY_S:g} s)", markup=False, highlight=False)
                await asyncio.sleep(SERVER_RETRY_S)
                seen = 0  # a resumed job drops the metrics of the round it was in: read them all again
                continue
            # the reply carries the entries from `seen` on (its newest, when they are too many for one reply)
            for entry in data["metrics"][max(0, seen - data.get("metrics_skipped", 0)):]:
                if entry["type"] == "validation" and not self._json and entry["model_round"] not in shown:
                    if not columns:  # the first model scored: its metric names head the columns
                        columns = sorted(entry["global"])
                        self._out.print("round  sites  " + "  ".join(f"{c:>9}" for c in columns), highlight=False)
                    self._print_progress_row(entry, columns)
                    shown.add(entry["model_round"])
            seen = data.get("metrics_total", len(data["metrics"]))  # an older server: all its entries
            record = data["record"]
            if record["state"] in FINAL_STATES:
                return self._job_ended(record)
            if time.monotonic() >= deadline:
                why = f": {data['waiting_for']}" if data.get("waiting_for") else ""
                raise JobRejected(clean_remote(f"job {job_id} still {record['state']} after {timeout_s:g} s{why}"))

    def _print_progress_row(self, entry: dict[str, Any], columns: list[str]) -> None:
        values = "  ".join(f"{entry['global'].get(c, float('nan')):>9.4f}" for c in columns)
        best = ("  best so far" if entry["is_best"] else "") + _compared_on(entry)
        self._out.print(f"{entry['model_round']:>5}  {len(entry['sites']):>5}  {values}{best}", highlight=False)

    def _job_ended(self, record: dict[str, Any]) -> dict[str, Any]:
        """The end of wait_job: the record on success; JobRejected (exit 1) with the reason otherwise."""
        job_id = record["job_id"]
        if record["state"] != "finished":  # said once, as every failure is (stderr; with --json, stdout too)
            raise JobRejected(f"job {job_id} {record['state']}: {record['error']}")
        if not self._json:
            reason = f": {record['error']}" if record["error"] else ""
            self._out.print(clean_remote(f"job {job_id} {record['state']}{reason}"), markup=False, highlight=False)
        return record

    def _simple(self, name: str) -> Callable[[list[str]], Awaitable[Any]]:
        async def run(args: list[str]) -> Any:
            if len(args) != 1:
                raise UsageError(f"usage: {name} JOB_ID")
            data = await self._client.command(name, job_id=args[0])
            if not self._json:
                self._out.print(f"{name}: {data.get('job_id', data.get('deleted', args[0]))} "
                                f"{data.get('state', 'done')}")
            return data
        return run

    async def _download_job(self, args: list[str]) -> Any:
        keep_zip = "--zip" in args
        args = [a for a in args if a != "--zip"]
        if not args or len(args) > 2:
            raise UsageError("usage: download_job JOB_ID [DEST] [--zip]")
        dest = Path(args[1]) if len(args) > 1 else Path(".")
        total = 0
        if not self._json:  # the size, for the progress bar; scripts skip the extra call
            total = (await self._client.command("show_job", job_id=args[0])).get("output_bytes", 0)
        with self._transfer_bar(f"downloading {args[0]}") as progress:
            out, received = await self._client.download_job(args[0], dest, progress, total, keep_zip)
        if not self._json:
            self._out.print(f"downloaded {decimal(received)} into {out}", markup=False, highlight=False)
        return {"path": str(out), "bytes": received}

    @contextlib.contextmanager
    def _transfer_bar(self, what: str) -> Iterator[Transfer]:
        """A rich progress bar on stderr for people; nothing for --json, whose stdout a script parses, nor for
        a stderr that is not a terminal (rich leaves a blank line there, above the one line of an error)."""
        stderr = SafeConsole(stderr=True)
        if self._json or not stderr.is_terminal:
            yield lambda done, total: None
            return
        columns = (TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=stderr, transient=True) as bar:
            task = bar.add_task(what, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=max(total, done) or None)

    async def _tail_log(self, args: list[str]) -> Any:
        if len(args) > 2:
            raise UsageError("usage: tail_log server|SITE [N]")
        site = args[0] if args else "server"
        n = int(_number(args[1], "N")) if len(args) > 1 else 50
        data = await self._client.command("tail_log", site=site, n=n)
        if not self._json:
            for line in data["lines"]:
                self._out.print(clean_remote(line), markup=False, highlight=False)
        return data

    async def _sys_info(self, args: list[str]) -> Any:
        if len(args) > 1:
            raise UsageError("usage: sys_info server|SITE")
        data = await self._client.command("sys_info", site=args[0] if args else "server")
        if not self._json:
            for k, v in data.items():
                self._out.print(clean_remote(f"{k}: {v}"), markup=False, highlight=False)
        return data

    async def _shutdown(self, args: list[str]) -> Any:
        if args == ["server"]:  # `shutdown server site-1` is a slip, not a request to stop the server
            data = await self._client.command("shutdown_server")
        elif len(args) == 2 and args[0] == "client":
            data = await self._client.command("shutdown_client", site=args[1])
        else:
            raise UsageError("usage: shutdown client SITE | shutdown server")
        if not self._json:
            self._out.print(_fmt_control(data), markup=False, highlight=False)
        return data

    async def _restart(self, args: list[str]) -> Any:
        if len(args) != 2 or args[0] != "client":
            raise UsageError("usage: restart client SITE")
        data = await self._client.command("restart_client", site=args[1])
        if not self._json:
            self._out.print(_fmt_control(data), markup=False, highlight=False)
        return data

    async def _show_audit(self, args: list[str]) -> Any:
        if len(args) > 1:
            raise UsageError("usage: show_audit [N]")
        records = await self._client.command("show_audit", n=int(_number(args[0], "N")) if args else 20)
        if not self._json:
            for r in records:
                extra = {k: v for k, v in r.items() if k not in ("time", "event", "prev", "hash")}
                self._out.print(clean_remote(f"{r['time']} {r['event']} {json.dumps(extra, default=str)}"),
                                markup=False)
        return records


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:  # nan and inf parse as floats; no count or timeout is either,
        raise UsageError(f"{what} must be a number of 0 or more, not '{text}'")  # nor below 0
    return value


def _fmt_step(server: dict[str, Any]) -> str:
    """Where the running job is: a training round out of the job's rounds, or another workflow's task (its
    rounds count on their own, so "round 4/50" during cross-site validation would mislead)."""
    task = server.get("task")
    if task in (None, TaskKind.TRAIN.value):
        return f"round {server['round']}/{server['rounds_total']}"
    label = f" {server['task_label']}" if server.get("task_label") else ""
    return f"{task}{label} (step {server['round']})"


def _fmt_code(record: dict[str, Any]) -> str:
    """The code hash sites approve (overrides are not part of it), and who signed it."""
    code = record.get("code_sha256") or "-"
    signer = record.get("code_signed_by")
    return f"code sha256 {code}" + (f", signed by {signer}" if signer else ", unsigned")


def _privacy_lines(metrics: list[dict[str, Any]]) -> list[str]:
    """What each site's privacy filters did to what it sent: one line per site and distinct chain, with
    what it applied to (training rounds: deltas; init: the whole model; submit_model: local - last global)."""
    where: dict[tuple[str, str], list[str]] = {}
    for entry in metrics:
        if entry["type"] not in ("round", "shared"):
            continue
        label = f"round {entry['round']}" if entry["type"] == "round" else entry["task"]
        for site, report in sorted((entry.get("privacy") or {}).items()):
            where.setdefault((site, describe_chain(report, with_target=False)), []).append(label)
    head = "privacy, per site (rounds: on deltas; init: on the whole model; submit_model: on local - last global):"
    lines = [head] + [f"  {site}: {chain}  [{', '.join(labels)}]" for (site, chain), labels in sorted(where.items())]
    return (lines if where else []) + _dp_lines(metrics) + _site_report_lines(metrics)


def _site_report_lines(metrics: list[dict[str, Any]]) -> list[str]:
    """Per site, what its `reports:` policy kept back of what the job's code reported, over the whole job. A
    site says so only with a result its policy changed, so these count results, without a total."""
    totals: dict[str, dict[str, int]] = {}
    for entry in metrics:
        if entry["type"] != "site_reports":
            continue
        for site, kept in (entry.get("sites") or {}).items():
            total = totals.setdefault(site, {"metrics_withheld": 0, "scalars_withheld": 0, "key_metric_withheld": 0})
            total["metrics_withheld"] += bool(kept.get("metrics_withheld"))
            total["key_metric_withheld"] += bool(kept.get("key_metric_withheld"))
            total["scalars_withheld"] += bool(kept.get("scalars_withheld"))
            if kept.get("significant_digits"):
                total["significant_digits"] = kept["significant_digits"]
    if not totals:
        return []
    lines = ["the job's own reports (metrics, logged scalars), as each site's local/privacy.yml `reports:` let "
             "them leave:"]
    for site, t in sorted(totals.items()):
        rounding = f"; values rounded to {t['significant_digits']} significant digits" \
            if "significant_digits" in t else ""
        key = (f"; the job's key metric withheld in {_results(t['key_metric_withheld'])}: these scores do not "
               "count toward the best model") if t["key_metric_withheld"] else ""
        lines.append(f"  {site}: metrics withheld in {_results(t['metrics_withheld'])}, scalars in "
                     f"{_results(t['scalars_withheld'])}{rounding}{key}")
    return lines


def _results(n: int) -> str:
    return f"{n} result{'s' if n != 1 else ''}"


def _dp_lines(metrics: list[dict[str, Any]]) -> list[str]:
    """Per site, the differential privacy its gaussian_dp uploads have spent on this job so far, from the
    last report it sent (each report carries the site's own running total, from its ledger)."""
    last: dict[str, dict[str, Any]] = {}
    for entry in metrics:
        for site, report in (entry.get("privacy") or {}).items():
            dp = report.get("dp") if isinstance(report, dict) else None
            if isinstance(dp, dict) and dp.get("releases", 0) >= last.get(site, {}).get("releases", 0):
                last[site] = dp
    if not last:
        return []
    lines = ["differential privacy spent, per site (this job's total so far, at the site's delta; RDP accountant):"]
    for site, dp in sorted(last.items()):
        releases = dp["releases"]
        lines.append(f"  {site}: epsilon {_fmt_epsilon(dp['epsilon_total'])} at delta {dp['delta']:g} after "
                     f"{releases} release{'s' if releases != 1 else ''} (noise multiplier {dp['noise_multiplier']:g}, "
                     f"sampling rate {dp['sampling_rate']:g}; the last release alone: "
                     f"{_fmt_epsilon(dp['epsilon_round'])})"
                     + ("; not differentially private: a release had no noise" if dp["epsilon_total"] == "inf" else "")
                     + (f"; all jobs on this site together: epsilon {_fmt_epsilon(dp['epsilon_site_total'])} at delta "
                        f"{dp.get('site_delta', dp['delta']):g} after {dp['site_releases']} releases"
                        if "epsilon_site_total" in dp else ""))
    return lines


def _fmt_epsilon(value: float | str) -> str:
    return "infinite" if value == "inf" else f"{float(value):.3g}"


def _fmt_control(data: dict[str, Any]) -> str:
    if "site" in data:
        return f"{data['control']} queued for {data['site']}: {data['note']}"
    return f"server: {data['server']}"


def _console_allowed(name: str, allowed: set[str]) -> bool:
    server_names = {"shutdown": "shutdown_client", "restart": "restart_client", "wait_job": "show_job"}
    return server_names.get(name, name) in allowed or name in allowed


def _compared_on(entry: dict[str, Any]) -> str:
    """A model whose scoring sites differ from the best's was compared with it on the sites both had."""
    common = entry.get("compared_on")
    return f"  (against the best on {', '.join(common)})" if common else ""


def _scored_by(sites: dict[str, Any]) -> str:
    """Who scored a global model, for show_job's site column ("all" hid that a site whose update was refused
    did not count)."""
    names = sorted(sites)
    return clean_remote(", ".join(names)) if len(names) <= 3 else f"{len(names)} sites"
