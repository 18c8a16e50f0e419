"""show_job's cross-site section: the key metric of every model (rows) on every site's data (columns), then
each model's own-site score and its mean over the other sites, the two numbers a reader compares.

The view comes from runtime.server.cross_site_report.report_view. Model labels of an evaluate job and the
metric name come from the job, so every string is cleaned of terminal control sequences and printed as
plain Text (never markup). A matrix wider than the terminal is summarised instead: the full matrix is in
`show_job --json` and in the job's cross_site.csv / cross_site.png (download_job).
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from .sanitize import clean_remote

MODEL_COLUMN_CHARS = 20  # room reserved for the model column when deciding whether the matrix fits
SCORE_COLUMN_CHARS = 9  # "0.8534*" plus the table's padding and border
OWN_MARK = "*"


def cross_site_output(view: dict[str, Any] | None, width: int) -> list[Table | Text]:
    """What show_job prints for a job's cross-site report, in order; nothing for a job without one."""
    if not view:
        return []
    if "error" in view:
        return [Text(clean_remote(f"cross-site report: {view['error']}"))]
    what = "cross-site validation" if view["kind"] == "cross_site" else "evaluation"
    direction = "higher" if view["higher_is_better"] else "lower"
    head = (f"{what}: {view['key_metric']} of each model (rows) on each site's data (columns), {direction} is "
            f"better; {OWN_MARK} = a site's own model on its own data")
    sites, scores = view["sites"], view.get("scores")
    fits = scores is not None and MODEL_COLUMN_CHARS + SCORE_COLUMN_CHARS * (len(sites) + 3) <= width
    table = Table()
    for header in ["model", *(sites if fits else []), "own site", "other sites (mean)", "sites scored"]:
        table.add_column(Text(clean_remote(header)))  # Text: a name is never read as markup
    for model in view["models"]:
        summary = view["summary"][model]
        own = model[len("site:"):] if model.startswith("site:") else None
        cells = [_score(scores[model].get(site), site == own) for site in sites] if fits else []
        table.add_row(Text(clean_remote(model)), *cells, _score(summary["on_diagonal"]),
                      _score(summary["off_diagonal"]), Text(str(summary["n_sites"])))
    out: list[Table | Text] = [Text(clean_remote(head)), table]
    if not fits:
        out.append(Text(f"{len(sites)} sites: the matrix is wider than this terminal; all of it is in "
                        "show_job --json and in cross_site.csv / cross_site.png (download_job)"))
    site_models = view.get("site_models") or {}
    if site_models.get("n_models"):
        out.append(Text(f"site models ({site_models['n_models']}), mean: own site "
                        f"{_score(site_models['on_diagonal']).plain}, other sites "
                        f"{_score(site_models['off_diagonal']).plain}"))
    return out


def _score(value: float | None, own: bool = False) -> Text:
    """A score to 4 decimals, marked when it is a site's own model on its own data; '-' when missing."""
    if value is None:
        return Text("-")
    return Text(f"{value:.4f}" + (OWN_MARK if own else ""))
