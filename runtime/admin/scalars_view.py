"""show_job's lines for the scalars learners logged (context.log_scalar): per site, the last value of
each name and the step it was logged at. Names and sites come from a site's job code through the server
(which checked them), so they are cleaned once more before they reach a terminal."""

from __future__ import annotations

from typing import Any

from .sanitize import clean_remote

MAX_NAMES_SHOWN = 16  # per site; the rest are in the job's TensorBoard files (download_job)


def scalar_lines(latest: Any) -> list[str]:
    """`latest`: {site: {name: [step, value]}} as show_job sends it; no lines when nothing was logged."""
    if not isinstance(latest, dict) or not latest:
        return []
    lines = ["logged scalars, last value per site (all of them: download_job, then tensorboard --logdir "
             "JOB/tensorboard):"]
    for site in sorted(latest):
        names = latest[site] if isinstance(latest[site], dict) else {}
        shown = [f"{name} {_value(point)}" for name, point in sorted(names.items())[:MAX_NAMES_SHOWN]]
        more = f"  (+{len(names) - MAX_NAMES_SHOWN} more)" if len(names) > MAX_NAMES_SHOWN else ""
        lines.append(clean_remote(f"  {site}: {', '.join(shown) or '-'}{more}"))
    return lines


def _value(point: Any) -> str:
    try:
        step, value = point
        return f"{float(value):.4g} (step {int(step)})"
    except (TypeError, ValueError):
        return "?"


__all__ = ["scalar_lines"]
