"""What leaves a site: the effective chain on deltas, whole initial models and local models (relative to
the last global), with excluded tensors absent and the report's hash equal to the bytes written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from runtime.client.dp_ledger import DpLedger
from runtime.client.outgoing import prepare
from runtime.client.privacy_policy import PrivacyPolicy
from runtime.errors import UpdateRejected
from runtime.filters import gaussian_dp
from runtime.job_spec import FilterConfig
from runtime.privacy_report import MAX_NAME_CHARS, describe_chain
from runtime.weights import load_file, save_file

DP = {"gaussian_dp": {"noise_multiplier": 0.5, "clip_norm": 1.0}}


def model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"0.weight": rng.normal(0, 1, (4, 3)).astype(np.float32), "0.bias": rng.normal(0, 1, 4).astype(np.float32),
            "2.bias": np.array([3.0], dtype=np.float32), "steps": np.array([7], dtype=np.int64)}


def ledger(files: dict[str, Path]) -> DpLedger:
    return DpLedger(files["job"], "j")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {"raw": tmp_path / "raw.safetensors", "ref": tmp_path / "ref.safetensors",
             "out": tmp_path / "out.safetensors", "job": tmp_path / "job"}
    save_file(model(1), paths["raw"])
    save_file(model(2), paths["ref"])
    return paths


def test_exclusions_never_leave_in_any_task(files: dict[str, Path]) -> None:
    chain = PrivacyPolicy(exclude_vars=["^2\\.bias$"], **DP).chain_for("j", [])
    for task in ("train", "init", "submit_model"):
        report = prepare(task, files["raw"], files["out"], chain, np.random.default_rng(0), files["ref"],
                     ledger=ledger(files))
        sent = load_file(files["out"])
        assert "2.bias" not in sent and report.n_excluded == 1
        # an init model's names are the job's choice: counted, never listed (one more channel out)
        assert report.excluded == ([] if task == "init" else ["2.bias"])
        assert report.payload_sha256 == hashlib.sha256(files["out"].read_bytes()).hexdigest()
        assert report.raised and report.task == task


def test_delta_is_clipped_and_noised(files: dict[str, Path]) -> None:
    chain = PrivacyPolicy(**DP).chain_for("j", [])
    report = prepare("train", files["raw"], files["out"], chain, np.random.default_rng(0), files["ref"],
                     ledger=ledger(files))
    raw, sent = load_file(files["raw"]), load_file(files["out"])
    assert report.applied_to == "delta"
    for name in ("0.weight", "0.bias", "2.bias"):
        assert not np.allclose(sent[name], raw[name])
    # an integer buffer cannot be clipped or noised: it leaves blank (a zero delta), not as the job wrote it
    np.testing.assert_array_equal(sent["steps"], np.zeros(1, dtype=np.int64))
    assert report.zeroed == ["steps"] and report.n_zeroed == 1


@pytest.mark.parametrize("filters", [{**DP}, {"percentile": {"fraction": 0.5}}], ids=["gaussian_dp", "percentile"])
def test_data_parked_in_an_integer_tensor_never_leaves_under_a_chain_that_changes_values(
        files: dict[str, Path], filters: dict) -> None:
    """A hostile learner writes a patient's record into an int64 buffer: the site's DP (or any value-changing
    floor) cannot filter it, so it leaves as what the server already holds, never as written."""
    record = np.array([2161, 2228, 14440, 140700, 1167], dtype=np.int64)
    leaky = {**model(1), "leak.buf": record, "flags": np.array([True, False])}
    save_file(leaky, files["raw"])
    save_file({**model(2), "leak.buf": np.arange(5, dtype=np.int64), "flags": np.array([False, False])}, files["ref"])
    chain = PrivacyPolicy(**filters).chain_for("j", []) if "gaussian_dp" in filters else \
        PrivacyPolicy().chain_for("j", [FilterConfig(name="percentile", args=filters["percentile"])])

    for task, expected in (("train", np.zeros(5, np.int64)), ("init", np.zeros(5, np.int64)),
                           ("submit_model", np.arange(5, dtype=np.int64))):  # the last global's value
        report = prepare(task, files["raw"], files["out"], chain, np.random.default_rng(0), files["ref"],
                         ledger=ledger(files))
        sent = load_file(files["out"])
        np.testing.assert_array_equal(sent["leak.buf"], expected, err_msg=task)
        assert not sent["flags"][0], task
        assert report.n_zeroed == 3, task
        assert report.zeroed == (None if task == "init" else ["flags", "leak.buf", "steps"]), task  # init: counted
        assert "3 non-float tensor(s) sent blank" in describe_chain(report.model_dump(mode="json", exclude_none=True))


def test_exclusions_alone_send_integer_tensors_as_they_are(files: dict[str, Path]) -> None:
    """exclude_vars changes no value: what it lets through leaves bit for bit, and nothing is reported blank."""
    chain = PrivacyPolicy(exclude_vars=["^2\\.bias$"]).chain_for("j", [])
    report = prepare("train", files["raw"], files["out"], chain, np.random.default_rng(0), files["ref"],
                     ledger=ledger(files))
    np.testing.assert_array_equal(load_file(files["out"])["steps"], load_file(files["raw"])["steps"])
    assert report.zeroed is None and "zeroed" not in report.model_dump(mode="json", exclude_none=True)


def test_local_model_is_last_global_plus_a_filtered_delta(files: dict[str, Path]) -> None:
    """Percentile on (local - last global): the entries not sent keep the global's values, so the model
    stays a model; and the kept entries are exactly the local ones."""
    chain = PrivacyPolicy().chain_for("j", [FilterConfig(name="percentile", args={"fraction": 0.25})])
    report = prepare("submit_model", files["raw"], files["out"], chain, np.random.default_rng(0), files["ref"],
                     ledger=ledger(files))
    raw, ref, sent = load_file(files["raw"]), load_file(files["ref"]), load_file(files["out"])
    assert report.applied_to == "model_minus_last_global"
    w_raw, w_ref, w_sent = raw["0.weight"], ref["0.weight"], sent["0.weight"]
    from_local = np.isclose(w_sent, w_raw, atol=1e-6)
    from_global = np.isclose(w_sent, w_ref, atol=1e-6)
    assert np.all(from_local | from_global)
    assert from_local.sum() == 3  # ceil(0.25 * 12) entries with the largest change
    changed = np.abs(w_raw - w_ref)
    assert changed[from_local].min() >= changed[~from_local].max()


def test_a_local_model_without_the_model_received_is_refused(files: dict[str, Path]) -> None:
    """A site that never trained has no local model of the job's: its code could name tensors at will, and the
    server's refusal echoed a name into show_job (it was filtered whole, as an init model, before)."""
    save_file({**model(1), "PATIENT_4711_DIAG_C34_1": np.zeros(3, np.float32)}, files["raw"])
    chain = PrivacyPolicy(**DP).chain_for("j", [])
    with pytest.raises(UpdateRejected, match="no model received"):
        prepare("submit_model", files["raw"], files["out"], chain, np.random.default_rng(0),
                files["ref"].with_name("missing.safetensors"), ledger=ledger(files))
    assert not files["out"].exists()


def test_initial_model_gets_the_chain_whole(files: dict[str, Path]) -> None:
    """Round 0 has no reference: DP clips the whole model to clip_norm before the noise."""
    chain = PrivacyPolicy(gaussian_dp={"noise_multiplier": 0.0, "clip_norm": 1.0}).chain_for("j", [])
    report = prepare("init", files["raw"], files["out"], chain, np.random.default_rng(0), files["ref"],
                     ledger=ledger(files))
    sent = load_file(files["out"])
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in sent.values() if v.dtype.kind == "f"))
    assert report.applied_to == "whole_model" and norm == pytest.approx(1.0, rel=1e-5)


def test_no_filters_send_the_weights_bit_for_bit(files: dict[str, Path]) -> None:
    chain = PrivacyPolicy().chain_for("j", [])
    report = prepare("submit_model", files["raw"], files["out"], chain, np.random.default_rng(0), files["ref"],
                     ledger=ledger(files))
    raw, sent = load_file(files["raw"]), load_file(files["out"])
    assert report.chain == [] and not report.raised and report.applied_to == "whole_model"
    for name in raw:
        np.testing.assert_array_equal(sent[name], raw[name])


def test_the_report_says_why_the_site_raised_the_chain(files: dict[str, Path]) -> None:
    """show_job's 'raised by site' comes with the site's reasons: what was below its minimum, what was missing."""
    policy = PrivacyPolicy(gaussian_dp={"noise_multiplier": 1.0, "clip_norm": 1.0}, percentile={"fraction": 0.5})
    chain = policy.chain_for("j", [FilterConfig(name="gaussian_dp", args={"noise_multiplier": 0.5, "clip_norm": 1.0})])
    report = prepare("train", files["raw"], files["out"], chain, np.random.default_rng(0), files["ref"],
                     ledger=ledger(files))

    assert report.raised_because == [
        "gaussian_dp noise_multiplier=0.5 is below this site's minimum 1",
        "the job asks for no percentile; this site requires percentile with fraction <= 0.5"]
    line = describe_chain(report.model_dump(mode="json", exclude_none=True))
    assert line.endswith("; raised by site (gaussian_dp noise_multiplier=0.5 is below this site's minimum 1; "
                         "the job asks for no percentile; this site requires percentile with fraction <= 0.5)")


def test_a_chain_the_site_did_not_raise_gives_no_reasons(files: dict[str, Path]) -> None:
    chain = PrivacyPolicy().chain_for("j", [FilterConfig(name="percentile", args={"fraction": 0.5})])
    report = prepare("train", files["raw"], files["out"], chain, np.random.default_rng(0), files["ref"],
                     ledger=ledger(files))

    assert report.raised_because is None and not report.raised


# ---- what the job's code wrote is checked before any filter reads it ----------------------------------------

def test_a_nan_cannot_switch_off_dp_clipping_and_be_excluded_after(files: dict[str, Path]) -> None:
    """A NaN made gaussian_dp's norm NaN (no clipping); the job then excluded the NaN's tensor after the DP
    step, so raw values x1000 left with the site's usual epsilon. Refused before the chain, nothing charged."""
    secret = np.array([14.4, 13.85, 14.96, 20.64], dtype=np.float32)
    save_file({"w": secret * 1000, "carrier": np.array([np.nan], np.float32)}, files["raw"])
    save_file({"w": np.zeros(4, np.float32), "carrier": np.zeros(1, np.float32)}, files["ref"])
    chain = PrivacyPolicy(gaussian_dp={"noise_multiplier": 1.0, "clip_norm": 1.0}).chain_for(
        "j", [FilterConfig(name="gaussian_dp", args={"noise_multiplier": 1.0, "clip_norm": 1.0}),
              FilterConfig(name="exclude_vars", args={"pattern": "^carrier$"})])
    for task in ("train", "init", "submit_model"):
        with pytest.raises(UpdateRejected, match="NaN or Inf in 1 tensor"):
            prepare(task, files["raw"], files["out"], chain, np.random.default_rng(0), files["ref"],
                    ledger=ledger(files))
        assert not files["out"].exists(), task
    assert ledger(files).read().releases == 0


def test_the_dp_filter_itself_refuses_a_norm_that_is_not_finite() -> None:
    dp = gaussian_dp(clip_norm=1.0, noise_multiplier=1.0)
    for bad in (np.nan, np.inf):
        with pytest.raises(UpdateRejected, match="norm is not finite"):
            dp({"w": np.array([1.0, bad], np.float32)}, np.random.default_rng(0))


@pytest.mark.parametrize("written", [
    {"extra": np.zeros(3, np.float32)},                      # a tensor the model lacks: its name would leave
    {"leak": np.zeros((0, 1440026), np.int64)},              # empty, yet its shape carries a number
    {"0.bias": np.zeros(5, np.float32)},                     # another shape
    {"0.bias": np.zeros(4, np.float64)},                     # another dtype
], ids=["unknown-name", "empty-shape", "shape", "dtype"])
@pytest.mark.parametrize("floor", [{}, DP], ids=["no-floor", "dp-floor"])
def test_a_delta_or_local_model_must_fit_the_model_received(files: dict[str, Path], written: dict,
                                                           floor: dict) -> None:
    """Names and shapes the job chose passed every filter, and the server's refusal echoed them into
    show_job; the site refuses them first, in words that name none of them."""
    save_file({**model(1), **written}, files["raw"])
    chain = PrivacyPolicy(**floor).chain_for("j", [])
    for task in ("train", "submit_model"):
        with pytest.raises(UpdateRejected, match=r"does not fit the model this site received") as caught:
            prepare(task, files["raw"], files["out"], chain, np.random.default_rng(0), files["ref"],
                    ledger=ledger(files))
        assert not any(name in str(caught.value) for name in written), caught.value
        assert not files["out"].exists()


def test_a_train_delta_without_the_model_received_is_refused(files: dict[str, Path]) -> None:
    with pytest.raises(UpdateRejected, match="no model received"):
        prepare("train", files["raw"], files["out"], PrivacyPolicy().chain_for("j", []), np.random.default_rng(0),
                files["ref"].with_name("missing.safetensors"), ledger=ledger(files))


def test_a_report_lists_no_name_the_job_chose_and_cuts_long_ones(files: dict[str, Path]) -> None:
    """An init model's names are the job's: its report counts what was excluded but names none (a 300-character
    name there crashed the site daemon on the report's length limit). A global model's long name is cut."""
    long_name = "x_" + "A" * 300
    save_file({**model(1), long_name: np.ones(2, np.float32)}, files["raw"])
    chain = PrivacyPolicy(**DP).chain_for("j", [FilterConfig(name="exclude_vars", args={"pattern": "^x_"})])
    report = prepare("init", files["raw"], files["out"], chain, np.random.default_rng(0), None, ledger=ledger(files))
    assert report.excluded == [] and report.n_excluded == 1

    save_file({**model(2), long_name: np.ones(2, np.float32)}, files["ref"])  # a global model with that name
    report = prepare("train", files["raw"], files["out"], chain, np.random.default_rng(0), files["ref"],
                     ledger=ledger(files))
    assert report.n_excluded == 1 and len(report.excluded[0]) == MAX_NAME_CHARS
    assert report.excluded[0].startswith("x_AAA") and report.excluded[0].endswith("...")
