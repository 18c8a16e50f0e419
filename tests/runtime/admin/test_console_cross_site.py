"""show_job's cross-site section: the key metric per model and site, each model's own-site and other-site
means, a summary when the matrix is wider than the terminal, and the same data under --json."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from runtime.admin.console import AdminConsole
from runtime.server.cross_site_report import report_view, write_report

SITES = ["site-a", "site-b"]
MODELS = ["global", "site:site-a", "site:site-b"]
MATRIX = {"global": {"site-a": {"accuracy": 0.8}, "site-b": {"accuracy": 0.7}},
          "site:site-a": {"site-a": {"accuracy": 0.95}, "site-b": {"accuracy": 0.5}},
          "site:site-b": {"site-b": {"accuracy": 0.9}}}  # site-a did not score site-b's model
RECORD = {"job_id": "j1", "name": "job", "state": "finished", "rounds_done": 2, "rounds_total": 2,
          "submitter": "lead", "submitter_org": "o", "submitter_role": "lead", "config_hash": "c" * 16,
          "overrides": [], "job_sha256": "a" * 64, "submitted_at": 1.0, "started_at": 2.0, "finished_at": 3.0,
          "best_metric": None, "best_round": None, "final_metrics": {}, "error": ""}


class _Server:
    def __init__(self, reply: dict[str, Any]):
        self._reply = reply

    async def command(self, name: str, **args: Any) -> Any:
        assert name == "show_job"
        return self._reply


def _view(tmp_path: Path, sites: list[str] = SITES, models: list[str] = MODELS, matrix: dict = MATRIX) -> dict:
    write_report(tmp_path, "cross_site", models, sites, matrix, "accuracy", True)
    view = report_view(tmp_path)
    assert view is not None
    return view


def _show_job(view: dict | None, width: int = 160, as_json: bool = False) -> str:
    out = io.StringIO()
    reply = {"record": RECORD, "queue_position": None, "metrics": [], "cross_site": view}
    console = AdminConsole(_Server(reply), Console(file=out, width=width, markup=False, highlight=False),  # type: ignore[arg-type]
                           as_json=as_json)
    asyncio.run(console.run_line("show_job j1"))
    return out.getvalue()


def _row(printed: str, model: str) -> list[str]:
    line = next(line.replace("┃", "│") for line in printed.splitlines() if line[2:].startswith(f"{model} "))
    return [cell.strip() for cell in line.strip("│ \n").split("│")]


def test_matrix_rows_are_models_columns_sites_then_the_two_means(tmp_path: Path) -> None:
    printed = _show_job(_view(tmp_path))

    assert "cross-site validation: accuracy" in printed and "higher is better" in printed
    header = _row(printed, "model")
    assert header == ["model", "site-a", "site-b", "own site", "other sites (mean)", "sites scored"]
    assert _row(printed, "global") == ["global", "0.8000", "0.7000", "-", "0.7500", "2"]
    assert _row(printed, "site:site-a") == ["site:site-a", "0.9500*", "0.5000", "0.9500", "0.5000", "2"]
    assert _row(printed, "site:site-b") == ["site:site-b", "-", "0.9000*", "0.9000", "-", "1"]
    assert "site models (2), mean: own site 0.9250, other sites 0.5000" in printed


def test_a_matrix_wider_than_the_terminal_is_summarised(tmp_path: Path) -> None:
    sites = [f"s{i:02d}" for i in range(40)]
    models = ["global"] + [f"site:{s}" for s in sites]
    matrix = {m: {s: {"accuracy": 0.5} for s in sites} for m in models}

    printed = _show_job(_view(tmp_path, sites, models, matrix), width=120)

    assert _row(printed, "global") == ["global", "-", "0.5000", "40"]
    assert _row(printed, "site:s07") == ["site:s07", "0.5000", "0.5000", "40"]
    assert "40 sites: the matrix is wider than this terminal" in printed and "cross_site.csv" in printed


def test_json_carries_the_same_view(tmp_path: Path, capsys) -> None:
    view = _view(tmp_path)

    _show_job(view, as_json=True)
    printed = json.loads(capsys.readouterr().out)  # --json prints with print(), not through rich

    assert printed["cross_site"] == json.loads(json.dumps(view))
    assert printed["cross_site"]["scores"]["site:site-b"] == {"site-b": 0.9}


def test_no_report_prints_nothing_and_a_broken_one_prints_one_line(tmp_path: Path) -> None:
    assert "cross-site" not in _show_job(None)
    printed = _show_job({"error": "cross_site.json is unreadable (JSONDecodeError); download_job has the job's files"})
    assert printed.count("cross-site report: cross_site.json is unreadable") == 1


def test_every_kind_of_metrics_entry_prints_and_the_privacy_lines_follow(tmp_path: Path) -> None:
    privacy = {"task": "train", "applied_to": "delta", "on_weaker_job": "raise", "raised": False,
               "chain": [{"name": "percentile", "args": {"fraction": 0.5}, "source": "job"}]}
    metrics = [
        {"type": "shared", "task": "init", "round": 0, "step": 1, "sites": ["site-a"], "failed": {}, "privacy": {}},
        {"type": "validation", "model_round": 0, "step": 2, "sites": {"site-b": {"accuracy": 0.5}},
         "global": {"accuracy": 0.5}, "is_best": False},
        {"type": "round", "round": 1, "step": 2, "sites": ["site-a"], "failed": {}, "n_samples": {"site-a": 3},
         "train": {"site-a": {"loss": 0.1}}, "privacy": {"site-a": privacy}},
        {"type": "wire", "step": 2, "round": 1, "wire_dtype": "int8"},            # written by the controller
        {"type": "scored", "step": 3, "model": "global", "sites": {}, "failed": {}},  # by evaluate/cross_site
    ]
    out = io.StringIO()
    reply = {"record": RECORD, "queue_position": None, "metrics": metrics, "cross_site": _view(tmp_path)}
    console = AdminConsole(_Server(reply), Console(file=out, width=160, markup=False, highlight=False),  # type: ignore[arg-type]
                           as_json=False)
    asyncio.run(console.run_line("show_job j1"))
    printed = out.getvalue()
    assert "model 0" in printed and "(init)" in printed
    # a model's score names the sites whose results counted (site-a's update was refused): not "all"
    (scored,) = [line for line in printed.splitlines() if "model 0" in line and "accuracy" in line]
    assert "site-b" in scored and "site-a" not in scored and " all " not in scored
    assert "  site-a: percentile(fraction=0.5)  [round 1]" in printed.splitlines()
