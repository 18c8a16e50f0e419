"""How a job asks for its updates to be combined: `aggregator:` in config_fed_server.yml.

    aggregator: {name: fedavg}                                   # weighted by n_samples
    aggregator: {name: fedavg, server_lr: 1.0, server_momentum: 0.9}    # FedAvgM
    aggregator: {name: fedavg, weighting: uniform}               # every site counts the same
    aggregator: {name: fedavg, weighting: {site-1: 2.0, site-2: 1.0}}   # the job's own site weights
    aggregator: {name: fedopt, optimizer: adam, server_lr: 0.01, beta1: 0.9, beta2: 0.99, tau: 0.001}
    aggregator: {name: scaffold, server_lr: 1.0}                 # sites correct their drift (control variates)
    aggregator: {name: median}                                   # coordinate-wise median
    aggregator: {name: trimmed_mean, trim_fraction: 0.1}         # drop the top and bottom 10% per coordinate
    aggregator: {name: custom, path: "my_agg:MyAggregator", args: {...}}  # job code on the server: policy-gated
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Weighting = Literal["n_samples", "uniform"] | dict[str, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Weighted(_Strict):
    weighting: Weighting = Field("n_samples", description="n_samples, uniform, or {site: weight}")

    @field_validator("weighting")
    @classmethod
    def _positive(cls, v: Weighting) -> Weighting:
        if isinstance(v, dict):
            if not v:
                raise ValueError("site weights must name at least one site")
            if any(not 0 <= w < math.inf for w in v.values()):  # NaN fails too
                raise ValueError("site weights must be finite numbers >= 0")
            if not any(w > 0 for w in v.values()):  # the job would run every round and never move the model
                raise ValueError("site weights are all 0: at least one site needs a weight > 0")
        return v


class FedAvgConfig(_Weighted):
    name: Literal["fedavg"] = "fedavg"
    server_lr: float = Field(1.0, gt=0, description="step size of the server's update (1.0: plain FedAvg)")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="> 0: FedAvgM, momentum on the server's step")


class FedOptConfig(_Weighted):
    """FedOpt (Reddi et al. 2021): a server optimizer stepping on the pseudo-gradient, the mean delta."""

    name: Literal["fedopt"] = "fedopt"
    optimizer: Literal["sgdm", "adam", "adagrad", "yogi"] = Field(description="the server optimizer")
    server_lr: float = Field(gt=0, description="the server optimizer's learning rate")
    beta1: float = Field(0.9, ge=0, lt=1, description="momentum (sgdm, adam, yogi; adagrad too when > 0)")
    beta2: float = Field(0.99, ge=0, lt=1, description="second moment (adam, yogi)")
    tau: float = Field(1e-3, gt=0, description="adaptivity: added to sqrt(v)")


class ScaffoldConfig(_Weighted):
    name: Literal["scaffold"] = "scaffold"
    server_lr: float = Field(1.0, gt=0, description="step size of the server's update")


class MedianConfig(_Strict):
    name: Literal["median"] = "median"


class TrimmedMeanConfig(_Strict):
    name: Literal["trimmed_mean"] = "trimmed_mean"
    trim_fraction: float = Field(0.1, ge=0, lt=0.5, description="of the sites, cut from each end per coordinate")


class CustomAggregatorConfig(_Strict):
    name: Literal["custom"] = "custom"
    path: str = Field(description="'module:Class' inside the job's custom/ folder")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of its constructor")


AggregatorConfig = Annotated[FedAvgConfig | FedOptConfig | ScaffoldConfig | MedianConfig | TrimmedMeanConfig
                             | CustomAggregatorConfig, Field(discriminator="name")]
