"""Per-site data for the demo study, from scikit-learn's bundled breast-cancer data set (no download).

The data is split into a held-out test set (kept by the lead, never given to a site) and one folder per
site with `train.csv` and `val.csv`. Sites differ in size and label mix, as real hospitals do: that is
what makes federation worth it and FedAvg's sample weighting matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

# (share of the pool, share of malignant cases) per site: a large benign-heavy site, a smaller
# malignant-heavy one, and a small balanced one.
SITE_MIXES = [(0.5, 0.2), (0.3, 0.75), (0.2, 0.5)]


@dataclass(frozen=True)
class DemoData:
    site_dirs: dict[str, Path]
    heldout_csv: Path


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray, names: list[str]) -> None:
    header = ",".join([*names, "label"])
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=header, comments="", fmt="%.6g")


def write_demo_data(dest: Path, sites: list[str], seed: int = 0, heldout_fraction: float = 0.2) -> DemoData:
    """Write `dest/<site>/{train,val}.csv` for each site and `dest/heldout.csv`."""
    data = load_breast_cancer()
    names = [n.replace(" ", "_") for n in data.feature_names]
    rng = np.random.default_rng(seed)
    # sklearn labels 0 = malignant, 1 = benign; use 1 = malignant, the class a screening model flags
    x, y = data.data.astype(np.float32), (data.target == 0).astype(np.float32)
    order = rng.permutation(len(y))
    n_heldout = int(len(y) * heldout_fraction)
    heldout, pool = order[:n_heldout], order[n_heldout:]
    dest.mkdir(parents=True, exist_ok=True)
    heldout_csv = dest / "heldout.csv"
    _write_csv(heldout_csv, x[heldout], y[heldout], names)

    positives = [i for i in pool if y[i] == 1]
    negatives = [i for i in pool if y[i] == 0]
    mixes = [SITE_MIXES[i % len(SITE_MIXES)] for i in range(len(sites))]
    total_share = sum(share for share, _ in mixes)
    site_dirs = {}
    for site, (share, malignant) in zip(sites, mixes, strict=True):
        n = int(len(pool) * share / total_share)
        n_pos = min(int(n * malignant), len(positives))
        n_neg = min(n - n_pos, len(negatives))
        idx = np.array(positives[:n_pos] + negatives[:n_neg])
        positives, negatives = positives[n_pos:], negatives[n_neg:]
        idx = idx[rng.permutation(len(idx))]
        n_val = max(2, len(idx) // 5)
        site_dir = dest / site
        site_dir.mkdir(parents=True, exist_ok=True)
        _write_csv(site_dir / "val.csv", x[idx[:n_val]], y[idx[:n_val]], names)
        _write_csv(site_dir / "train.csv", x[idx[n_val:]], y[idx[n_val:]], names)
        site_dirs[site] = site_dir
    return DemoData(site_dirs=site_dirs, heldout_csv=heldout_csv)
