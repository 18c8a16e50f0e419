"""runtime/server/cross_site_report.py: the three files a cross-site or evaluate study leaves in the job's
folder, checked against a matrix made by hand: summary means worked out here, the CSV read back with the
csv module, the PNG a real PNG, failed cells missing everywhere, and hostile names kept inert."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from runtime.admin.client import _unzip
from runtime.server.admin_service import AdminService
from runtime.server.cross_site_report import (
    REPORT_CSV,
    REPORT_JSON,
    REPORT_PNG,
    report_view,
    write_report,
)
from runtime.server.job_store import JobStore

SITES = ["site-a", "site-b", "site-c"]
MODELS = ["global", "best", "site:site-a", "site:site-b", "site:site-c"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _matrix() -> dict[str, dict[str, dict[str, float]]]:
    """accuracy and auc per (model, site); site-c never answered for "best" (a failed site: a missing cell)."""
    acc = {"global": [0.80, 0.70, 0.90], "best": [0.85, 0.75, None], "site:site-a": [0.95, 0.50, 0.60],
           "site:site-b": [0.40, 0.90, 0.55], "site:site-c": [0.30, 0.45, 0.99]}
    return {model: {site: {"accuracy": a, "auc": round(a - 0.05, 2), "n_samples": 10.0 * (j + 1)}
                    for j, (site, a) in enumerate(zip(SITES, row, strict=True)) if a is not None}
            for model, row in acc.items()}


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_json_holds_the_matrix_and_summaries_computed_by_hand(tmp_path: Path) -> None:
    write_report(tmp_path, "cross_site", MODELS, SITES, _matrix(), "accuracy", True)

    report = json.loads((tmp_path / REPORT_JSON).read_text())
    assert (report["kind"], report["models"], report["sites"]) == ("cross_site", MODELS, SITES)
    assert (report["key_metric"], report["higher_is_better"]) == ("accuracy", True)
    assert report["matrix"] == _matrix()
    assert "site-c" not in report["matrix"]["best"]
    s = report["summary"]
    assert s["global"] == {"on_diagonal": None, "off_diagonal": pytest.approx((0.80 + 0.70 + 0.90) / 3), "n_sites": 3}
    assert s["best"] == {"on_diagonal": None, "off_diagonal": pytest.approx((0.85 + 0.75) / 2), "n_sites": 2}
    assert s["site:site-a"] == {"on_diagonal": 0.95, "off_diagonal": pytest.approx((0.50 + 0.60) / 2), "n_sites": 3}
    assert s["site:site-b"] == {"on_diagonal": 0.90, "off_diagonal": pytest.approx((0.40 + 0.55) / 2), "n_sites": 3}
    assert s["site:site-c"] == {"on_diagonal": 0.99, "off_diagonal": pytest.approx((0.30 + 0.45) / 2), "n_sites": 3}
    assert report["site_models"] == {"on_diagonal": pytest.approx((0.95 + 0.90 + 0.99) / 3),
                                     "off_diagonal": pytest.approx((0.55 + 0.475 + 0.375) / 3), "n_models": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_CSV, REPORT_JSON, REPORT_PNG]  # no .tmp left


def test_csv_read_back_equals_the_matrix_with_every_metric_a_column(tmp_path: Path) -> None:
    write_report(tmp_path, "cross_site", MODELS, SITES, _matrix(), "accuracy", True)

    with open(tmp_path / REPORT_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "site", "accuracy", "auc", "n_samples"]
    back: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        back.setdefault(row["model"], {})[row["site"]] = {k: float(v) for k, v in row.items()
                                                           if k not in ("model", "site")}
    assert back == _matrix()  # exact: floats are written with repr
    assert len(rows) == 3 * 5 - 1  # one row per scored (model, site), none for the failed cell
    assert [r["model"] for r in rows][:3] == ["global"] * 3


def test_png_is_a_heatmap_image_and_scales_with_the_number_of_sites(tmp_path: Path) -> None:
    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir()
    large.mkdir()
    write_report(small, "cross_site", MODELS, SITES, _matrix(), "accuracy", True)
    sites = [f"s{i:03d}" for i in range(100)]
    models = ["global"] + [f"site:{s}" for s in sites]
    matrix = {m: {s: {"loss": (i * 7 + j) % 13 / 13} for j, s in enumerate(sites)} for i, m in enumerate(models)}
    write_report(large, "cross_site", models, sites, matrix, "loss", False)

    small_png, large_png = (small / REPORT_PNG).read_bytes(), (large / REPORT_PNG).read_bytes()
    small_px, large_px = _png_size(small_png), _png_size(large_png)
    assert min(small_px) > 100 and len(small_png) > 1000
    assert large_px[0] > 2 * small_px[0] and large_px[1] > 2 * small_px[1]  # 100 sites get room, not a smear


def test_missing_and_non_finite_cells_are_absent_not_nan(tmp_path: Path) -> None:
    matrix = _matrix()
    matrix["global"]["site-b"]["accuracy"] = float("nan")
    matrix["global"]["site-c"]["auc"] = float("inf")

    write_report(tmp_path, "cross_site", MODELS, SITES, matrix, "accuracy", True)

    text = (tmp_path / REPORT_JSON).read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON, readable by any parser
    report = json.loads(text)
    assert "accuracy" not in report["matrix"]["global"]["site-b"]
    assert report["summary"]["global"] == {"on_diagonal": None, "off_diagonal": pytest.approx((0.80 + 0.90) / 2),
                                           "n_sites": 2}
    with open(tmp_path / REPORT_CSV, newline="") as f:
        rows = {(r["model"], r["site"]): r for r in csv.DictReader(f)}
    assert rows[("global", "site-b")]["accuracy"] == "" and rows[("global", "site-c")]["auc"] == ""
    assert ("best", "site-c") not in rows
    assert _png_size((tmp_path / REPORT_PNG).read_bytes())  # a grey cell, not a failed figure


def test_hostile_model_and_metric_names_stay_text(tmp_path: Path) -> None:
    """An evaluate job names its models (file names) and its code names the metrics: a formula, a quote, a
    comma, a newline or mathtext in them must neither run in a spreadsheet nor break the files."""
    models = ['=HYPERLINK("http://x","click")', "a,b\"c\nd.safetensors", "$\\frac{1}{0}$_^",
              'x;=HYPERLINK(CHAR(104)&CHAR(116))']  # no comma nor quote: csv left it unquoted
    metric = "@SUM(A1:A9),$x^$"
    matrix = {m: {s: {metric: 0.5 + i / 10, "model": 1.0} for s in SITES} for i, m in enumerate(models)}

    write_report(tmp_path, "evaluate", models, SITES, matrix, metric, True)

    with open(tmp_path / REPORT_CSV, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["model", "site", "'" + metric, "metric.model"]  # never two "model" columns
    assert [r[0] for r in rows[1::3]] == ["'" + models[0], models[1], models[2], models[3]]
    assert all(not cell.startswith(("=", "+", "@")) for row in rows for cell in row)
    with open(tmp_path / REPORT_CSV, newline="") as f:  # as a spreadsheet whose list separator is ; reads it
        cells = [cell for row in csv.reader(f, delimiter=";") for cell in row]
    assert all(not cell.startswith(("=", "+", "@")) for cell in cells), cells
    assert rows[-1][2:] == ["0.8", "1.0"]  # numbers stay numbers
    assert json.loads((tmp_path / REPORT_JSON).read_text())["models"] == models
    assert _png_size((tmp_path / REPORT_PNG).read_bytes())  # mathtext off: "$\frac{1}{0}$" is drawn as text


def test_a_figure_that_fails_leaves_the_numbers_and_no_stale_png(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / REPORT_PNG).write_bytes(PNG_MAGIC + b"stale")

    def broken(report):
        raise RuntimeError("no fonts")

    monkeypatch.setattr("runtime.server.cross_site_report.heatmap_png", broken)
    write_report(tmp_path, "cross_site", MODELS, SITES, _matrix(), "accuracy", True)

    assert json.loads((tmp_path / REPORT_JSON).read_text())["matrix"] == _matrix()
    assert (tmp_path / REPORT_CSV).exists() and not (tmp_path / REPORT_PNG).exists()


def test_labels_missing_from_the_lists_are_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"sites \['site-z'\]"):
        write_report(tmp_path, "cross_site", MODELS, SITES, {"global": {"site-z": {"accuracy": 1.0}}}, "accuracy",
                     True)
    assert not any(tmp_path.iterdir())


def test_view_carries_the_key_metric_matrix_and_summaries(tmp_path: Path) -> None:
    assert report_view(tmp_path) is None  # a job without a report
    write_report(tmp_path, "cross_site", MODELS, SITES, _matrix(), "accuracy", True)

    view = report_view(tmp_path)

    assert view is not None
    assert view["scores"]["site:site-b"] == {"site-a": 0.40, "site-b": 0.90, "site-c": 0.55}
    assert view["scores"]["best"] == {"site-a": 0.85, "site-b": 0.75}
    assert view["summary"]["site:site-a"]["on_diagonal"] == 0.95
    assert (view["kind"], view["key_metric"], view["models"], view["sites"]) == ("cross_site", "accuracy", MODELS,
                                                                                 SITES)


def test_view_of_a_report_written_before_issue_10_and_of_a_broken_one(tmp_path: Path) -> None:
    """Jobs finished before the upgrade keep a cross_site.json of models, sites and matrix only."""
    old = {"models": MODELS, "sites": SITES, "matrix": _matrix()}
    (tmp_path / REPORT_JSON).write_text(json.dumps(old))

    view = report_view(tmp_path)

    assert view is not None and view["key_metric"] == "accuracy"
    assert view["summary"]["site:site-c"]["off_diagonal"] == pytest.approx((0.30 + 0.45) / 2)

    (tmp_path / REPORT_JSON).write_text('{"models": [')
    assert "unreadable" in report_view(tmp_path)["error"]


def test_download_job_ships_the_three_files_and_no_partial_one(tmp_path: Path) -> None:
    """download_job zips the job's folder (AdminService._zip_job) and the console unzips it (client._unzip):
    the report's files arrive as written, and a .tmp left by a write in progress does not."""
    store, log = JobStore(tmp_path / "jobs"), tmp_path / "server.log"
    job_dir = store.job_dir("j1")
    job_dir.mkdir(parents=True)
    log.write_text("j1 started\n")
    write_report(job_dir, "cross_site", MODELS, SITES, _matrix(), "accuracy", True)
    (job_dir / (REPORT_PNG + ".tmp")).write_bytes(b"half")
    service = SimpleNamespace(_runner=SimpleNamespace(store=store), _log_path=log)

    archive = AdminService._zip_job(service, "j1")  # type: ignore[arg-type]
    try:
        _unzip(archive, tmp_path / "downloaded")
    finally:
        archive.unlink()

    got = tmp_path / "downloaded"
    assert sorted(p.name for p in got.iterdir()) == [REPORT_CSV, REPORT_JSON, REPORT_PNG, "server_log.txt"]
    for name in (REPORT_CSV, REPORT_JSON, REPORT_PNG):
        assert (got / name).read_bytes() == (job_dir / name).read_bytes()
