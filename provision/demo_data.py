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
# write_label_skewed_data: the share of malignant cases per site, cycled
SKEWED_MALIGNANT_SHARES = (0.9, 0.1, 0.5)


@dataclass(frozen=True)
class DemoData:
    site_dirs: dict[str, Path]
    heldout_csv: Path


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray, names: list[str]) -> None:
    header = ",".join([*names, "label"])
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=header, comments="", fmt="%.6g")


def _pool_and_heldout(dest: Path, rng: np.random.Generator, heldout_fraction: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], Path]:
    """(x, y, pool indices, feature names, heldout.csv): the held-out set written, the rest left to split."""
    data = load_breast_cancer()
    names = [n.replace(" ", "_") for n in data.feature_names]
    # sklearn labels 0 = malignant, 1 = benign; use 1 = malignant, the class a screening model flags
    x, y = data.data.astype(np.float32), (data.target == 0).astype(np.float32)
    order = rng.permutation(len(y))
    n_heldout = int(len(y) * heldout_fraction)
    heldout, pool = order[:n_heldout], order[n_heldout:]
    dest.mkdir(parents=True, exist_ok=True)
    heldout_csv = dest / "heldout.csv"
    _write_csv(heldout_csv, x[heldout], y[heldout], names)
    return x, y, pool, names, heldout_csv


def _write_site(site_dir: Path, x: np.ndarray, y: np.ndarray, idx: np.ndarray, names: list[str],
                rng: np.random.Generator) -> None:
    idx = idx[rng.permutation(len(idx))]
    n_val = max(2, len(idx) // 5)
    site_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(site_dir / "val.csv", x[idx[:n_val]], y[idx[:n_val]], names)
    _write_csv(site_dir / "train.csv", x[idx[n_val:]], y[idx[n_val:]], names)


def write_demo_data(dest: Path, sites: list[str], seed: int = 0, heldout_fraction: float = 0.2) -> DemoData:
    """Write `dest/<site>/{train,val}.csv` for each site and `dest/heldout.csv`."""
    rng = np.random.default_rng(seed)
    x, y, pool, names, heldout_csv = _pool_and_heldout(dest, rng, heldout_fraction)

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
        _write_site(dest / site, x, y, idx, names, rng)
        site_dirs[site] = dest / site
    return DemoData(site_dirs=site_dirs, heldout_csv=heldout_csv)


def write_label_skewed_data(dest: Path, sites: list[str], seed: int = 0, heldout_fraction: float = 0.2,
                            malignant_shares: tuple[float, ...] = SKEWED_MALIGNANT_SHARES) -> DemoData:
    """The demo data split harder: sites of equal size, each mostly one class (malignant shares cycle
    through `malignant_shares`, 90% / 10% / 50% by default), as a cancer centre and a screening clinic
    differ. The held-out set is the same as write_demo_data's for the same seed (drawn first, the same
    way), so scores on both splits compare. Each site gets as many cases as the scarcer class allows."""
    if not sites:
        raise ValueError("write_label_skewed_data: give at least one site")
    if any(not 0 <= s <= 1 for s in malignant_shares) or not malignant_shares:
        raise ValueError(f"write_label_skewed_data: malignant_shares must be one or more numbers in [0, 1], "
                         f"got {malignant_shares}")
    rng = np.random.default_rng(seed)
    x, y, pool, names, heldout_csv = _pool_and_heldout(dest, rng, heldout_fraction)
    positives = [i for i in pool if y[i] == 1]
    negatives = [i for i in pool if y[i] == 0]
    shares = [malignant_shares[i % len(malignant_shares)] for i in range(len(sites))]
    # the largest equal site size n with sum(share * n) <= positives and sum((1 - share) * n) <= negatives
    need_pos, need_neg = sum(shares), sum(1 - s for s in shares)
    n = int(min(len(positives) / need_pos if need_pos else np.inf, len(negatives) / need_neg if need_neg else np.inf,
                len(pool) / len(sites)))
    site_dirs = {}
    for site, share in zip(sites, shares, strict=True):
        n_pos = min(round(n * share), len(positives))
        n_neg = min(n - n_pos, len(negatives))
        idx = np.array(positives[:n_pos] + negatives[:n_neg])
        positives, negatives = positives[n_pos:], negatives[n_neg:]
        _write_site(dest / site, x, y, idx, names, rng)
        site_dirs[site] = dest / site
    return DemoData(site_dirs=site_dirs, heldout_csv=heldout_csv)
