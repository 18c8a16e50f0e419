"""How much one site's update counts in a weighted mean: the job's `aggregator.weighting`."""

from __future__ import annotations

from ..errors import UpdateRejected
from .config import Weighting


def update_weight(weighting: Weighting, site: str, n_samples: int) -> float:
    """n_samples: the site's sample count; uniform: 1; {site: weight}: the job's weight for the site.
    The workflow fills Update.weight with it. A site the map leaves out is refused, not given a default:
    the job's author decided each site's share."""
    if weighting == "n_samples":
        return float(n_samples)
    if weighting == "uniform":
        return 1.0
    if site not in weighting:
        raise UpdateRejected(f"no weight for site {site} in aggregator.weighting")
    return float(weighting[site])
