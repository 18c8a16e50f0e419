"""What a site's audit trail says, job by job: who sent each job, which code ran on the site's data and in
what sandbox, what left the site (updates, their bytes, the privacy filters they went through, the DP
spent, the error messages sent to the server) and what the site refused. For site IT and the hospital's
privacy officer: `startup/audit_report.sh` in a site kit, `fedkit audit report FILE` anywhere.

The log's hash chain is checked first: a summary of an altered log would say what the log no longer
proves. Everything comes from the records themselves; nothing is asked of the server.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audit import GENESIS, verified_records
from .errors import ConfigError
from .plain_text import shown

MAX_REASONS_SHOWN = 3  # distinct reasons listed per job and kind; all of them are counted


@dataclass
class JobActivity:
    """One job as this site saw it."""

    job_id: str
    name: str = ""
    submitter: str = ""
    first: str = ""
    last: str = ""
    code_sha256: list[str] = field(default_factory=list)
    approvals: list[str] = field(default_factory=list)
    sandboxes: list[str] = field(default_factory=list)
    tasks: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0
    weight_uploads: int = 0
    unmeasured: int = 0  # weight uploads audited before their size was (older records)
    filters: list[str] = field(default_factory=list)
    raised: int = 0  # uploads whose filters the site made stronger than the job asked
    most_excluded: int = 0  # the most tensors one upload left out
    dp: dict[str, Any] | None = None  # the newest DP release: epsilon_total, delta, releases
    dp_refused: Counter[str] = field(default_factory=Counter)  # budget -> releases it refused
    metric_names: dict[str, list[str]] = field(default_factory=dict)  # group (train, validation..) -> names
    metric_values: int = 0  # numbers that left beside the weights (the job's code chose them)
    scalar_points: int = 0
    errors_sent: Counter[str] = field(default_factory=Counter)  # reason text that left -> times
    refusals: Counter[str] = field(default_factory=Counter)  # "rule: reason" -> times
    failures: int = 0
    stopped: list[str] = field(default_factory=list)  # job_stopped reasons (the disk guard)

    def as_json(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "name": self.name, "submitter": self.submitter, "first": self.first,
                "last": self.last, "code_sha256": self.code_sha256, "code_approval": self.approvals,
                "sandbox": self.sandboxes, "tasks_received": dict(self.tasks), "results_sent": dict(self.sent),
                "uploads_with_weights": self.weight_uploads, "bytes_sent": self.bytes_sent,
                "uploads_without_size": self.unmeasured, "filters": self.filters,
                "filters_raised_by_site": self.raised, "most_tensors_excluded": self.most_excluded, "dp": self.dp,
                "dp_refused": dict(self.dp_refused),
                "metric_names": self.metric_names, "metric_values": self.metric_values,
                "scalar_points": self.scalar_points, "errors_sent": dict(self.errors_sent),
                "refused": dict(self.refusals), "tasks_failed": self.failures, "stopped": self.stopped}


@dataclass
class SiteActivity:
    """A site's audit log, summarized."""

    path: Path
    records: int
    head: str
    site: str = ""
    org: str = ""
    first: str = ""
    last: str = ""
    starts: int = 0
    settings_changed: Counter[str] = field(default_factory=Counter)
    kept_updates_removed: int = 0
    jobs: dict[str, JobActivity] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"log": str(self.path), "records": self.records, "head": self.head, "site": self.site,
                "org": self.org, "first": self.first, "last": self.last, "starts": self.starts,
                "local_settings_changed": dict(self.settings_changed),
                "kept_updates_removed": self.kept_updates_removed,
                "jobs": [job.as_json() for job in self.jobs.values()]}


def summarize(path: Path, job: str | None = None, since: str | None = None) -> SiteActivity:
    """The site's activity from its audit log `path` (chain checked: raises AuditChainBroken), only job ids
    starting with `job` and records from `since` (an ISO date or time, UTC) when given."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such audit log")
    activity = SiteActivity(path, 0, GENESIS)
    for record in verified_records(path):
        if not activity.records and record.get("event") == "server_started":
            raise ConfigError(f"{path} is a server's audit log; this report reads a site's (its "
                              "workspace/audit.jsonl)")
        activity.records, activity.head = activity.records + 1, str(record.get("hash"))
        if since is not None and str(record.get("time", "")) < since:
            continue
        if job is not None and not str(record.get("job_id", "")).startswith(job):
            continue
        _take(activity, record)
    return activity


def _take(activity: SiteActivity, record: dict[str, Any]) -> None:
    event, when = record.get("event"), str(record.get("time", ""))
    activity.first = activity.first or when
    activity.last = when
    if event == "client_started":
        activity.starts += 1
        activity.site, activity.org = str(record.get("site", "")), str(record.get("org", ""))
    elif event == "local_settings_changed":
        activity.settings_changed[str(record.get("file", ""))] += 1
    elif event == "kept_updates_removed":
        activity.kept_updates_removed += 1
    job_id = record.get("job_id")
    if not isinstance(job_id, str) or not job_id:
        return
    job = activity.jobs.setdefault(job_id, JobActivity(job_id))
    job.first = job.first or when
    job.last = when
    _take_job(job, event, record)


def _take_job(job: JobActivity, event: Any, record: dict[str, Any]) -> None:
    if event == "task_received":
        job.tasks[str(record.get("task"))] += 1
    elif event == "job_received":
        job.name = str(record.get("job_name", ""))
        job.submitter = person(record.get("submitter"))
        _add(job.code_sha256, record.get("code_sha256"))
        _add(job.approvals, record.get("code_approval"))
    elif event == "worker_started":
        _add(job.sandboxes, _sandbox(record))
    elif event == "update_sent":
        _take_upload(job, record)
    elif event == "error_reported":
        job.errors_sent[str(record.get("reason", ""))] += 1
    elif event == "job_refused":
        job.refusals[f"{record.get('rule')}: {record.get('reason')}"] += 1
        job.submitter = job.submitter or person(record.get("submitter"))
    elif event == "dp_budget_exhausted":
        job.dp_refused[str(record.get("budget", "dp_budget"))] += 1
    elif event == "task_failed":
        job.failures += 1
    elif event == "job_stopped":
        job.stopped.append(str(record.get("reason", "")))


def _take_upload(job: JobActivity, record: dict[str, Any]) -> None:
    job.sent[str(record.get("task"))] += 1
    _take_reported(job, record.get("reported"))
    if record.get("payload_sha256"):  # weights left (a validation sends scores only)
        job.weight_uploads += 1
        if isinstance(record.get("payload_bytes"), int):
            job.bytes_sent += record["payload_bytes"]
        else:
            job.unmeasured += 1
    privacy = record.get("privacy")
    if not isinstance(privacy, dict):
        return
    for step in privacy.get("chain") or []:
        if isinstance(step, dict):
            _add(job.filters, f"{step.get('name')} ({step.get('source', 'job')})")
    job.raised += bool(privacy.get("raised"))
    if isinstance(privacy.get("n_excluded"), int):
        job.most_excluded = max(job.most_excluded, privacy["n_excluded"])
    if isinstance(privacy.get("dp"), dict):
        job.dp = privacy["dp"]


def _take_reported(job: JobActivity, reported: Any) -> None:
    """The metrics that left with a result, as the site's `reports:` let them (daemon._reported)."""
    if not isinstance(reported, dict):
        return
    for group, values in reported.items():
        if group == "scalar_points" and isinstance(values, int):
            job.scalar_points += values
        elif isinstance(values, dict):
            for name in values:
                _add(job.metric_names.setdefault(str(group), []), name)
            job.metric_values += len(values)


def _add(values: list[str], value: Any) -> None:
    if value and str(value) not in values:
        values.append(str(value))


def person(submitter: Any) -> str:
    """A job's submitter as the audit records it, in words ("" when unknown)."""
    if not isinstance(submitter, dict) or not submitter.get("name"):
        return ""
    return f"{submitter['name']} ({submitter.get('org', '?')}, {submitter.get('role', '?')})"


def _sandbox(record: dict[str, Any]) -> str:
    limits = record.get("limits")
    described = ", ".join(f"{k} {v}" for k, v in limits.items()) if isinstance(limits, dict) else ""
    return f"{record.get('backend', '?')}" + (f" ({described})" if described else "")


def render(activity: SiteActivity) -> str:
    """The summary as text, a paragraph per job."""
    who = f"{activity.site} ({activity.org})" if activity.site else "this site"
    lines = [f"{who}: {activity.path}: {activity.records} records, chain intact, head {activity.head}",
             f"from {activity.first or '-'} to {activity.last or '-'}; started {activity.starts} time(s)"
             + (f"; local settings changed: {_counts(activity.settings_changed)}" if activity.settings_changed
                else "")
             + (f"; kept updates trimmed {activity.kept_updates_removed} time(s)"
                if activity.kept_updates_removed else "")]
    if not activity.jobs:
        lines.append("no job in this period")
    for job in activity.jobs.values():
        lines += ["", *_render_job(job)]
    return "\n".join(shown(line) for line in lines)  # what a job's code wrote is printed, never obeyed


def _render_job(job: JobActivity) -> list[str]:
    lines = [f"job {job.job_id}" + (f" \"{job.name}\"" if job.name else "") + f": {job.first} to {job.last}"]
    if job.submitter:
        lines.append(f"  submitted by {job.submitter}")
    for code in job.code_sha256:
        lines.append(f"  code sha256 {code}")
    if job.approvals:
        lines.append(f"  code approval: {'; '.join(job.approvals)}")
    if job.sandboxes:
        lines.append(f"  ran in: {'; '.join(job.sandboxes)}")
    else:
        lines.append("  none of its code ran here")
    if job.tasks:
        lines.append(f"  tasks received: {_counts(job.tasks)}")
    left = f"  what left: {_counts(job.sent) or 'nothing'}"
    if job.weight_uploads:
        left += f"; {job.weight_uploads} with weights, {_size(job.bytes_sent)}" + (
            f" (the size of {job.unmeasured} not recorded)" if job.unmeasured else "")
    lines.append(left)
    if job.weight_uploads:
        lines.append(f"  privacy: {', '.join(job.filters) or 'no filter'}"
                     + (f"; raised by this site for {job.raised} upload(s)" if job.raised else "")
                     + (f"; up to {job.most_excluded} tensor(s) kept back per upload" if job.most_excluded else ""))
    if job.metric_values or job.scalar_points:
        groups = "; ".join(f"{group}: {', '.join(names)}" for group, names in job.metric_names.items() if names)
        lines.append(f"  numbers reported: {job.metric_values} value(s)" + (f" ({groups})" if groups else "")
                     + (f", {job.scalar_points} curve point(s)" if job.scalar_points else ""))
    if job.dp is not None or job.dp_refused:
        spent = "none" if job.dp is None else (f"epsilon {job.dp.get('epsilon_total', 0):.3g} at delta "
                                               f"{job.dp.get('delta')} after {job.dp.get('releases')} release(s)")
        lines.append(f"  DP spent: {spent}" + "".join(f"; {n} release(s) refused by {budget}"
                                                        for budget, n in sorted(job.dp_refused.items())))
    if job.errors_sent:
        lines.append(f"  error messages sent to the server ({sum(job.errors_sent.values())}):")
        lines += [f"    {times}x {reason}" for reason, times in job.errors_sent.most_common(MAX_REASONS_SHOWN)]
    if job.refusals:
        lines.append("  refused by this site:")
        lines += [f"    {times}x {reason}" for reason, times in job.refusals.most_common(MAX_REASONS_SHOWN)]
    if job.stopped:
        lines.append(f"  stopped by this site: {job.stopped[-1]}")
    if job.failures:
        lines.append(f"  tasks failed here: {job.failures}")
    return lines


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counter.items()))


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def as_json_text(activity: SiteActivity) -> str:
    return json.dumps(activity.as_json(), indent=1)


def main(argv: list[str] | None = None) -> int:
    """`python -m runtime.audit_report [LOG] [--job ID] [--since DATE] [--json]` (startup/audit_report.sh)."""
    import argparse
    import sys

    from .errors import AuditChainBroken

    parser = argparse.ArgumentParser(prog="audit_report.sh", description="What this site's audit trail says, "
                                     "job by job: who sent each job, what ran, what left, what was refused.")
    parser.add_argument("log", type=Path, nargs="?", help="an audit.jsonl (default: this kit's workspace/audit.jsonl)")
    parser.add_argument("--kit", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--job", help="only job ids starting with this")
    parser.add_argument("--since", type=_since_arg, help="only records from this UTC date or time on "
                        "(2026-11-01, 2026-11-01T08:00)")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args(argv)
    log = args.log or (args.kit or Path.cwd()) / "workspace" / "audit.jsonl"
    try:
        activity = summarize(log, args.job, args.since)
    except (AuditChainBroken, ConfigError, OSError) as e:
        print(f"audit_report: {e}", file=sys.stderr)
        return 1
    print(as_json_text(activity) if args.json else render(activity))
    return 0


def since_date(text: str) -> str:
    """An ISO date or date-time, as records' `time` begins (UTC); refuses anything else in one line."""
    from datetime import datetime

    try:
        datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r}: give a date (2026-11-01) or a UTC date and time "
                          "(2026-11-01T08:00)") from None
    return text


def _since_arg(text: str) -> str:
    import argparse

    try:
        return since_date(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--since {text!r}: ")) from None


if __name__ == "__main__":
    raise SystemExit(main())
