"""What a job's own reports carry off a site, over real processes: the learner (tests/e2e/jobs/leaky) puts
the first patient's row of the site's train.csv into a metric name, a metric value, a logged scalar and,
in round 2, an exception's message. Under the site's `reports:` policy none of it reaches the server: not
its job folder, not its log, not show_job, not tail_log; the site's own audit and log keep the error for
site IT."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from runtime.client.daemon import NO_LOG
from runtime.client.report_policy import GENERIC_ERROR

LEAKY_JOB = Path(__file__).parent / "jobs" / "leaky"
REPORTS = {"metric_names": ["score", "n_samples", "loss"], "significant_digits": 3, "scalars": False,
           "error_details": False}


def _row_name(data_root: Path) -> str:
    """The name the learner gives the first patient's row (tests/e2e/jobs/leaky/custom/learner.py)."""
    row = (data_root / "train.csv").read_text().splitlines()[1]
    return "row_" + re.sub(r"[^A-Za-z0-9]", "_", row)[:60]


def _all_text(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()
                     and p.suffix in (".json", ".jsonl", ".txt", ".log", ""))


def test_the_site_keeps_what_its_reports_policy_does_not_allow(make_study, tmp_path):
    handle = make_study(sites=["site-1"])
    study = handle.study
    secret = _row_name(handle.data.site_dirs["site-1"])
    study.write_local("site-1", "privacy.yml", {"reports": REPORTS})
    study.update_local("site-1", "site.yml", {"send_log": False})
    study.start_server()
    study.start_sites()

    job = Path(shutil.copytree(LEAKY_JOB, tmp_path / "leaky"))
    job_id = study.admin_json(f"submit_job {job}")["job_id"]
    try:
        study.admin(f"wait_job {job_id} 240", timeout_s=270)
    except RuntimeError:
        pass  # round 2 fails on the site, by design; the job ends either way
    shown = study.admin_json(f"show_job {job_id}")
    table = study.admin(f"show_job {job_id}", as_json=False).stdout

    # nothing the learner chose to carry the row reached the server
    server_ws = study.kits[study.server] / "workspace"
    for where, text in (("the server's job folder", _all_text(server_ws / "jobs" / job_id)),
                        ("the server's log", (server_ws / "log.txt").read_text()),
                        ("show_job", json.dumps(shown) + table)):
        assert secret not in text, where
        assert '"feature"' not in text, where
    # what was allowed arrived, rounded; the site said how much it kept back
    rounds = [e for e in shown["metrics"] if e["type"] == "round"]
    assert rounds and rounds[0]["train"]["site-1"] == {"loss": 0.5}
    validations = [e for e in shown["metrics"] if e["type"] == "validation"]
    assert validations and all(e["sites"]["site-1"]["score"] == 0.123 for e in validations)
    kept = [e["sites"]["site-1"] for e in shown["metrics"] if e["type"] == "site_reports"]
    assert kept and all(k["significant_digits"] == 3 for k in kept)
    assert any(k.get("metrics_withheld") for k in kept) and any(k.get("scalars_withheld") for k in kept)
    assert "site-1: metrics withheld in" in table
    # round 2's error: the server was told only that the job's code failed; site IT has the message
    assert GENERIC_ERROR in json.dumps(shown)
    site_audit = [json.loads(line) for line in
                  (study.kits["site-1"] / "workspace" / "audit.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in site_audit if r["event"] == "error_reported"] == [GENERIC_ERROR]
    assert any(secret in r["reason"] for r in site_audit if r["event"] == "task_failed")
    # site IT can say from its own audit what left: each result's metrics as sent, and the hash of their text
    sent = [r for r in site_audit if r["event"] == "update_sent"]
    assert sent and all(len(r["metrics_sha256"]) == 64 for r in sent)
    train_sent = [r["reported"]["train"] for r in sent if r["task"] == "train"]
    assert train_sent and train_sent[0] == {"loss": 0.5}  # what show_job's round shows arrived
    assert all(r["reported"]["validation"]["score"] == 0.123 for r in sent if "validation" in r["reported"]
               and r["reported"]["validation"])
    assert all(secret not in json.dumps(r["reported"]) for r in sent)
    assert secret in (study.kits["site-1"] / "workspace" / "log.txt").read_text()  # and its log does
    # which is why the site may keep its log from tail_log (local/site.yml send_log: false)
    assert study.admin_json("tail_log site-1")["lines"] == [NO_LOG]
