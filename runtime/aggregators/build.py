"""One aggregator object per job, from the job's validated `aggregator:` config."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import JobRejected
from .base import Aggregator
from .config import (
    AggregatorConfig,
    CustomAggregatorConfig,
    FedAvgConfig,
    FedOptConfig,
    MedianConfig,
    ScaffoldConfig,
    TrimmedMeanConfig,
)
from .fedavg import FedAvgAggregator
from .fedopt import FedOptAggregator
from .robust import MedianAggregator, TrimmedMeanAggregator
from .scaffold import ScaffoldAggregator

CustomLoader = Callable[[CustomAggregatorConfig], Aggregator]


def build_aggregator(config: AggregatorConfig, custom_loader: CustomLoader | None = None) -> Aggregator:
    """The aggregator `config` names. A custom one is job code running on the server: it is built only
    through `custom_loader`, which the server passes when its policy allows job aggregators."""
    if isinstance(config, FedAvgConfig):
        return FedAvgAggregator(config)
    if isinstance(config, FedOptConfig):
        return FedOptAggregator(config)
    if isinstance(config, ScaffoldConfig):
        return ScaffoldAggregator(config)
    if isinstance(config, MedianConfig):
        return MedianAggregator()
    if isinstance(config, TrimmedMeanConfig):
        return TrimmedMeanAggregator(config)
    if isinstance(config, CustomAggregatorConfig):
        if custom_loader is None:
            raise JobRejected(f"aggregator 'custom' ({config.path}) runs job code on the server, and this "
                              "server's policy does not allow it: use a built-in aggregator, or ask the "
                              "server's operator to allow job aggregators")
        return custom_loader(config)
    raise JobRejected(f"unknown aggregator config {type(config).__name__}")
