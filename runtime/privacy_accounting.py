"""Epsilon for the Gaussian DP releases of a job, from Google's `dp-accounting` (its RDP accountant).

A release is one upload that went through the `gaussian_dp` filter (runtime.filters): the whole update
clipped to L2 norm `clip_norm`, then N(0, (noise_multiplier * clip_norm)^2) added to every entry. For the
accountant that is a Gaussian mechanism with noise multiplier z = noise_multiplier; with a sampling rate
q < 1 it is the Poisson-subsampled Gaussian (amplification by subsampling), with q = 1 the plain one.
A job's releases on a site compose: the total is the accountant's epsilon, at a given delta, of all of
them, each with the parameters it actually used.

The convention is the one of TF-Privacy, Opacus and DP-FedAvg: add/remove adjacency with sensitivity
`clip_norm` (what one release reveals about anything whose presence moves the clipped update by at most
clip_norm). RDP is an upper bound: the true epsilon is never larger than what this module reports.

A release with noise_multiplier 0 is not differentially private: its epsilon, and every total it is part
of, is infinite (math.inf here, "inf" in a PrivacyReport), never a number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import dp_accounting

# dp_accounting (with scipy) is imported where epsilon is computed, not here: the policy and ledger types
# that name a mechanism are also read by provisioning and the fedkit CLI, which must start fast.


@dataclass(frozen=True, order=True)
class GaussianMechanism:
    """The accounting parameters of one gaussian_dp step (clip_norm does not enter: z is relative to it)."""

    noise_multiplier: float
    sampling_rate: float = 1.0

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")

    def event(self) -> dp_accounting.DpEvent:
        dp_accounting = _dp_accounting()
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        return gaussian if self.sampling_rate == 1.0 else dp_accounting.PoissonSampledDpEvent(self.sampling_rate,
                                                                                            gaussian)


def epsilon(counts: Mapping[GaussianMechanism, int], delta: float) -> float:
    """The RDP accountant's epsilon at `delta` for `counts[m]` releases of each mechanism m, composed.
    math.inf when any release with a count > 0 has no noise; 0.0 for no releases."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    used = {m: n for m, n in counts.items() if n > 0}
    if any(m.noise_multiplier == 0 for m in used):
        return math.inf
    if not used:
        return 0.0
    return _epsilon(tuple(sorted(used.items())), delta)


def _dp_accounting() -> ModuleType:
    """The dp_accounting package, or a one-line ConfigError where a site lacks it."""
    try:
        import dp_accounting
        import dp_accounting.rdp  # noqa: F401 (makes dp_accounting.rdp an attribute)
    except ImportError:
        raise ConfigError("gaussian_dp: the dp-accounting package is not installed here, so no epsilon can be "
                          "accounted; install the kit's requirements.txt (pip install -r requirements.txt)") from None
    return dp_accounting


@lru_cache(maxsize=256)
def _epsilon(counts: tuple[tuple[GaussianMechanism, int], ...], delta: float) -> float:
    """Cached: a subsampled Gaussian costs the accountant up to a second, and a site asks for the same
    values again (a release's own epsilon every round, the total for the report and for the budget)."""
    dp_accounting = _dp_accounting()
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(m.event(), n)
                                                      for m, n in counts]))
    return float(accountant.get_epsilon(delta))
