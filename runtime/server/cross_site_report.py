"""The cross-site report: a scored matrix of models x sites as JSON, CSV and a heatmap, and its short view.

The `cross_site` and `evaluate` workflows end with a matrix: matrix[model][site] = the metrics that site
computed for that model on its own data. Researchers read it three ways, so `write_report` writes three
files into the job's folder, each atomically (a `.tmp` sibling, then a rename; `download_job` skips
`.tmp` names, so a download never ships half a file):

    cross_site.json  kind, models, sites, matrix, key_metric, higher_is_better, and per model a summary:
                     on_diagonal  (a site's model on its own data; null for global/best/evaluated models),
                     off_diagonal (mean over every other site: how well it generalises), n_sites; plus the
                     same two means over all site models ("site_models"), the figure the global model
                     has to beat.
    cross_site.csv   one row per (model, site), every metric a column: for pandas, R or a spreadsheet.
    cross_site.png   a heatmap of the key metric (values in the cells up to 30 sites; the diagonal of site
                     models outlined; failed cells grey).

`report_view` is what `show_job` hands the console: the summary and the key metric per cell, not every metric.

Names are hostile until shown otherwise: site names come from certificates ([A-Za-z0-9._-]), but model
labels of an `evaluate` job are file names from the job and metric names come from the job's code. So text
cells of the CSV are escaped by the csv module and defused against spreadsheet formulas, the figure draws
every string with mathtext off, and non-finite metric values are dropped (a missing cell, never a NaN in
JSON). Writing the PNG is CPU work of a second or more: callers on the event loop use asyncio.to_thread.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger(__name__)

REPORT_JSON = "cross_site.json"
REPORT_CSV = "cross_site.csv"
REPORT_PNG = "cross_site.png"
SITE_PREFIX = "site:"  # "site:<name>": that site's best local model
MAX_CELL_TEXT_SITES = 30  # past this many columns the heatmap drops the numbers in its cells
MAX_VIEW_CELLS = 20_000  # show_job carries the key-metric matrix up to this many cells (then summary only)
MAX_READ_BYTES = 64 << 20  # a cross_site.json larger than this is not parsed for show_job
FIGURE_MAX_INCHES = 60.0  # at FIGURE_DPI: at most 6000 px a side, whatever the number of sites
FIGURE_DPI = 100
CSV_FIXED_COLUMNS = ("model", "site")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell starting with these as a formula

Kind = Literal["cross_site", "evaluate"]
Matrix = dict[str, dict[str, dict[str, float]]]


class ModelSummary(BaseModel):
    """One model's row in one number each: its own site's score, and the mean over the others."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    on_diagonal: float | None  # site:X on X; None for models that are not a site's
    off_diagonal: float | None  # mean over every other site (all sites for global/best/evaluated models)
    n_sites: int  # sites that returned the key metric for this model


class SiteModelsSummary(BaseModel):
    """The mean over all site models of their on- and off-diagonal scores: what the global model must beat."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    on_diagonal: float | None
    off_diagonal: float | None
    n_models: int


class CrossSiteReport(BaseModel):
    """cross_site.json. `models`, `sites` and `matrix` keep the keys of the report before issue 10."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Kind
    models: list[str]
    sites: list[str]
    matrix: Matrix
    key_metric: str
    higher_is_better: bool
    summary: dict[str, ModelSummary]
    site_models: SiteModelsSummary


def site_of(model: str) -> str | None:
    """The site whose local model `model` labels ("site:X" -> "X"), else None."""
    return model[len(SITE_PREFIX):] if model.startswith(SITE_PREFIX) else None


def build_report(kind: Kind, models: list[str], sites: list[str], matrix: Matrix, key_metric: str,
                 higher_is_better: bool) -> CrossSiteReport:
    """The report with its summaries computed; non-finite metric values dropped. Pure: no I/O."""
    _check_labels(models, sites, matrix)
    clean: Matrix = {}
    for model in models:
        row = matrix.get(model, {})
        clean[model] = {site: {name: float(v) for name, v in row[site].items() if _finite(v)}
                        for site in sites if site in row}
    summary = {model: _summarize(model, clean[model], sites, key_metric) for model in models}
    site_rows = [summary[m] for m in models if site_of(m) is not None]
    site_models = SiteModelsSummary(on_diagonal=_mean([s.on_diagonal for s in site_rows]),
                                    off_diagonal=_mean([s.off_diagonal for s in site_rows]),
                                    n_models=len(site_rows))
    return CrossSiteReport(kind=kind, models=list(models), sites=list(sites), matrix=clean, key_metric=key_metric,
                           higher_is_better=higher_is_better, summary=summary, site_models=site_models)


def write_report(job_dir: Path, kind: Kind, models: list[str], sites: list[str], matrix: Matrix, key_metric: str,
                 higher_is_better: bool) -> None:
    """Write cross_site.json, .csv and .png into job_dir. Blocking (matplotlib): call it via asyncio.to_thread.

    The JSON and CSV come first; a figure that fails to render is logged and leaves no PNG (not a stale
    one from an earlier workflow of the job), and never costs the study its numbers."""
    report = build_report(kind, models, sites, matrix, key_metric, higher_is_better)
    _atomic_write(job_dir / REPORT_CSV, report_csv(report).encode())
    _atomic_write(job_dir / REPORT_JSON, json.dumps(report.model_dump(mode="json"), indent=2).encode())
    try:
        _atomic_write(job_dir / REPORT_PNG, heatmap_png(report))
    except Exception as e:  # noqa: BLE001 - a plotting failure must not fail the study after its work is done
        (job_dir / REPORT_PNG).unlink(missing_ok=True)
        log.warning("cross-site heatmap not written for %s: %s: %s", job_dir.name, type(e).__name__, e)


def report_csv(report: CrossSiteReport) -> str:
    """One row per (model, site) that has a score, in the report's order; every metric seen is a column."""
    metrics = sorted({name for row in report.matrix.values() for cell in row.values() for name in cell})
    header = list(CSV_FIXED_COLUMNS) + [f"metric.{m}" if m in CSV_FIXED_COLUMNS else m for m in metrics]
    out = io.StringIO()
    # every text quoted: a spreadsheet whose list separator is `;` split an unquoted `x;=HYPERLINK(...)` and
    # evaluated its second half; numbers stay numbers
    writer = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    writer.writerow([_csv_text(h) for h in header])
    for model in report.models:
        for site in report.sites:
            cell = report.matrix[model].get(site)
            if cell is not None:
                writer.writerow([_csv_text(model), _csv_text(site)] + [float(cell[m]) if m in cell else ""
                                                                       for m in metrics])
    return out.getvalue()


def heatmap_png(report: CrossSiteReport) -> bytes:
    """The key metric as a models x sites heatmap, as PNG bytes. Uses matplotlib's object API (no pyplot
    state, safe in a worker thread) and imports it here, so the server starts without it."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n_models, n_sites = len(report.models), len(report.sites)
    values = np.full((max(n_models, 1), max(n_sites, 1)), np.nan)
    for i, model in enumerate(report.models):
        for j, site in enumerate(report.sites):
            v = report.matrix[model].get(site, {}).get(report.key_metric)
            if v is not None:
                values[i, j] = v
    with_text = n_sites <= MAX_CELL_TEXT_SITES
    cell_in = 0.6 if with_text else 0.18  # room for "0.853" in a cell, or just for a tick label
    width_in = min(FIGURE_MAX_INCHES, 3.5 + cell_in * n_sites)
    height_in = min(FIGURE_MAX_INCHES, 2.5 + (0.45 if with_text else 0.18) * n_models)
    fig = Figure(figsize=(width_in, height_in), dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = colormaps["viridis" if report.higher_is_better else "viridis_r"]  # bright is always better
    cmap = cmap.with_extremes(bad="#d9d9d9")  # a site that did not answer: grey, no number
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if low == high:
        low, high = low - 0.5, high + 0.5
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=low, vmax=high, aspect="auto",
                      interpolation="nearest")
    tick_pt = 9 if with_text else (6 if max(n_sites, n_models) <= 150 else 4)  # 6 pt fits a 0.18 in cell
    ax.set_xticks(range(n_sites))
    ax.set_xticklabels(report.sites, rotation=90, fontsize=tick_pt, parse_math=False)
    ax.set_yticks(range(n_models))
    ax.set_yticklabels(report.models, fontsize=tick_pt, parse_math=False)
    ax.set_xlabel("data of site", parse_math=False)
    ax.set_ylabel("model", parse_math=False)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(report.key_metric, parse_math=False)
    if with_text:
        for i in range(n_models):
            for j in range(n_sites):
                if np.isfinite(values[i, j]):
                    r, g, b, _ = cmap((values[i, j] - low) / (high - low))
                    ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                    ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", color=ink, fontsize=8,
                            parse_math=False)
    column = {site: j for j, site in enumerate(report.sites)}
    outlined = False
    for i, model in enumerate(report.models):
        own = site_of(model)
        if own in column:
            ax.add_patch(Rectangle((column[own] - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red",
                                   linewidth=2 if with_text else 1))
            outlined = True
    what = "cross-site validation" if report.kind == "cross_site" else "evaluation"
    title = f"{what}: {report.key_metric} ({'higher' if report.higher_is_better else 'lower'} is better)"
    ax.set_title(title + ("\nred outline: a site's own model on its own data" if outlined else ""),
                 fontsize=10, parse_math=False)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    return out.getvalue()


def report_view(job_dir: Path) -> dict[str, Any] | None:
    """What show_job carries: the summaries and the key metric per cell (not every metric), or None when the
    job has no report. A report that cannot be read becomes {"error": one line}, so show_job still works."""
    path = job_dir / REPORT_JSON
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size > MAX_READ_BYTES:
        return {"error": f"{REPORT_JSON} is {size} bytes, more than show_job reads ({MAX_READ_BYTES}); "
                         "download_job has it, with the CSV and the heatmap"}
    try:
        report = _parse(json.loads(path.read_bytes()))
    except (OSError, ValueError, ValidationError) as e:
        return {"error": f"{REPORT_JSON} is unreadable ({type(e).__name__}); download_job has the job's files"}
    view: dict[str, Any] = {
        "kind": report.kind, "key_metric": report.key_metric, "higher_is_better": report.higher_is_better,
        "models": report.models, "sites": report.sites,
        "summary": {m: s.model_dump() for m, s in report.summary.items()},
        "site_models": report.site_models.model_dump(),
    }
    if len(report.models) * len(report.sites) <= MAX_VIEW_CELLS:
        view["scores"] = {m: {s: cell.get(report.key_metric) for s, cell in report.matrix[m].items()}
                          for m in report.models}
    return view


def _parse(data: Any) -> CrossSiteReport:
    """cross_site.json as written now, or by the controller before issue 10 (models, sites, matrix only:
    summaries are computed with accuracy, or the first metric, as the key)."""
    if isinstance(data, dict) and "key_metric" not in data and {"models", "sites", "matrix"} <= data.keys():
        names = sorted({n for row in data["matrix"].values() for cell in row.values() for n in cell})
        key = "accuracy" if "accuracy" in names else (names[0] if names else "accuracy")
        return build_report("cross_site", data["models"], data["sites"], data["matrix"], key, True)
    return CrossSiteReport.model_validate(data)


def _summarize(model: str, row: dict[str, dict[str, float]], sites: list[str], key_metric: str) -> ModelSummary:
    own = site_of(model)
    scores = {site: row[site][key_metric] for site in sites if site in row and key_metric in row[site]}
    return ModelSummary(on_diagonal=scores.get(own) if own is not None else None,
                        off_diagonal=_mean([v for site, v in scores.items() if site != own]),
                        n_sites=len(scores))


def _check_labels(models: list[str], sites: list[str], matrix: Matrix) -> None:
    """The workflow's labels are consistent: a caller's bug, named, rather than a report that silently drops rows."""
    if len(set(models)) != len(models) or len(set(sites)) != len(sites):
        raise ValueError("cross-site report: models and sites must not repeat")
    unknown_models = set(matrix) - set(models)
    unknown_sites = {site for row in matrix.values() for site in row} - set(sites)
    if unknown_models or unknown_sites:
        raise ValueError(f"cross-site report: the matrix names models {sorted(unknown_models)} and sites "
                         f"{sorted(unknown_sites)} missing from the models and sites lists")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _csv_text(text: str) -> str:
    """A text cell a spreadsheet shows as text: a leading = + - @ tab or CR would make it a formula."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
