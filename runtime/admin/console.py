"""The console: parses a command line, calls the server, renders the answer (rich tables for people,
JSON for scripts). Used both one-shot (`fl_admin.sh -c "list_jobs"`) and interactively."""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..errors import FedkitError, JobRejected
from .client import AdminClient

USAGE = {
    "help": "help [COMMAND]                      commands your role may run",
    "check_status": "check_status server|client [SITE...]  online sites, heartbeats, running job",
    "submit_job": "submit_job FOLDER [--set KEY=VALUE ...]  queue a job (overrides: server.rounds=5, ...)",
    "list_jobs": "list_jobs                           every job with state, submitter, metrics",
    "show_job": "show_job JOB_ID                     state, rounds, per-round metrics per site",
    "wait_job": "wait_job JOB_ID [TIMEOUT_S]         follow a job until it ends, printing each round",
    "abort_job": "abort_job JOB_ID",
    "clone_job": "clone_job JOB_ID                    queue the same job again",
    "delete_job": "delete_job JOB_ID",
    "download_job": "download_job JOB_ID [DEST]          models, metrics and logs into DEST (default .)",
    "tail_log": "tail_log server [N]",
    "sys_info": "sys_info server|SITE",
    "shutdown": "shutdown client SITE | shutdown server",
    "restart": "restart client SITE",
    "show_audit": "show_audit [N]                      the last N audit records",
}


class UsageError(FedkitError):
    """A console command line that does not parse."""


def _fmt_time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _fmt_metrics(m: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(m.items())) or "-"


class AdminConsole:
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
        words = shlex.split(line)
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
            text = USAGE.get(args[0])
            if text is None:
                raise UsageError(f"unknown command '{args[0]}'")
            self._out.print(text)
            return None
        data = await self._client.command("help")
        allowed = set(data["commands"])
        if not self._json:
            self._out.print(f"role: {data['role']}")
            for name in sorted(USAGE):
                mark = "" if _console_allowed(name, allowed) else "  (not allowed for your role)"
                self._out.print(f"  {USAGE[name]}{mark}")
        return data

    async def _check_status(self, args: list[str]) -> Any:
        target = args[0] if args else "server"
        if target not in ("server", "client"):
            raise UsageError("usage: check_status server|client [SITE...]")
        data = await self._client.command("check_status", sites=args[1:])
        if not self._json:
            s = data["server"]
            self._out.print(f"server: running job {s['running_job'] or '-'} round {s['round'] or '-'}, "
                            f"queued {len(s['queued'])}")
            table = Table("site", "org", "online", "last heartbeat", "job", "round")
            for site in data["sites"]:
                table.add_row(site["site"], site["org"], "yes" if site["online"] else "NO",
                              f"{site['last_heartbeat_s_ago']} s ago", site["job_id"] or "-", str(site["round"]))
            self._out.print(table)
        return data

    async def _submit_job(self, args: list[str]) -> Any:
        if not args:
            raise UsageError("usage: submit_job FOLDER [--set KEY=VALUE ...]")
        folder, overrides, rest = Path(args[0]), [], args[1:]
        while rest:
            if rest[0] != "--set" or len(rest) < 2:
                raise UsageError(f"unexpected '{rest[0]}': use --set KEY=VALUE")
            overrides.append(rest[1])
            rest = rest[2:]
        record = await self._client.submit_job(folder, overrides)
        if not self._json:
            self._out.print(f"submitted job {record['job_id']} ({record['name']}), state {record['state']}")
        return record

    async def _list_jobs(self, args: list[str]) -> Any:
        jobs = await self._client.command("list_jobs")
        if not self._json:
            table = Table("job id", "name", "state", "submitter", "submitted", "rounds", "config", "overrides",
                          "best", "final metrics")
            for j in jobs:
                best = f"{j['best_metric']:.4f} (r{j['best_round']})" if j["best_metric"] is not None else "-"
                table.add_row(j["job_id"], j["name"], j["state"], j["submitter"], _fmt_time(j["submitted_at"]),
                              f"{j['rounds_done']}/{j['rounds_total']}", j["config_hash"][:8],
                              " ".join(j["overrides"]) or "-", best, _fmt_metrics(j["final_metrics"]))
            self._out.print(table)
        return jobs

    async def _show_job(self, args: list[str]) -> Any:
        if len(args) != 1:
            raise UsageError("usage: show_job JOB_ID")
        data = await self._client.command("show_job", job_id=args[0])
        if not self._json:
            r = data["record"]
            self._out.print(f"job {r['job_id']} ({r['name']}): {r['state']}, rounds {r['rounds_done']}/"
                            f"{r['rounds_total']}, submitted by {r['submitter']} ({r['submitter_org']}, "
                            f"{r['submitter_role']}) at {_fmt_time(r['submitted_at'])}")
            if r["error"]:
                self._out.print(f"error: {r['error']}")
            table = Table("round", "site", "n_samples", "train metrics", "validation of model")
            for entry in data["metrics"]:
                if entry["type"] == "round":
                    for site in entry["sites"]:
                        table.add_row(str(entry["round"]), site, str(entry["n_samples"][site]),
                                      _fmt_metrics(entry["train"][site]), "")
                    for site, reason in entry["failed"].items():
                        table.add_row(str(entry["round"]), site, "-", f"FAILED: {reason}", "")
                else:
                    table.add_row(f"model {entry['model_round']}", "all", "", "",
                                  _fmt_metrics(entry["global"]) + ("  [best]" if entry["is_best"] else ""))
            self._out.print(table)
        return data

    async def _wait_job(self, args: list[str]) -> Any:
        if not args:
            raise UsageError("usage: wait_job JOB_ID [TIMEOUT_S]")
        job_id = args[0]
        timeout_s = float(args[1]) if len(args) > 1 else 3600.0
        deadline = time.monotonic() + timeout_s
        shown = 0
        columns: list[str] = []
        while True:
            data = await self._client.command("show_job", job_id=job_id)
            for entry in [e for e in data["metrics"] if e["type"] == "validation"][shown:]:
                if not self._json:
                    if not columns:
                        columns = sorted(entry["global"])
                        self._out.print("round  sites  " + "  ".join(f"{c:>9}" for c in columns), highlight=False)
                    values = "  ".join(f"{entry['global'].get(c, float('nan')):>9.4f}" for c in columns)
                    best = "  best so far" if entry["is_best"] else ""
                    self._out.print(f"{entry['model_round']:>5}  {len(entry['sites']):>5}  {values}{best}",
                                    highlight=False)
                shown += 1
            record = data["record"]
            if record["state"] in ("finished", "failed", "aborted"):
                if not self._json:
                    reason = f": {record['error']}" if record["error"] else ""
                    self._out.print(f"job {job_id} {record['state']}{reason}")
                if record["state"] != "finished":
                    raise JobRejected(f"job {job_id} {record['state']}: {record['error']}")
                return record
            if time.monotonic() > deadline:
                raise JobRejected(f"job {job_id} still {record['state']} after {timeout_s:g} s")
            await asyncio.sleep(1.0)

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
        if not args:
            raise UsageError("usage: download_job JOB_ID [DEST]")
        dest = Path(args[1]) if len(args) > 1 else Path(".")
        received = [0]
        out = await self._client.download_job(args[0], dest, lambda n: received.__setitem__(0, received[0] + n))
        if not self._json:
            self._out.print(f"downloaded {received[0] / 1e6:.1f} MB into {out}")
        return {"path": str(out), "bytes": received[0]}

    async def _tail_log(self, args: list[str]) -> Any:
        site = args[0] if args else "server"
        n = int(args[1]) if len(args) > 1 else 50
        data = await self._client.command("tail_log", site=site, n=n)
        if not self._json:
            for line in data["lines"]:
                self._out.print(line, markup=False, highlight=False)
        return data

    async def _sys_info(self, args: list[str]) -> Any:
        data = await self._client.command("sys_info", site=args[0] if args else "server")
        if not self._json:
            for k, v in data.items():
                self._out.print(f"{k}: {v}")
        return data

    async def _shutdown(self, args: list[str]) -> Any:
        if args[:1] == ["server"]:
            data = await self._client.command("shutdown_server")
        elif len(args) == 2 and args[0] == "client":
            data = await self._client.command("shutdown_client", site=args[1])
        else:
            raise UsageError("usage: shutdown client SITE | shutdown server")
        if not self._json:
            self._out.print(data)
        return data

    async def _restart(self, args: list[str]) -> Any:
        if len(args) != 2 or args[0] != "client":
            raise UsageError("usage: restart client SITE")
        data = await self._client.command("restart_client", site=args[1])
        if not self._json:
            self._out.print(data)
        return data

    async def _show_audit(self, args: list[str]) -> Any:
        records = await self._client.command("show_audit", n=int(args[0]) if args else 20)
        if not self._json:
            for r in records:
                extra = {k: v for k, v in r.items() if k not in ("time", "event", "prev", "hash")}
                self._out.print(f"{r['time']} {r['event']} {json.dumps(extra, default=str)}", markup=False)
        return records


def _console_allowed(name: str, allowed: set[str]) -> bool:
    server_names = {"shutdown": "shutdown_client", "restart": "restart_client", "wait_job": "show_job"}
    return server_names.get(name, name) in allowed or name in allowed
