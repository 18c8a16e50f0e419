"""`fedkit simulate JOB_FOLDER`: try a job on virtual sites on this machine before submitting it.

The same job folder, config schemas (and `--set` overrides, as `submit_job` takes them), server workflows,
aggregator, learner code (loaded with custom/ on sys.path, as the worker loads it), worker contract and the
job's client filters as a real study; no kits, TLS, sandbox or site privacy policy (runtime/simulate.py
says what is left out). The learners run in a pool of worker processes sized to the cores
(runtime/simulate_pool.py), each hosting many sites; `--processes 0` runs them in this process.

Sites and their data:
    --data-roots A --data-roots B   one site per folder, named after the folder (site-N where names repeat)
    --sites N --data-roots A --data-roots B   N sites, the folders given cycled over them
    --sites N --demo-data     the demo study's three splits of the breast-cancer table (provision/demo_data.py),
                              written under OUT/data; sites beyond three reuse them cyclically (a scale
                              run: sites 1, 4, 7, ... hold the same rows)
    --sites N                 no data root (for a learner that makes its own data)

Results go to OUT/simulated/, the layout `download_job` gives (models/, metrics.jsonl, record.json,
cross_site.* with the cross_site workflow); the sites' work folders and the pool's logs to OUT/work/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from runtime.aggregators.custom import load_job_aggregator
from runtime.errors import ConfigError, JobRejected
from runtime.job_check import check_static
from runtime.job_spec import CUSTOM_DIR, JobSpec, load_job_folder
from runtime.learner import Learner
from runtime.simulate import JOB_ID, SimulationResult, SitePool, simulate
from runtime.simulate_pool import ProcessPool, pool_shape
from runtime.workflows import weighted_metrics

MAX_SITES = 10_000
MAX_JOB_FILE_BYTES = 256 << 20   # a job file the simulator reads into memory (the upload cap of a real job)
REFRESH_S = 0.5
DEMO_SPLITS = 3


def site_data(sites: int | None, data_roots: list[Path], demo_data: bool, out: Path) -> dict[str, Path | None]:
    """The virtual sites, in order, and each one's data root (see the module docstring)."""
    if sites is not None and not 1 <= sites <= MAX_SITES:
        raise ConfigError(f"--sites {sites}: give a number from 1 to {MAX_SITES}")
    if demo_data and data_roots:
        raise ConfigError("--demo-data and --data-roots both given: use one (demo data, or your own folders)")
    for root in data_roots:
        if not root.is_dir():
            raise ConfigError(f"--data-roots: {root} is not a folder; give one data folder per site")
    if sites is None:
        if not data_roots:
            raise ConfigError("no sites: give --data-roots DIR... (one site per folder) or --sites N "
                              "(with --demo-data for the demo study's data)")
        names = [r.name for r in data_roots]
        if len(set(names)) < len(names) or any(not n or n.startswith(".") for n in names):
            names = [f"site-{i + 1}" for i in range(len(data_roots))]
        return {name: root.resolve() for name, root in zip(names, data_roots, strict=True)}
    if len(data_roots) > sites:  # the rest were ignored without a word
        raise ConfigError(f"--sites {sites} with {len(data_roots)} --data-roots: the last "
                          f"{len(data_roots) - sites} would be left out; give --sites {len(data_roots)} or leave "
                          "--sites out (one site per folder)")
    names = [f"site-{i + 1}" for i in range(sites)]
    if demo_data:
        from provision.demo_data import write_demo_data  # imports scikit-learn: only when asked for

        splits = write_demo_data(out / "data", [f"split-{i + 1}" for i in range(min(sites, DEMO_SPLITS))])
        folders: list[Path | None] = list(splits.site_dirs.values())
    else:
        folders = [r.resolve() for r in data_roots] or [None]
    return {name: folders[i % len(folders)] for i, name in enumerate(names)}


def check_sites(spec: JobSpec, sites: list[str]) -> None:
    """Refuse what would leave the simulated server waiting for sites that never come."""
    if spec.meta.sites != "all":
        missing = sorted(set(spec.meta.sites) - set(sites))
        if missing:
            raise ConfigError(f"meta.yml sites: names {', '.join(missing)}, which are not among the virtual sites "
                              f"({sites[0]} .. {sites[-1]}); use --set meta.sites=all or name the folders so")
    if spec.meta.min_clients > len(sites):
        raise ConfigError(f"meta.yml min_clients: {spec.meta.min_clients} but only {len(sites)} virtual sites; "
                          f"give --sites {spec.meta.min_clients} or more, or --set meta.min_clients={len(sites)}")


def job_files(folder: Path) -> dict[str, bytes]:
    """The job folder's files besides its code (the initial model, models to evaluate), as a server gets them."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] != CUSTOM_DIR and "__pycache__" not in rel.parts:
            if path.stat().st_size > MAX_JOB_FILE_BYTES:
                raise ConfigError(f"{path}: larger than {MAX_JOB_FILE_BYTES >> 20} MiB, the cap on a job's files")
            files[rel.as_posix()] = path.read_bytes()
    return files


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())
                     if k != "n_samples") or "-"


def table_title(spec: JobSpec, n_sites: int) -> str:
    """What the study runs: its workflows, and its rounds where one of them trains."""
    rounds = f", {spec.server.rounds} rounds" if "fedavg" in spec.server.workflows else ""
    return f"{n_sites} virtual sites: {' then '.join(spec.server.workflows)}{rounds}"


def rounds_table(entries: list[dict[str, Any]], title: str) -> Table:
    """One row per round (how many sites answered, the weighted train metrics), per scored global model, and
    per model the cross_site and evaluate workflows scored on every site (its mean over them, weighted)."""
    table = Table("round / model", "sites", "failed", "train (weighted)", "validation (weighted over sites)",
                  title=title)
    for e in entries:
        if e["type"] == "round":
            table.add_row(str(e["round"]), str(len(e["sites"])), str(len(e["failed"])) if e["failed"] else "",
                          _fmt(e.get("train_global") or {}), "")
        elif e["type"] == "validation":
            table.add_row(f"model {e['model_round']}", "", "", "", _fmt(e["global"]) + ("  [best]" if e["is_best"]
                                                                                        else ""))
        elif e["type"] == "scored":
            table.add_row(f"scored {e['model']}", str(len(e["sites"])), str(len(e["failed"])) if e["failed"] else "",
                          "", _fmt(weighted_metrics(e["sites"])))
        elif e["type"] == "shared":
            table.add_row(f"{e['round']} ({e['task']})", str(len(e["sites"])),
                          str(len(e["failed"])) if e["failed"] else "", "", "")
    return table


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written right now
            entries.append(json.loads(line))
    return entries


async def _live_table(metrics: Path, spec: JobSpec, n_sites: int, console: Console) -> None:
    title = table_title(spec, n_sites)
    with Live(rounds_table([], title), console=console, auto_refresh=False) as live:
        try:
            while True:
                entries = await asyncio.to_thread(_read_metrics, metrics)
                live.update(rounds_table(entries, title), refresh=True)
                await asyncio.sleep(REFRESH_S)  # a refresh period, not a synchronization
        finally:
            entries = await asyncio.to_thread(_read_metrics, metrics)
            live.update(rounds_table(entries, title), refresh=True)


def in_process_learners(job_dir: Path, spec: JobSpec, data: dict[str, Path | None], work: Path) -> dict[str, Learner]:
    """Every site's learner in this process (`--processes 0`), loaded as the worker loads it."""
    from runtime.client.worker import _load_learner
    from runtime.learner import SiteContext

    module = spec.client.learner.path.partition(":")[0]
    cached = getattr(sys.modules.get(module), "__file__", None) or ""
    if module in sys.modules and not Path(cached).resolve().is_relative_to(job_dir.resolve()):
        del sys.modules[module]  # another job's module of that name, imported earlier in this process
    learners = {}
    for site, root in data.items():
        context = SiteContext(site=site, job_id=JOB_ID, data_root=root, work_dir=work / "sites" / site)
        context.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            learners[site] = _load_learner(job_dir, spec.client.learner.path, spec.client.learner.args, context)
        except Exception as e:  # the job's code: name the site and the error, in one line
            raise ConfigError(f"site '{site}': the job's learner did not load ({type(e).__name__}: {e}); fix the "
                              "learner or the site's data folder") from None
    return learners


async def run_simulation(job_dir: Path, spec: JobSpec, data: dict[str, Path | None], out: Path,
                         processes: int | None, console: Console | None = None,
                         overrides: list[str] | None = None) -> SimulationResult:
    """Start the sites (a pool, or in this process with processes=0), run the job, show the live table."""
    work = out / "work"
    pool: SitePool | None = None
    sites: dict[str, Learner] | SitePool
    if processes == 0:
        sites = await asyncio.to_thread(in_process_learners, job_dir, spec, data, work)
    else:
        pool = await ProcessPool.start(job_dir.resolve(), spec.client.learner.path, spec.client.learner.args, data,
                                       work, processes, task_timeout_s=spec.client.task_timeout_s)
        sites = pool
    files = await asyncio.to_thread(job_files, job_dir)
    table = asyncio.create_task(_live_table(out / JOB_ID / "metrics.jsonl", spec, len(data), console or Console()))
    try:
        # a custom aggregator is the person's own code on their own machine: it runs here, as on a server
        # whose IT allowed job aggregators
        code = job_dir.resolve() / CUSTOM_DIR
        return await simulate(spec, sites, out, job_files=files, apply_filters=True, overrides=overrides,
                              load_aggregator=lambda config: load_job_aggregator(code, config))
    finally:
        table.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await table
        if isinstance(pool, ProcessPool):
            await pool.close()


def _results(folder: Path) -> list[str]:
    """The result files a person opens, as the folder holds them (models/ where a trained model was kept)."""
    names = ["models/"] if (folder / "models" / "global.safetensors").is_file() else []
    return names + [n for n in ("cross_site.json", "cross_site.csv", "cross_site.png", "metrics.jsonl", "record.json")
                    if (folder / n).is_file()]


def simulate_command(job_dir: Path, sites: int | None, data_roots: list[Path], demo_data: bool, out: Path,
                     processes: int | None, overrides: list[str], console: Console | None = None) -> SimulationResult:
    """`fedkit simulate`: check the input, run, print where the results are."""
    console = console or Console()
    if processes is not None and processes < 0:
        raise ConfigError(f"--processes {processes}: give 0 (all sites in this process) or more")
    # every config problem at once, with its fix ("did you mean 'rounds'?"), as submit_job gives them
    if problems := check_static(job_dir, overrides).problems:
        raise ConfigError(f"{job_dir}: " + "; ".join(p.line() for p in problems))
    try:
        spec = load_job_folder(job_dir, overrides)
    except JobRejected as e:  # the person's own job folder: bad input (exit 2), as a bad project.yml is
        raise ConfigError(f"{job_dir}: {e}") from None
    if not (job_dir / CUSTOM_DIR).is_dir() and not any(job_dir.glob("*.py")):
        raise ConfigError(f"{job_dir}: no {CUSTOM_DIR}/ folder with the learner's code")
    if (out / JOB_ID).exists():
        raise ConfigError(f"--out {out}: already holds a simulation ({out / JOB_ID}); give a new folder or delete it")
    made_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        data = site_data(sites, data_roots, demo_data, out)  # demo data is written under OUT/data
        check_sites(spec, list(data))
    except ConfigError:
        if made_out:  # bad input leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    n_proc, threads = pool_shape(len(data), processes) if processes != 0 else (0, 0)
    console.print(f"simulating job '{spec.meta.name}' on {len(data)} virtual sites, "
                  + (f"{n_proc} worker processes x {threads} threads" if n_proc else "in this process"),
                  markup=False, highlight=False)
    started = time.monotonic()
    result = asyncio.run(run_simulation(job_dir, spec, data, out, processes, console, overrides))
    record = result.record
    console.print()
    done = (f"rounds {record.rounds_done}/{record.rounds_total}, final {_fmt(record.final_metrics or {})}"
            if "fedavg" in spec.server.workflows else f"no training (workflows: {', '.join(spec.server.workflows)})")
    console.print(f"{record.state.value} in {time.monotonic() - started:.1f} s: {done}", markup=False, highlight=False)
    console.print(f"results in {result.folder} ({', '.join(_results(result.folder))})", markup=False,
                  highlight=False)
    return result
