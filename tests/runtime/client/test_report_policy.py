"""What a job's own reports carry off a site: `reports:` in local/privacy.yml. Metric names and values,
logged scalars and a failed task's message are written by the job's code and leave outside the privacy
chain; the site withholds what its policy does not allow, rounds what it does, and says how much it kept
back (never which names). Checked on the policy and through ClientDaemon against a fake server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from runtime import kit_config as kc
from runtime.client.privacy_policy import PrivacyPolicy
from runtime.client.report_policy import GENERIC_ERROR, ReportPolicy
from runtime.client.worker_handle import WorkerFailed, WorkerOutOfMemory, WorkerTimedOut
from runtime.errors import ConfigError, JobRejected, UpdateRejected
from runtime.proto import fedkit_pb2 as pb
from runtime.server.metrics_check import check_metrics
from tests.runtime.client.test_site_refusals import FakeServer, _daemon, _events, _task

SECRET = "patient_0042_glucose_187"  # what a hostile learner tries to get out
REPORTED = {
    "train": {"loss": 0.123456789, SECRET: 187.0, "accuracy": 0.912345},
    "validation": {"accuracy": 0.87654321, "n_samples": 40.0, "auc": 0.9},
    "local": {"prox_term": 0.0012345},
    "scalars": [["loss", 1, 0.5123456], [SECRET, 2, 187.0]],
    "privacy": {"payload_sha256": "ab" * 32},  # the site's own entries pass as they are
}


def test_without_a_reports_section_everything_leaves_as_reported() -> None:
    assert PrivacyPolicy().reports.apply(REPORTED) == REPORTED


def test_only_allowed_names_leave_rounded_and_counted() -> None:
    policy = ReportPolicy(metric_names=["accuracy", "loss", "n_samples"], significant_digits=3)
    out = policy.apply(REPORTED)
    assert out["train"] == {"accuracy": 0.912, "loss": 0.123}
    assert out["validation"] == {"accuracy": 0.877, "n_samples": 40.0}
    assert out["local"] == {}
    assert out["scalars"] == [["loss", 1, 0.512]]
    assert out["privacy"] == REPORTED["privacy"]
    assert out["site_reports"] == {"metrics_withheld": True, "scalars_withheld": True, "significant_digits": 3}
    assert SECRET not in json.dumps(out)
    check_metrics(out)  # and the server takes it


def test_at_most_max_metrics_per_map_the_first_by_name() -> None:
    out = ReportPolicy(max_metrics=1).apply(REPORTED)
    assert out["train"] == {"accuracy": 0.912345}
    assert out["validation"] == {"accuracy": 0.87654321, "n_samples": 40.0}  # the weight on top of the cap
    assert out["site_reports"] == {"metrics_withheld": True}  # absent: false


def test_no_metrics_no_scalars() -> None:
    out = ReportPolicy(metric_names=[], scalars=False).apply(REPORTED)
    assert all(out[key] == {} for key in ("train", "validation", "local")) and "scalars" not in out
    assert out["site_reports"] == {"metrics_withheld": True, "scalars_withheld": True}


def test_steps_and_the_sample_count_are_rounded_too() -> None:
    """A step or a count is a number the job chooses as much as a value is."""
    policy = ReportPolicy(significant_digits=2)
    out = policy.apply({"scalars": [["loss", 123456789012345, 0.5], ["loss", 3, 0.25]]})
    assert out["scalars"] == [["loss", 120000000000000, 0.5], ["loss", 3, 0.25]]
    assert [policy.sample_count(n) for n in (0, 1, 7, 187, 123456)] == [0, 1, 7, 190, 120000]
    assert ReportPolicy().sample_count(123456) == 123456


def test_the_site_side_algorithms_figures_are_filtered_and_rounded_but_never_bounded() -> None:
    """The job's code shares the worker's process and can set local['lr_sum'] (16 digits of its choosing
    left the site whole); SCAFFOLD's server computes with it, so it is rounded, never set to 0 or capped."""
    policy = ReportPolicy(metric_names=["lr_sum", "steps"], significant_digits=2)
    out = policy.apply({"local": {"lr_sum": 0.3141592653589793, "steps": 1_234_567, "other": 1.0}})
    assert out["local"] == {"lr_sum": 0.31, "steps": 1_200_000}
    assert policy.apply({"local": {"lr_sum": 0.00001234}})["local"] == {"lr_sum": 0.000012}  # below min_magnitude


def test_rounding_never_makes_a_value_infinite() -> None:
    policy = ReportPolicy(significant_digits=1, max_magnitude=1.797e308)
    assert policy.apply({"train": {"big": 1.797e308}})["train"] == {"big": 1.797e308}


def test_with_rounding_the_exponent_carries_nothing_past_the_bounds() -> None:
    # a learner put a patient's value 14.4 in the exponent of `loss` (4e-15), which one digit kept whole
    policy = ReportPolicy(significant_digits=1)
    sent = policy.apply({"train": {"loss": 4e-15, "huge": -3.2e200, "auc": 0.93, "n_samples": 2_345_678},
                         "validation": {"acc": 0.000049, "n_samples": 12_345_678}})
    assert sent["train"] == {"auc": 0.9, "huge": -1e6, "loss": 0.0, "n_samples": 2_000_000}
    assert sent["validation"] == {"acc": 0.0, "n_samples": 10_000_000}  # a weight is rounded, never capped
    assert policy.sample_count(12_345_678) == 10_000_000
    wide = ReportPolicy(significant_digits=2, min_magnitude=1e-20, max_magnitude=1e20)
    assert wide.apply({"train": {"loss": 4.1e-15}})["train"] == {"loss": 4.1e-15}
    assert ReportPolicy().apply({"train": {"loss": 4e-15}})["train"] == {"loss": 4e-15}  # no rounding: as computed


@pytest.mark.parametrize(("policy", "from_job_code", "sent"), [
    (ReportPolicy(), True, f"ValueError: {SECRET}"),
    (ReportPolicy(error_details=False), True, GENERIC_ERROR),
    (ReportPolicy(error_details=False), False, "training worker gave no answer within 60 s"),  # the site's own
])
def test_error_text(policy: ReportPolicy, from_job_code: bool, sent: str) -> None:
    message = f"ValueError: {SECRET}" if from_job_code else "training worker gave no answer within 60 s"
    assert policy.error_text(message, shaped_by_job=from_job_code) == sent


def test_a_bad_pattern_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "privacy.yml"
    path.write_text("reports: {metric_names: ['acc(']}\n")
    with pytest.raises(ConfigError, match="reports.metric_names"):
        PrivacyPolicy.load(path)


# ---- through the daemon: what reaches the server, what stays in the site's audit ------------------------

def _run_one(tmp_path: Path, privacy: PrivacyPolicy, execute: Any) -> tuple[FakeServer, Any]:
    server = FakeServer()
    daemon = _daemon(tmp_path, server, privacy=privacy)

    async def no_job(*args: Any) -> None:  # the job's folder and worker: not what this test is about
        return None

    daemon._ensure_job, daemon._execute = no_job, execute
    asyncio.run(daemon._do_task(_task(daemon, "job-a", "validate", 1)))
    return server, daemon


def _header(server: FakeServer) -> pb.ResultHeader:
    (messages,) = server.results
    return pb.ResultChunk.FromString(messages[0]).header


def test_the_server_receives_only_what_the_site_allows(tmp_path: Path) -> None:
    async def execute(*args: Any) -> tuple[int, dict[str, Any], None]:
        return 187, {"validation": dict(REPORTED["validation"], **{SECRET: 187.0}),
                   "scalars": REPORTED["scalars"]}, None

    policy = PrivacyPolicy(reports=ReportPolicy(metric_names=["accuracy", "n_samples"], significant_digits=2,
                                                scalars=False))
    server, _ = _run_one(tmp_path, policy, execute)
    assert _header(server).n_samples == 190
    sent = json.loads(_header(server).metrics_json)
    assert sent == {"validation": {"accuracy": 0.88, "n_samples": 40.0},
                    "site_reports": {"metrics_withheld": True, "scalars_withheld": True, "significant_digits": 2}}


@pytest.mark.parametrize("error", [
    WorkerFailed(f"ValueError: {SECRET}"),  # the learner's exception
    UpdateRejected(f"tensor '{SECRET}': holds NaN or Inf"),  # a name inside the weights it wrote
    WorkerFailed("training worker exited with code 187 (see the site log)"),  # an exit code it chose
], ids=["exception", "tensor_name", "exit_code"])
def test_what_the_job_could_shape_in_an_error_stays_on_the_site(tmp_path: Path, error: Exception) -> None:
    async def execute(*args: Any) -> None:
        raise error

    server, daemon = _run_one(tmp_path, PrivacyPolicy(reports=ReportPolicy(error_details=False)), execute)
    assert _header(server).error == GENERIC_ERROR
    assert [r["reason"] for r in _events(daemon, "error_reported")] == [GENERIC_ERROR]
    assert str(error) in _events(daemon, "task_failed")[0]["reason"]  # site IT still sees what happened


@pytest.mark.parametrize("error", [
    JobRejected("job job-a: DP budget exhausted on this site"),
    WorkerTimedOut("training worker gave no answer within 60 s: this site's cap (local/site.yml sandbox.max_task_s)"),
    WorkerOutOfMemory("training worker was killed (exit code -9): it used more memory than this site lets a job "
                      "use (local/site.yml sandbox.memory_mb)"),
], ids=["dp_budget", "task_time_cap", "memory_limit"])
def test_the_sites_own_reasons_still_leave(tmp_path: Path, error: Exception) -> None:
    async def execute(*args: Any) -> None:
        raise error

    server, _ = _run_one(tmp_path, PrivacyPolicy(reports=ReportPolicy(error_details=False)), execute)
    assert _header(server).error == str(error)


def test_a_failure_report_names_files_in_the_kit_without_the_kits_location(tmp_path: Path) -> None:
    """The site's own messages name its files (an unreadable DP ledger, a full disk); the server learns which
    file of the kit, not where the kit lives on the site's disk. The site's audit keeps the whole path."""
    kit_location = str(tmp_path / "kit")

    async def execute(*args: Any) -> None:
        raise JobRejected(f"{kit_location}/workspace/jobs/job-a/dp_ledger.json: this job's DP ledger cannot be "
                          f"read (next to {kit_location}-data)")

    server, daemon = _run_one(tmp_path, PrivacyPolicy(), execute)
    assert _header(server).error == ("<kit>/workspace/jobs/job-a/dp_ledger.json: this job's DP ledger cannot be read "
                                     f"(next to {kit_location}-data)")  # another folder that starts alike: as is
    assert kit_location in _events(daemon, "task_failed")[0]["reason"]


def test_a_failure_report_names_the_sites_data_folder_by_a_placeholder(tmp_path: Path) -> None:
    """The learner's own exception (allowed out by the default policy) often names a file it could not read:
    the server learns that it was under the site's data folder, not that folder's name, which may say whose
    data it is. A data folder inside the kit is named as the data folder."""
    data_root = tmp_path / "kit" / "data" / "ward-7-patients"
    server = FakeServer()
    daemon = _daemon(tmp_path, server)
    daemon._settings = kc.SiteLocalSettings(data_root=str(data_root))

    async def no_job(*args: Any) -> None:
        return None

    async def execute(*args: Any) -> None:
        raise WorkerFailed(f"FileNotFoundError: {data_root}/scan-0042.nii (kit at {tmp_path / 'kit'})")

    daemon._ensure_job, daemon._execute = no_job, execute
    asyncio.run(daemon._do_task(_task(daemon, "job-a", "validate", 1)))
    assert _header(server).error == "FileNotFoundError: <data_root>/scan-0042.nii (kit at <kit>)"
    assert str(data_root) in _events(daemon, "task_failed")[0]["reason"]


def test_n_samples_is_never_cut_by_max_metrics() -> None:
    """It weighs this site's other metrics across sites; cut, a score would count as from one sample."""
    out = ReportPolicy(max_metrics=1).apply({"validation": {"accuracy": 0.5, "auc": 0.6, "n_samples": 34.0}})
    assert out["validation"] == {"accuracy": 0.5, "n_samples": 34.0}


def test_a_withheld_key_metric_is_flagged() -> None:
    policy = ReportPolicy(metric_names=["score", "n_samples"])
    out = policy.apply({"validation": {"auc": 0.9, "score": 0.5, "n_samples": 3.0}}, key_metric="auc")
    assert out["site_reports"]["key_metric_withheld"] is True
    kept = policy.apply({"validation": {"score": 0.5, "n_samples": 3.0}}, key_metric="score")
    assert "site_reports" not in kept
    train_only = policy.apply({"train": {"auc": 0.9}}, key_metric="auc")  # not a validation: nothing to flag
    assert train_only["site_reports"] == {"metrics_withheld": True}


def test_reports_null_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "privacy.yml"
    path.write_text("reports: null\n")
    assert PrivacyPolicy.load(path).reports.is_open


def test_the_local_map_leaves_only_a_site_side_algorithms_own_figures() -> None:
    """The job's code shares the worker's process, so it could fill the map at will: only steps (a whole
    count) and lr_sum leave, and only when an algorithm ran."""
    from runtime.client.daemon import _local_figures
    from runtime.task_config import TaskConfig
    from runtime.tasks import Scaffold

    reply = {"local": {"lr_sum": 0.5, "steps": 10.0, "patient_7_age": 14.40002699}}
    assert _local_figures(reply, TaskConfig()) == {}
    assert _local_figures(reply, TaskConfig(algorithm=Scaffold())) == {"lr_sum": 0.5, "steps": 10.0}
    odd = {"local": {"lr_sum": 0.5, "steps": 1234567.891011}}  # the job's digits, not a count
    assert _local_figures(odd, TaskConfig(algorithm=Scaffold())) == {"lr_sum": 0.5}
