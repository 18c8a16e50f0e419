"""The learning curves of a job as one PNG: a panel per metric, a thin line per site and a thick one for
the global model, drawn from the job's metrics entries (metrics.jsonl) and its logged-scalar history
(scalars.jsonl, runtime/server/tracker.py).

Panels, in order: validation metrics by the round of the model scored (the job's key metric first), train
metrics by round, then what learners logged (each site's mean over a round, by round). At most MAX_PANELS.
Uses matplotlib's object API (no pyplot state, safe in a worker thread), imported here only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_PANELS = 12
MAX_LEGEND_SITES = 10
FIGURE_DPI = 100
GLOBAL_LABEL = "global"


@dataclass
class Panel:
    title: str
    x_label: str
    sites: dict[str, dict[int, float]] = field(default_factory=dict)  # site -> x -> y
    overall: dict[int, float] = field(default_factory=dict)          # the global model's curve

    def add(self, site: str | None, x: int, y: Any) -> None:
        if isinstance(y, int | float) and not isinstance(y, bool) and math.isfinite(y):
            (self.overall if site is None else self.sites.setdefault(site, {}))[x] = float(y)  # a rerun wins

    @property
    def empty(self) -> bool:
        return not self.overall and not any(self.sites.values())


def panels(metrics: list[dict[str, Any]], scalar_history: list[dict[str, Any]], key_metric: str = "") -> list[Panel]:
    """Every curve the job has, grouped in panels (the first MAX_PANELS are drawn)."""
    validation: dict[str, Panel] = {}
    train: dict[str, Panel] = {}
    learner: dict[str, Panel] = {}

    def panel(group: dict[str, Panel], prefix: str, name: str, x_label: str) -> Panel:
        return group.setdefault(name, Panel(f"{prefix}{name}", x_label))

    for entry in metrics:
        if entry.get("type") == "validation":
            x = int(entry.get("model_round", 0))
            for site, values in (entry.get("sites") or {}).items():
                for name, y in values.items():
                    if name != "n_samples":
                        panel(validation, "validation ", name, "model of round").add(site, x, y)
            for name, y in (entry.get("global") or {}).items():
                panel(validation, "validation ", name, "model of round").add(None, x, y)
        elif entry.get("type") == "round":
            x = int(entry.get("round", 0))
            for site, values in (entry.get("train") or {}).items():
                for name, y in values.items():
                    if name != "n_samples":
                        panel(train, "train ", name, "round").add(site, x, y)
            for name, y in (entry.get("train_global") or {}).items():
                panel(train, "train ", name, "round").add(None, x, y)
    for line in scalar_history:
        x = int(line.get("round", 0))
        for site, names in (line.get("sites") or {}).items():
            for name, summary in names.items():
                panel(learner, "logged ", name, "round (mean of the round)").add(site, x, summary.get("mean"))
    first = [validation.pop(key_metric)] if key_metric in validation else []
    ordered = first + [validation[k] for k in sorted(validation)] + [train[k] for k in sorted(train)] \
        + [learner[k] for k in sorted(learner)]
    return [p for p in ordered if not p.empty]


def curves_png(metrics: list[dict[str, Any]], scalar_history: list[dict[str, Any]],
               key_metric: str = "") -> bytes | None:
    """The curves as PNG bytes; None when the job has no curve yet."""
    found = panels(metrics, scalar_history, key_metric)
    if not found:
        return None
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    shown = found[:MAX_PANELS]
    n_cols = min(3, len(shown))
    n_rows = math.ceil(len(shown) / n_cols)
    fig = Figure(figsize=(4.4 * n_cols, 3.3 * n_rows), dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    all_sites = sorted({site for p in shown for site in p.sites})
    color = {site: f"C{i % 10}" for i, site in enumerate(all_sites)}  # a site keeps its colour in every panel
    n_sites = len(all_sites)
    for i, p in enumerate(shown):
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        for site in sorted(p.sites):
            xs = sorted(p.sites[site])
            ax.plot(xs, [p.sites[site][x] for x in xs], marker="." if len(xs) < 30 else None, linewidth=1,
                    alpha=0.8, color=color[site], label=site if n_sites <= MAX_LEGEND_SITES else None)
        if p.overall:
            xs = sorted(p.overall)
            ax.plot(xs, [p.overall[x] for x in xs], color="black", linewidth=2.5, marker="o" if len(xs) < 30 else None,
                    label=GLOBAL_LABEL)
        ax.set_title(p.title, fontsize=10, parse_math=False)
        ax.set_xlabel(p.x_label, fontsize=8, parse_math=False)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole
        ax.grid(alpha=0.3)
        if i == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if len(found) > len(shown):
        fig.suptitle(f"first {len(shown)} of {len(found)} curves (all of them: tensorboard --logdir tensorboard)",
                     fontsize=9)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


__all__ = ["MAX_PANELS", "Panel", "curves_png", "panels"]
