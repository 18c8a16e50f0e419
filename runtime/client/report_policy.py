"""What a job's code may report beside its weights: `reports:` in the site's local/privacy.yml.

The privacy chain (runtime.client.outgoing) protects the weights. A result also carries what the job's
code chose: metric names and values (train, validation, the site-side algorithm's figures, a local
model's scores), the scalars it logged with their steps, its sample count, and, when it fails, an error
message (its exception, or the names inside weights it wrote). All of it leaves the site outside that
chain, so a hostile learner can put data in it. This policy, owned by site IT, decides what of it leaves:

- `metric_names`: regular expressions; only names matching one (whole name) leave, metrics and scalars
  alike; the rest are withheld, their names too (a name can carry data). null: any name.
- `max_metrics`: at most this many metrics per map leave (the first by name; `n_samples`, the weight of the
  others, when allowed, on top); the rest are withheld.
- `significant_digits`: metric and scalar values, scalar steps and the sample count are rounded to this
  many significant digits before they leave, which bounds what the low digits can carry. null: as
  computed. The exponent would still be free (616 decades, about 9 bits a value), so with rounding a
  value's magnitude is held to [`min_magnitude`, `max_magnitude`] (default 1e-4..1e6; smaller leaves as
  0, larger as the bound; sample counts and steps are rounded, not bounded): at d digits a value then
  takes at most about 2 * 9 * 10^(d-1) * 10 + 1 forms (d=1: 181, under 8 bits). The site-side
  algorithm's figures (`local`: FedProx's and SCAFFOLD's step count, SCAFFOLD's `lr_sum`) are rounded
  too, never bounded: the job's code shares the worker's process and can set them, and the server's
  SCAFFOLD computes with `lr_sum` (to d digits its control variates move by about 10^-d relatively),
  which must then be allowed by `metric_names`.
- `scalars`: false keeps the learner's logged curves on the site.
- `error_details`: false keeps every failure the job's code could have shaped (its worker's errors and
  exit, the weights it wrote) on the site: the server is told only that the job's code failed, and the
  message stays in the site's log and audit. The site's own reasons (a refusal, a budget, the disk) leave.

This bounds the channel; it does not close it. Whether something was withheld, the number of points, the
sample count, whether and when a task fails are still the job's to choose (a few bits a result). A result
whose reports this policy changed says so in a `site_reports` entry of its metrics (whether metrics and
scalars were withheld, and the rounding applied), never which names.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from ..kit_config import SettingsModel
from ..privacy_report import SiteReports
from ..server.metrics_check import CHECKED_MAPS as JOB_MAPS  # the metric maps the job's code fills
from ..server.metrics_check import MAX_METRICS_PER_MAP

REPORT_KEY = "site_reports"
WEIGHT = "n_samples"  # a validation's weight across sites (runtime.workflows.base.weighted_metrics)
GENERIC_ERROR = ("the job's code failed on this site; its message stays in the site's log "
                 "(local/privacy.yml reports.error_details: false)")


def checked_patterns(patterns: list[str]) -> list[str]:
    """`patterns` unchanged if each is a valid regular expression; else ValueError naming the first bad one
    (a field validator's error, which the settings loader puts on its one line)."""
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"'{p}' is not a valid regular expression ({e})") from None
    return patterns


class ReportPolicy(SettingsModel):
    metric_names: list[str] | None = Field(None, description="regular expressions of metric names that may "
                                                             "leave (whole name); null: any")
    max_metrics: int = Field(MAX_METRICS_PER_MAP, ge=0, le=MAX_METRICS_PER_MAP,
                             description="at most this many metrics per map leave")
    significant_digits: int | None = Field(None, ge=1, le=17, description="values rounded to this many "
                                                                          "significant digits; null: as computed")
    # with rounding, the exponent is the channel left: 1e-308..1e308 are 616 decades, about 9 more bits per
    # value; these bound it to the decades metrics live in (10 by default)
    min_magnitude: float = Field(1e-4, gt=0, allow_inf_nan=False,
                                 description="with significant_digits: a value smaller in magnitude leaves as 0")
    max_magnitude: float = Field(1e6, gt=0, allow_inf_nan=False,
                                 description="with significant_digits: a value larger in magnitude leaves as "
                                             "this, signed (not the sample count)")
    scalars: bool = Field(True, description="the learner's logged scalars may leave")
    error_details: bool = Field(True, description="a failed task's message may leave")

    @model_validator(mode="after")
    def _magnitudes_in_order(self) -> ReportPolicy:
        if self.min_magnitude >= self.max_magnitude:
            raise ValueError(f"min_magnitude ({self.min_magnitude:g}) must be below max_magnitude "
                             f"({self.max_magnitude:g})")
        return self

    @field_validator("metric_names")
    @classmethod
    def _patterns_compile(cls, patterns: list[str] | None) -> list[str] | None:
        return patterns if patterns is None else checked_patterns(patterns)

    @property
    def is_open(self) -> bool:
        """Everything the job reports leaves (the default)."""
        return self == ReportPolicy()

    def allows(self, name: str) -> bool:
        return self.metric_names is None or any(re.fullmatch(p, name) for p in self.metric_names)

    def apply(self, metrics: dict[str, Any], key_metric: str | None = None) -> dict[str, Any]:
        """`metrics` as they may leave: the job's maps and scalars filtered and rounded, the site's own
        entries (privacy, wire) untouched, and `site_reports` saying what was changed (absent when nothing),
        including whether the job's `key_metric` was withheld from a validation."""
        if self.is_open:
            return metrics
        out = dict(metrics)
        withheld = False
        for key in JOB_MAPS:
            values = metrics.get(key)
            if not isinstance(values, dict):
                continue
            kept = sorted(name for name in values if self.allows(name) and name != WEIGHT)[:self.max_metrics]
            if WEIGHT in values and self.allows(WEIGHT):  # what weighs the others across sites: never cut
                kept.append(WEIGHT)
            withheld |= len(kept) < len(values)
            # the site-side algorithm's figures are inputs to the server's (SCAFFOLD's lr_sum): rounded, never
            # bounded; the weight across sites likewise
            out[key] = {name: self._rounded(values[name], bounded=key != "local" and name != WEIGHT)
                        for name in kept}
        points = metrics.get("scalars") or []
        kept_points = [[name, int(self._rounded(step, bounded=False)), self._rounded(value)]
                       for name, step, value in points if self.scalars and self.allows(name)]
        out.pop("scalars", None)
        if kept_points:
            out["scalars"] = kept_points
        key_withheld = key_metric is not None and any(
            isinstance(metrics.get(m), dict) and key_metric in metrics[m] and key_metric not in out[m]
            for m in ("validation", "local_validation"))
        summary = SiteReports(metrics_withheld=withheld, scalars_withheld=len(kept_points) < len(points),
                              key_metric_withheld=key_withheld, significant_digits=self.significant_digits)
        if summary != SiteReports():
            out[REPORT_KEY] = summary.model_dump(mode="json", exclude_defaults=True)  # absent: false, none
        return out

    def sample_count(self, n_samples: int) -> int:
        """The sample count as it may leave: rounded like the values (at least 1 when it was), never capped."""
        return max(int(self._rounded(n_samples, bounded=False)), min(n_samples, 1))

    def error_text(self, message: str, shaped_by_job: bool) -> str:
        """What a failure report says: the message, or, for a failure the job's code could shape, a generic
        line (under `error_details: false`)."""
        return GENERIC_ERROR if shaped_by_job and not self.error_details else message

    def _rounded(self, value: Any, bounded: bool = True) -> Any:
        """`value` to significant_digits, its magnitude held to [min_magnitude, max_magnitude] (below: 0)."""
        if self.significant_digits is None or isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            return value
        if bounded and abs(value) < self.min_magnitude:
            return type(value)(0)
        if bounded and abs(value) > self.max_magnitude:
            value = math.copysign(self.max_magnitude, value) if isinstance(value, float) \
                else int(math.copysign(int(self.max_magnitude), value))
        rounded = float(f"{value:.{self.significant_digits}g}")
        if not math.isfinite(rounded):  # 1.8e308 to one digit overflows; the server would refuse the result
            return value
        return int(rounded) if isinstance(value, int) else rounded
