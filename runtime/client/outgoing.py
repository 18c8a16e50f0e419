"""The site's last step before weights leave: apply the effective privacy chain and write the bytes to send.

Everything a site uploads goes through `prepare`, whatever the task:

    train         the delta (trained minus received): the chain runs on it as is
    submit_model  the local model for cross-site validation, as `last global + chain(local - last global)`:
                  the server already holds the last global model it sent, so what the site reveals is a
                  filtered delta, exactly as strong as every round's; clipping and noise stay in scale with
                  a delta instead of wrecking a whole model. Without a last global it is refused: a site
                  that never received a model has no local model of the job's, only names of its choosing.
    init          the round-0 model: there is nothing the server already holds, so the chain runs on the
                  whole model (gaussian_dp clips the whole model to clip_norm and adds noise). A job that
                  ships `initial_model` avoids this, since then no site builds round 0.

What the job's code wrote is checked before the chain runs: a train delta or a local model may hold only
tensors of the model this site received, with their dtypes and shapes (names and shapes the job chose would
leave past every filter, and the server's refusal would echo them), and under a chain with steps every float
must be finite (one NaN made gaussian_dp's clipping norm NaN, which clipped nothing). A report lists only
names the server already has: none for init, whose names are the job's.

Tensors removed by exclude_vars never leave in any task. The result is written once, hashed from the same
bytes, and described by a PrivacyReport (runtime.privacy_report), which the daemon sends and audits.
An upload through gaussian_dp is a DP release: it is counted in the job's ledger and the site's (and refused
past the site's dp_budget or dp_site_budget) before anything is written to send, and the report says what
it cost (`dp`).
Runs in a worker thread (NumPy and file I/O); never imports torch, never unpickles. NumPy, safetensors and
the filters are imported only when a chain has steps: a site that sends its weights as they are never loads them.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UpdateRejected
from ..privacy_report import MAX_CHAIN_STEPS, MAX_EXCLUDED_LISTED, MAX_NAME_CHARS, AppliedTo, PrivacyReport
from ..safetensors_header import read_layout
from ..tasks import CONTROL_PREFIX, RESULT_WEIGHTS, TaskKind
from .dp_ledger import DpLedger
from .privacy_policy import EffectiveChain

if TYPE_CHECKING:
    import numpy as np

    from ..weights import Weights

Task = TaskKind  # the kinds that send weights: runtime.tasks.RESULT_WEIGHTS


def prepare(task: Task, raw_path: Path, out_path: Path, chain: EffectiveChain, rng: Any,
            reference_path: Path | None = None, *, ledger: DpLedger) -> PrivacyReport:
    """Filter the weights in `raw_path` as `task` requires, write what may leave to `out_path`, and report.
    `reference_path`: the last global model this site received (train: the one just trained on; required
    for train and submit_model); `ledger`: the job's count of DP releases on this site; `rng`: a NumPy
    Generator, or a callable that makes one (so a chain without steps needs no NumPy). Raises UpdateRejected
    if a file is not valid safetensors or not what the task may send, and DpBudgetExhausted (out_path then
    absent) when the site's DP budget does not allow this release."""
    out_path.unlink(missing_ok=True)  # nothing from an earlier attempt may be sent in this one's place
    # names a report may list: those of a model the server sent, once what was written is checked against it;
    # a delta or local model without the model it came from is refused (a site that never trained has none)
    checked = task != TaskKind.INIT
    if checked:
        _check_layout(task, raw_path, reference_path)
    if not chain.steps:  # nothing to apply: send the file as it is, without a load and a rewrite
        return _unfiltered(task, raw_path, out_path, chain)
    from ..filters import apply_filters
    from ..weights import load_file, to_bytes

    rng = rng() if callable(rng) else rng
    raw = load_file(raw_path)
    _check_finite(raw)
    # only a filter that changes values needs the reference; exclusions alone send the model bit for bit
    changes_values = any(step.name != "exclude_vars" for step in chain.steps)
    reference = load_file(reference_path) if task == TaskKind.SUBMIT_MODEL and changes_values \
        and reference_path is not None and reference_path.exists() else None
    applied_to: AppliedTo = "delta" if RESULT_WEIGHTS[task] == "delta" else "whole_model" if reference is None \
        else "model_minus_last_global"
    # the filters change float tensors only: under a chain that changes values, anything else (integer or
    # bool buffers, where a job could park raw data) leaves carrying nothing the site computed
    raw, zeroed = _blank_unfilterable(raw, reference) if changes_values else (raw, [])
    subject = raw if reference is None else _minus(raw, reference)
    filtered = apply_filters(subject, chain.build(), rng)
    sent = filtered if reference is None else _plus(filtered, reference)
    data = to_bytes(sent)
    # counted (or refused) before the bytes exist anywhere they could be sent from; weights the privacy
    # step cannot read fail above without spending any of the budget
    release = chain.dp_release()
    dp = ledger.charge(*release, chain.dp_budget, chain.dp_site_budget) if release is not None else None
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out_path)
    excluded = sorted(set(raw) - set(sent))
    zeroed = sorted(set(zeroed) & set(sent))  # an excluded tensor did not leave at all
    return PrivacyReport(task=task, applied_to=applied_to, on_weaker_job=chain.on_weaker_job,
                         raised=chain.is_raised, chain=list(chain.steps), excluded=_listed(checked, excluded),
                         n_excluded=len(excluded), payload_sha256=hashlib.sha256(data).hexdigest(), dp=dp,
                         zeroed=_listed(checked, zeroed) or None, n_zeroed=len(zeroed) or None,
                         raised_because=list(chain.raised_because[:MAX_CHAIN_STEPS]) or None)


def _check_layout(task: Task, raw_path: Path, reference_path: Path | None) -> None:
    """Refuse a train delta or local model with a tensor the received model lacks, or of another dtype or
    shape (the server folds nothing else). Counts only: the names are the job's to choose."""
    if reference_path is None or not reference_path.exists():
        raise UpdateRejected(f"{task}: this site holds no model received in this job to check what the job's "
                             "code wrote against; nothing was sent")
    known = {k: v for k, v in read_layout(reference_path).items() if not k.startswith(CONTROL_PREFIX)}
    written = read_layout(raw_path)
    unknown = sum(1 for k in written if k not in known)
    differ = sum(1 for k, v in written.items() if k in known and v != known[k])
    if unknown or differ:
        raise UpdateRejected(f"the job's code wrote {'a local model' if task == TaskKind.SUBMIT_MODEL else 'a delta'}"
                             f" that does not fit the model this site received ({unknown} tensor(s) not in it, "
                             f"{differ} of another dtype or shape); nothing was sent")


def _check_finite(weights: Weights) -> None:
    """Refuse non-finite floats before a chain runs on them: a NaN makes gaussian_dp's norm NaN (no clipping),
    and a later step (percentile, or the job's own exclusion) could remove it before the server's check."""
    from ..weights import all_finite, is_float_dtype

    bad = sum(1 for v in weights.values() if is_float_dtype(v.dtype) and not all_finite(v))
    if bad:
        raise UpdateRejected(f"the job's code wrote weights with NaN or Inf in {bad} tensor(s); nothing was sent")


def _listed(checked: bool, names: list[str]) -> list[str]:
    """The names a report may list: none unless they were `checked` against a model the server sent (an init
    model's names are the job's choice: one more channel out), else the first MAX_EXCLUDED_LISTED, each cut
    to the report's limit."""
    if not checked:
        return []
    return [n if len(n) <= MAX_NAME_CHARS else n[:MAX_NAME_CHARS - 3] + "..." for n in names[:MAX_EXCLUDED_LISTED]]


def _unfiltered(task: Task, raw_path: Path, out_path: Path, chain: EffectiveChain) -> PrivacyReport:
    digest = hashlib.sha256()
    with raw_path.open("rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    out_path.unlink(missing_ok=True)
    try:
        out_path.hardlink_to(raw_path)
    except OSError:
        shutil.copyfile(raw_path, out_path)
    return PrivacyReport(task=task, applied_to="delta" if RESULT_WEIGHTS[task] == "delta" else "whole_model",
                         on_weaker_job=chain.on_weaker_job, raised=False, payload_sha256=digest.hexdigest())


def _blank_unfilterable(model: Weights, reference: Weights | None) -> tuple[Weights, list[str]]:
    """`model` with every tensor the filters leave alone (not floating point) replaced by what the server
    already holds: the last global model's value when `reference` has it (same shape and dtype), else
    zeros. Returns the names replaced."""
    import numpy as np

    out: Weights = {}
    replaced: list[str] = []
    for name, value in model.items():
        if _is_float(value) or value.size == 0:
            out[name] = value
            continue
        known = reference.get(name) if reference is not None else None
        same = known is not None and known.shape == value.shape and known.dtype == value.dtype
        out[name] = known if same else np.zeros_like(value)
        replaced.append(name)
    return out, replaced


def _is_float(a: np.ndarray) -> bool:
    from ..weights import is_float_dtype

    return is_float_dtype(a.dtype)


def _minus(model: Weights, reference: Weights) -> Weights:
    """model - reference for float tensors the reference holds with the same shape; others as they are."""
    return {k: (v - reference[k]).astype(v.dtype, copy=False) if _is_float(v) and k in reference
            and reference[k].shape == v.shape else v for k, v in model.items()}


def _plus(delta: Weights, reference: Weights) -> Weights:
    return {k: (reference[k] + v).astype(v.dtype, copy=False) if _is_float(v) and k in reference
            and reference[k].shape == v.shape else v for k, v in delta.items()}
