"""The site's audit report (runtime/audit_report.py): it reads only a log whose chain holds, reads a log
being written, selects by job and date, and says in words what a job did at the site. What a real site's
records hold is checked end to end in tests/e2e/test_site_dp.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from provision.cli import app
from runtime.audit import AuditLog
from runtime.audit_report import main, render, summarize
from runtime.errors import AuditChainBroken, ConfigError

SUBMITTER = {"name": "lead@study.org", "org": "coordinating-center", "role": "lead"}


def _site_log(path: Path, days: list[str]) -> AuditLog:
    """A site that ran job `j-<day>` on each of `days` (a train round, 1000 bytes sent through percentile)."""
    clock_value = {"now": ""}
    audit = AuditLog(path, clock=lambda: clock_value["now"])
    for day in days:
        clock_value["now"] = f"{day}T08:00:00.000+00:00"
        audit.append("client_started", site="site-1", org="hospital-a")
        job = f"j-{day}"
        audit.append("task_received", job_id=job, task="train", round=1, task_id="t", payload_sha256="a" * 64)
        audit.append("job_received", job_id=job, job_name="study", job_sha256="b" * 64, code_sha256="c" * 64,
                     code_approval="approved hash", submitter=SUBMITTER)
        audit.append("worker_started", job_id=job, backend="bwrap", threads=2, limits={"memory": "8 GiB"})
        audit.append("update_sent", job_id=job, task="train", round=1, n_samples=10, payload_sha256="d" * 64,
                     payload_bytes=1000, privacy={"chain": [{"name": "percentile", "source": "site"}],
                                                  "raised": True, "n_excluded": 3},
                     reported={"train": {"loss": 0.5}, "validation": {"auc": 0.9, "loss": 0.4}, "local": {},
                               "scalar_points": 12})
    return audit


def test_the_report_says_who_sent_what_ran_and_what_left(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    audit = _site_log(log, ["2026-11-01"])
    audit.append("task_received", job_id="refused-job", task="train", round=1, task_id="u", payload_sha256="")
    audit.append("job_refused", job_id="refused-job", rule="code", reason="its code hash is not approved",
                 submitter=SUBMITTER)
    audit.append("error_reported", job_id="refused-job", task="train", round=1,
                 reason="refused: not approved\x1b[2J\x1b[31m")  # a job's text: a terminal must not obey it
    text = render(summarize(log))
    assert "site-1 (hospital-a)" in text and "chain intact" in text
    ran, refused = text.split("\n\njob ")[1:]
    assert "submitted by lead@study.org (coordinating-center, lead)" in ran and f"code sha256 {'c' * 64}" in ran
    assert "ran in: bwrap (memory 8 GiB)" in ran and "what left: train 1; 1 with weights, 1.0 kB" in ran
    assert "privacy: percentile (site); raised by this site for 1 upload(s); up to 3 tensor(s) kept back" in ran
    assert "numbers reported: 3 value(s) (train: loss; validation: auc, loss), 12 curve point(s)" in ran
    assert "none of its code ran here" in refused and "1x code: its code hash is not approved" in refused
    assert "error messages sent to the server (1):\n    1x refused: not approved\\x1b[2J\\x1b[31m" in refused
    assert "\x1b" not in text


def test_a_log_whose_chain_breaks_gets_no_report(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _site_log(log, ["2026-11-01", "2026-11-02"])
    lines = log.read_text().splitlines()
    lines[4] = lines[4].replace('"payload_bytes":1000', '"payload_bytes":10')  # what left, made smaller
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditChainBroken, match=r"audit.jsonl:5: record was modified"):
        summarize(log)
    result = CliRunner().invoke(app, ["audit", "report", str(log)])
    assert result.exit_code == 1 and "record was modified" in result.output and "what left" not in result.output


def test_a_log_being_written_is_read_up_to_its_last_whole_record(tmp_path: Path, capsys) -> None:
    log = tmp_path / "audit.jsonl"
    _site_log(log, ["2026-11-01"])
    with log.open("ab") as f:
        f.write(b'{"event":"update_sent","job_id":"j-2026-11-01","pay')  # the site appending right now
    assert main([str(log), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 5 and report["jobs"][0]["results_sent"] == {"train": 1}


def test_since_and_job_select_what_is_summarized(tmp_path: Path, capsys) -> None:
    log = tmp_path / "audit.jsonl"
    _site_log(log, ["2026-10-30", "2026-11-01", "2026-11-02"])
    assert [j.job_id for j in summarize(log, since="2026-11-01").jobs.values()] == ["j-2026-11-01", "j-2026-11-02"]
    assert [j.job_id for j in summarize(log, job="j-2026-11-02").jobs.values()] == ["j-2026-11-02"]
    assert summarize(log, since="2026-11-01").starts == 2
    with pytest.raises(SystemExit) as refused:  # argparse's usage error, with the one line why
        main([str(log), "--since", "last week"])
    assert refused.value.code == 2 and "--since: give a date (2026-11-01)" in capsys.readouterr().err


def test_a_server_log_or_a_missing_one_is_refused_in_one_line(tmp_path: Path) -> None:
    server_log = tmp_path / "server.jsonl"
    AuditLog(server_log).append("server_started", project="p", name="server")
    with pytest.raises(ConfigError, match="is a server's audit log"):
        summarize(server_log)
    with pytest.raises(ConfigError, match="no such audit log"):
        summarize(tmp_path / "nothing.jsonl")
