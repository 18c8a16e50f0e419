"""The site's own privacy floor: `local/privacy.yml` on a client kit, owned by site IT.

A job's config_fed_client.yml asks for filters, and a lead can drop them (`--set client.filters=[]`).
This file says what this site applies whatever the job asks: tensors that never leave (exclude_vars
patterns, always applied) and minimum strengths of the noise and sparsity filters. A job asking for less
is raised to the site's minimum (`on_weaker_job: raise`, the default) or refused before any of its code
runs here (`on_weaker_job: refuse`), with a line saying why. The effective chain this module returns is
what runtime.client.outgoing applies to everything that leaves the site.

It may also set differential-privacy budgets: `dp_budget: {epsilon: 8.0, delta: 1e-5}` for each job, and
`dp_site_budget` for all jobs together (what the study may ever take from this site's data, so that a
clone or a resubmission does not start from 0). A gaussian_dp release that would take a total past its
budget is not sent (runtime.client.dp_ledger), and under either budget a job whose uploads would not be
differentially private at all (no gaussian_dp, or one without noise) is refused before any of its code runs.

A gaussian_dp `sampling_rate` is the job's claim, which this site cannot check, and a smaller one makes
every release look cheaper. So a site with a DP budget or a gaussian_dp floor never accounts a sampling rate
below its own floor's `sampling_rate`, or 1.0 (no amplification credited) where the floor sets none: a
job claiming less is raised to it (or refused under `on_weaker_job: refuse`), a job claiming more keeps
its claim. The rate changes nothing in what is sent, only the epsilon accounted. A site with neither
leaves the job's claim as the job's own.

Never imports torch; never reads the job's code. runtime.filters (NumPy) is imported when a job's chain is
built, not when the daemon starts: an idle site does not hold NumPy.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from ..errors import ConfigError, JobRejected
from ..job_spec import FilterConfig
from ..kit_config import SettingsModel, load_optional
from ..privacy_accounting import GaussianMechanism
from ..privacy_report import FilterStep
from .report_policy import ReportPolicy
from .score_count import ScoreCaps

if TYPE_CHECKING:
    from ..filters import Filter

PRIVACY_FILE = "privacy.yml"



class GaussianDpFloor(SettingsModel):
    noise_multiplier: float = Field(ge=0, description="at least this much noise (sigma = noise_multiplier * clip)")
    clip_norm: float = Field(gt=0, description="at most this L2 norm of what is sent, before the noise")
    delta: float | None = Field(None, gt=0, lt=1, description="epsilon is reported at this delta or a smaller one")
    sampling_rate: float | None = Field(None, gt=0, le=1, description="the accounting assumes at least this "
                                        "sampling rate; unset: 1.0, crediting no amplification by the job's "
                                        "sampling, which this site cannot check")


class DpBudget(SettingsModel):
    """The most epsilon (at `delta`) the gaussian_dp releases it covers may add up to: one job's
    (`dp_budget`), or every job's together (`dp_site_budget`)."""

    epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)


class PercentileFloor(SettingsModel):
    fraction: float = Field(gt=0, le=1, description="at most this fraction of each tensor's entries is sent")


class SvtFloor(SettingsModel):
    epsilon: float = Field(gt=0, description="at most this epsilon")
    fraction: float = Field(1.0, gt=0, le=1, description="at most this fraction of entries is released")
    clip: float = Field(0.01, gt=0, description="the clip used when this site adds svt to a job without it")


class PrivacyPolicy(SettingsModel):
    """local/privacy.yml. Without the file: no floor, the job's own filters run as asked."""

    on_weaker_job: Literal["raise", "refuse"] = "raise"
    exclude_vars: list[str] = Field(default_factory=list, description="regex patterns of tensor names that "
                                                                      "never leave this site")
    gaussian_dp: GaussianDpFloor | None = None
    percentile: PercentileFloor | None = None
    svt: SvtFloor | None = None
    dp_budget: DpBudget | None = None
    dp_site_budget: DpBudget | None = None
    # what the job's own reports may carry out; `reports: null` is the default (SettingsModel), as the
    # other sections' null says "none"
    reports: ReportPolicy = Field(default_factory=ReportPolicy)
    scores: ScoreCaps = Field(default_factory=ScoreCaps)  # how many models jobs may have scored on the data
    build_initial_model: bool | None = Field(None, description=(
        "whether this site's worker may build a job's round-0 model when the job ships none; its tensor names "
        "and shapes are the job's code's choice and leave past every filter. null: not under a gaussian_dp, "
        "percentile or svt floor, yes otherwise"))

    @property
    def builds_initial_model(self) -> bool:
        if self.build_initial_model is not None:
            return self.build_initial_model
        return self.gaussian_dp is None and self.percentile is None and self.svt is None

    def check_builds_initial_model(self) -> None:
        """Raise JobRejected, in the site's words, when this site builds no round-0 model from job code."""
        if not self.builds_initial_model:
            why = ("build_initial_model: false" if self.build_initial_model is False else
                   "a filter floor, under which build_initial_model defaults to false")
            raise JobRejected(f"this site builds no round-0 model from job code (local/privacy.yml: {why}; the "
                              "model's tensor names and shapes would leave unfiltered): ship initial_model with "
                              "the job")

    @field_validator("exclude_vars")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        if patterns:  # the same engine as the filter they become; RE2 loads only for a site that has some
            from ..name_patterns import tensor_name_pattern

            for p in patterns:
                tensor_name_pattern(p)
        return patterns

    @classmethod
    def load(cls, path: Path) -> PrivacyPolicy:
        """Raises ConfigError naming the file and the field."""
        return load_optional(path, cls)

    def chain_for(self, job_id: str, job_filters: list[FilterConfig]) -> EffectiveChain:
        """The filters this site applies for a job that asks for `job_filters`. Raises JobRejected under
        `on_weaker_job: refuse` when the job asks for less than this site's floor, and ConfigError for a
        filter the job names wrongly."""
        if job_filters:  # a job without filters needs none of their code (NumPy) here
            from ..filters import build_filters

            build_filters(job_filters)  # unknown names and bad arguments fail here, with their own line
        steps = [FilterStep(name="exclude_vars", args={"pattern": p}, source="site") for p in self.exclude_vars]
        present: set[str] = set()
        why: list[str] = []  # what the site raised, and why: it travels with every report of this job
        for entry in job_filters:
            args = {**_defaults(entry.name), **entry.args}
            if entry.name == "gaussian_dp":  # all numbers (checked above), though YAML may have read 1e-5 as text
                args = {k: float(v) for k, v in args.items()}
            stronger, reasons = self._raise(entry.name, args)
            present.add(entry.name)
            if reasons and self.on_weaker_job == "refuse":
                raise JobRejected(f"site privacy policy refuses job {job_id}: {'; '.join(reasons)} "
                                  "(local/privacy.yml on_weaker_job: refuse)")
            why += reasons
            try:
                steps.append(FilterStep(name=entry.name, args=stronger, source="raised" if reasons else "job"))
            except ValidationError:
                raise ConfigError(f"config_fed_client.yml: filter '{entry.name}': arguments must be numbers "
                                  "or short strings") from None
        for name, floor in (("percentile", self.percentile), ("svt", self.svt), ("gaussian_dp", self.gaussian_dp)):
            if floor is None or name in present:
                continue
            if self.on_weaker_job == "refuse":
                raise JobRejected(f"site privacy policy refuses job {job_id}: it asks for no {name}; this site "
                                  f"requires {_floor_text(name, floor)} (local/privacy.yml on_weaker_job: refuse)")
            added, _ = self._raise(name, {**_defaults(name), **floor.model_dump(exclude_none=True)})  # the floor
            steps.append(FilterStep(name=name, args=added, source="site"))  # and the accounted sampling rate
            why.append(f"the job asks for no {name}; this site requires {_floor_text(name, floor)}")
        chain = EffectiveChain(tuple(steps), self.on_weaker_job, self.dp_budget, tuple(why), self.dp_site_budget)
        for setting, budget in (("dp_budget", self.dp_budget), ("dp_site_budget", self.dp_site_budget)):
            if budget is not None and not chain.is_differentially_private:
                raise JobRejected(f"site privacy policy refuses job {job_id}: this site has a DP budget ({setting}: "
                                  f"epsilon {budget.epsilon:g} at delta {budget.delta:g}) and the job's uploads "
                                  "would have no gaussian_dp noise; give the job a gaussian_dp filter with "
                                  "noise_multiplier > 0 (or site IT a gaussian_dp floor in local/privacy.yml)")
        return chain

    @property
    def accounted_sampling_rate(self) -> float:
        """The smallest gaussian_dp sampling rate this site accounts when it has a DP budget or a gaussian_dp
        floor: the floor's own, else 1.0. The job's rate is its claim, which this site cannot check; a smaller
        one would make each release look cheaper against this site's budget and in its report."""
        if self.gaussian_dp is not None and self.gaussian_dp.sampling_rate is not None:
            return self.gaussian_dp.sampling_rate
        return 1.0

    def _raise(self, name: str, args: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """`args` lifted to this site's floor for filter `name`, and what was weaker (empty: nothing)."""
        out, reasons = dict(args), []

        def at_least(key: str, floor: float, why: str = "") -> None:
            if float(out[key]) < floor:
                reasons.append(f"{name} {key}={out[key]:g} is below this site's minimum {floor:g}{why}")
                out[key] = floor

        def at_most(key: str, ceiling: float) -> None:
            if float(out[key]) > ceiling:
                reasons.append(f"{name} {key}={out[key]:g} is above this site's maximum {ceiling:g}")
                out[key] = ceiling

        if name == "gaussian_dp" and (self.gaussian_dp is not None or self.dp_budget is not None
                                      or self.dp_site_budget is not None):
            if self.gaussian_dp is not None:
                at_least("noise_multiplier", self.gaussian_dp.noise_multiplier)
                at_most("clip_norm", self.gaussian_dp.clip_norm)
                if self.gaussian_dp.delta is not None:
                    at_most("delta", self.gaussian_dp.delta)
            implicit = self.gaussian_dp is None or self.gaussian_dp.sampling_rate is None
            at_least("sampling_rate", self.accounted_sampling_rate,
                     " (this site credits no amplification by a job's sampling, which it cannot check; site IT "
                     "may allow some with gaussian_dp.sampling_rate in local/privacy.yml)" if implicit else "")
        elif name == "percentile" and self.percentile is not None:
            at_most("fraction", self.percentile.fraction)
        elif name == "svt" and self.svt is not None:
            at_most("epsilon", self.svt.epsilon)
            at_most("fraction", self.svt.fraction)
        return out, reasons


@dataclass(frozen=True)
class EffectiveChain:
    """The filters that run, in order, each marked job / site / raised."""

    steps: tuple[FilterStep, ...]
    on_weaker_job: Literal["raise", "refuse"]
    dp_budget: DpBudget | None = None
    raised_because: tuple[str, ...] = ()  # one line per thing the site made stronger or added, saying why
    dp_site_budget: DpBudget | None = None  # every job's releases from this site together

    @property
    def is_raised(self) -> bool:
        return any(s.source != "job" for s in self.steps)

    def dp_release(self) -> tuple[list[GaussianMechanism], float] | None:
        """The accounting of one upload through this chain: a mechanism per gaussian_dp step (several are
        accounted as composed, an upper bound), and the delta to report epsilon at (the smallest any step
        asks for); None without gaussian_dp."""
        dp_steps = [s for s in self.steps if s.name == "gaussian_dp"]
        if not dp_steps:
            return None
        defaults = _defaults("gaussian_dp")
        args = [{**defaults, **s.args} for s in dp_steps]
        return ([GaussianMechanism(float(a["noise_multiplier"]), float(a["sampling_rate"])) for a in args],
                min(float(a["delta"]) for a in args))

    @property
    def is_differentially_private(self) -> bool:
        release = self.dp_release()
        return release is not None and all(m.noise_multiplier > 0 for m in release[0])

    def build(self) -> list[Filter]:
        from ..filters import build_filters

        return build_filters([FilterConfig(name=s.name, args=dict(s.args)) for s in self.steps])


def _defaults(name: str) -> dict[str, Any]:
    """A filter's default arguments, read from its factory, so a job that leaves one out is compared with
    the value that would actually run."""
    from ..filters import FILTERS

    factory = FILTERS.get(name)
    if factory is None:
        raise ConfigError(f"config_fed_client.yml: unknown filter '{name}' (known: {', '.join(FILTERS)})")
    return {p.name: p.default for p in inspect.signature(factory).parameters.values()
            if p.default is not inspect.Parameter.empty}


def _floor_text(name: str, floor: BaseModel) -> str:
    limits = {"noise_multiplier": ">=", "clip_norm": "<=", "fraction": "<=", "epsilon": "<=", "delta": "<=",
              "sampling_rate": ">="}
    return f"{name} with " + ", ".join(f"{k} {limits[k]} {v:g}" for k, v in floor.model_dump(exclude_none=True).items()
                                   if k in limits)
