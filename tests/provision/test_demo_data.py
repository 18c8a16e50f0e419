"""The demo data's splits: the label-skewed one gives each site mostly one class, keeps the held-out set of
the demo split for the same seed, and never gives two sites (or a site and the held-out set) the same case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from provision.demo_data import write_demo_data, write_label_skewed_data

SITES = ["site-1", "site-2", "site-3"]


def _table(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)


def _site(folder: Path) -> np.ndarray:
    return np.vstack([_table(folder / "train.csv"), _table(folder / "val.csv")])


def test_label_skewed_sites_are_mostly_one_class_and_share_the_demo_heldout_set(tmp_path: Path) -> None:
    skewed = write_label_skewed_data(tmp_path / "skewed", SITES, seed=3)
    demo = write_demo_data(tmp_path / "demo", SITES, seed=3)
    assert skewed.heldout_csv.read_bytes() == demo.heldout_csv.read_bytes()

    tables = {site: _site(folder) for site, folder in skewed.site_dirs.items()}
    shares = {site: float(t[:, -1].mean()) for site, t in tables.items()}
    assert shares == pytest.approx({"site-1": 0.9, "site-2": 0.1, "site-3": 0.5}, abs=0.01)
    sizes = {len(t) for t in tables.values()}
    assert len(sizes) == 1 and sizes.pop() >= 100  # equal sites, as large as the scarcer class allows

    rows = [tuple(r) for t in [*tables.values(), _table(skewed.heldout_csv)] for r in t[:, :-1]]
    assert len(rows) == len(set(rows))  # no case in two places
    for folder in skewed.site_dirs.values():  # both classes in every validation split, so AUC is defined
        assert set(_table(folder / "val.csv")[:, -1]) == {0.0, 1.0}


def test_label_skewed_shares_cycle_over_more_sites(tmp_path: Path) -> None:
    sites = [f"site-{i}" for i in range(1, 6)]
    data = write_label_skewed_data(tmp_path, sites, malignant_shares=(0.8, 0.2))
    shares = [float(_site(data.site_dirs[s])[:, -1].mean()) for s in sites]
    assert shares == pytest.approx([0.8, 0.2, 0.8, 0.2, 0.8], abs=0.02)


@pytest.mark.parametrize("shares", [(), (1.5,)])
def test_label_skewed_refuses_impossible_shares(tmp_path: Path, shares: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="malignant_shares must be one or more numbers in"):
        write_label_skewed_data(tmp_path, SITES, malignant_shares=shares)
