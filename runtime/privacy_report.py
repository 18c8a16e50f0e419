"""What a site says it did to the weights it sent: the top-level "privacy" object of a result's metrics.

Written by the site (runtime.client.outgoing) for every result that carries weights (train deltas, the
round-0 model, a local model for cross-site validation), written into the site's audit with the same
content, and stored by the server per site per round so `show_job` can show it. The schema is fixed and
bounded (entries, string lengths, total size): a site cannot park arbitrary data in the job's record.

    {"task": "train", "applied_to": "delta", "on_weaker_job": "raise", "raised": true,
     "chain": [{"name": "exclude_vars", "args": {"pattern": "^2\\\\.bias$"}, "source": "site"},
               {"name": "gaussian_dp", "args": {"clip_norm": 1.0, "noise_multiplier": 1.0}, "source": "site"}],
     "excluded": ["2.bias"], "n_excluded": 1, "payload_sha256": "<sha256 of exactly the bytes sent>",
     "zeroed": ["1.num_batches_tracked"], "n_zeroed": 1,
     "dp": {"epsilon_round": 4.73, "epsilon_total": 10.2, "delta": 1e-05, "noise_multiplier": 1.0,
            "sampling_rate": 1.0, "releases": 3}}

`zeroed` lists the tensors a chain that changes values (anything beyond exclude_vars) could not filter,
because they are not floating point (integer or bool buffers, such as BatchNorm's num_batches_tracked):
they leave blank, as the last global model's value for submit_model and as zeros otherwise, so no data a
job parks in them leaves the site. Absent when there were none.

`dp` is present when the upload went through gaussian_dp: the epsilon of this release alone and of all
this job's releases from this site so far (runtime.client.dp_ledger), at `delta`, from the RDP accountant
(runtime.privacy_accounting). An epsilon that is infinite (noise_multiplier 0) is the string "inf".
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from .errors import UpdateRejected
from .tasks import TaskKind

MAX_REPORT_BYTES = 16 << 10
MAX_CHAIN_STEPS = 32
MAX_EXCLUDED_LISTED = 64
MAX_NAME_CHARS = 128  # a listed tensor name, cut: 64 of them stay well inside MAX_REPORT_BYTES

FilterName = Literal["exclude_vars", "percentile", "gaussian_dp", "svt"]
Source = Literal["job", "site", "raised"]  # as the job asked; added by the site; the job's, made stronger
AppliedTo = Literal["delta", "model_minus_last_global", "whole_model"]
ShortText = Annotated[str, StringConstraints(max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FilterStep(_Strict):
    name: FilterName
    args: dict[Annotated[str, StringConstraints(max_length=32)], float | str] = Field(default_factory=dict,
                                                                                       max_length=8)
    source: Source = "job"

    @field_validator("args")
    @classmethod
    def _short_texts(cls, args: dict[str, float | str]) -> dict[str, float | str]:
        for key, value in args.items():
            if isinstance(value, str) and len(value) > 256:
                raise ValueError(f"argument '{key}' is longer than 256 characters")
        return args


# an epsilon is a finite number >= 0, or "inf" for a release without noise: never a huge stand-in number
Epsilon = Annotated[float, Field(ge=0, allow_inf_nan=False)] | Literal["inf"]
MAX_RELEASES = 10**9


class DpSpend(_Strict):
    """What a gaussian_dp release cost, per the site's accountant."""

    epsilon_round: Epsilon = Field(description="this release alone")
    epsilon_total: Epsilon = Field(description="every DP release of this job from this site so far, this one "
                                               "included")
    delta: float = Field(gt=0, lt=1)
    noise_multiplier: float = Field(ge=0, allow_inf_nan=False, description="the weakest of the release's steps")
    sampling_rate: float = Field(gt=0, le=1)
    releases: int = Field(ge=1, le=MAX_RELEASES, description="DP releases of this job from this site so far")
    # every job's releases on this site together, at the site budget's delta; only from a site with a
    # dp_site_budget (a server older than these fields refuses reports that carry them)
    epsilon_site_total: Epsilon | None = Field(None, description="every DP release of every job from this "
                                                                 "site so far, this one included")
    site_releases: int | None = Field(None, ge=1, le=MAX_RELEASES, description="DP releases of every job from "
                                                                               "this site so far")
    site_delta: float | None = Field(None, gt=0, lt=1, description="the delta of epsilon_site_total: the site "
                                                                   "budget's")


class PrivacyReport(_Strict):
    task: Literal[TaskKind.TRAIN, TaskKind.INIT, TaskKind.SUBMIT_MODEL]  # the kinds that send weights
    applied_to: AppliedTo
    on_weaker_job: Literal["raise", "refuse"]
    raised: bool = Field(description="the site made the job's filters stronger or added some")
    chain: list[FilterStep] = Field(default_factory=list, max_length=MAX_CHAIN_STEPS)
    excluded: list[ShortText] = Field(default_factory=list, max_length=MAX_EXCLUDED_LISTED,
                                      description="names of tensors that did not leave (the first 64)")
    n_excluded: int = Field(0, ge=0)
    # tensors the chain cannot filter (not floating point) that left as zeros or the last global's value;
    # absent when none did, so a report without any stays readable by servers that predate these fields
    zeroed: list[ShortText] | None = Field(None, max_length=MAX_EXCLUDED_LISTED,
                                           description="names of tensors sent blank (the first 64)")
    n_zeroed: int | None = Field(None, ge=1)
    # why the site raised the chain, one line per change (absent when it raised nothing, as for zeroed)
    raised_because: list[ShortText] | None = Field(None, max_length=MAX_CHAIN_STEPS)
    payload_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    dp: DpSpend | None = None


class SiteReports(_Strict):
    """What a site's `reports:` policy (local/privacy.yml) kept of what the job's code reported with one
    result: whether it withheld metrics or logged scalars, and the rounding it applied. Never which names,
    nor how many: a count would be the job's to choose, one more channel out."""

    metrics_withheld: bool = False
    scalars_withheld: bool = False
    key_metric_withheld: bool = Field(False, description="the job's key metric left out of a validation: this "
                                                         "site's scores do not count toward the best model")
    significant_digits: int | None = Field(None, ge=1, le=17)


def decode_site_reports(value: Any) -> dict[str, Any] | None:
    """The server's check of a result's "site_reports" object: None when absent. Raises UpdateRejected."""
    if value is None:
        return None
    return _validated(SiteReports, value, "site_reports").model_dump(mode="json", exclude_defaults=True)


M = TypeVar("M", bound=BaseModel)


def _validated(model: type[M], value: Any, key: str) -> M:
    """`value` as `model`; UpdateRejected naming the first bad field of metrics `key` otherwise."""
    try:
        return model.model_validate(value)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise UpdateRejected(f"metrics '{key}': field '{where}': {first['msg']}") from None


def decode_report(value: Any) -> dict[str, Any] | None:
    """The server's check of a result's "privacy" object: None when absent; else the validated object as
    plain JSON data. Raises UpdateRejected naming the first bad field."""
    if value is None:
        return None
    if len(json.dumps(value, default=str)) > MAX_REPORT_BYTES:
        raise UpdateRejected(f"metrics 'privacy' exceeds {MAX_REPORT_BYTES} bytes")
    return _validated(PrivacyReport, value, "privacy").model_dump(mode="json", exclude_none=True)  # no "dp": null


def describe_chain(report: dict[str, Any], with_target: bool = True) -> str:
    """One line for a table cell: `exclude_vars(pattern=^2\\.bias$)[site] -> gaussian_dp(...)[raised]`."""
    steps = []
    for step in report.get("chain", []):
        args = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in step["args"].items())
        mark = "" if step["source"] == "job" else f"[{step['source']}]"
        steps.append(f"{step['name']}({args}){mark}")
    text = " -> ".join(steps) or "no filters"
    target = f"; on {report.get('applied_to', '?')}" if with_target else ""
    blank = f"; {report['n_zeroed']} non-float tensor(s) sent blank" if report.get("n_zeroed") else ""
    why = f" ({'; '.join(report['raised_because'])})" if report.get("raised_because") else ""
    return text + target + blank + (f"; raised by site{why}" if report.get("raised") else "")
