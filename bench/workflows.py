"""The measured tables of docs/workflows.md: each aggregator's accuracy and AUC after N rounds on the demo
data and on a label-skewed split of it, and accuracy against DP noise with the epsilon it cost.

Every study runs in one process through runtime.simulate (the real controller, workflows, aggregators and
the worker's command handler; no TLS, no sandbox), with the template job's learner
(templates/jobs/tabular_classifier, its config as shipped, rounds and aggregator set here) on 3 sites.
Each cell is the mean and standard deviation over seeds 0..S-1 (--seeds, 3 by default); a seed fixes the
data split, the model's initialization and batch order, and the DP noise, so a rerun prints the same
numbers up to float summation order.

What the numbers are:
  held-out   the final global model scored on provision/demo_data's held-out set (never given to a site).
             The learner standardizes features with its own site's training statistics, so the held-out set
             is scored once with each site's statistics (as that site would deploy the model) and the
             three scores are averaged.
  sites' val the final global model on each site's own validation split, weighted by its size: the job's
             final_metrics, what show_job prints.
  epsilon    per site after N rounds at delta 1e-5, sampling_rate 1 (every site in every round): the RDP
             accountant of Google's dp-accounting (runtime/privacy_accounting.py where it exists).

    python bench/workflows.py                      # both tables, 10 rounds, 3 seeds (1-3 minutes on 2 cores)
    python bench/workflows.py --rounds 3 --seeds 1 --table dp
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from provision.demo_data import DemoData, write_demo_data, write_label_skewed_data  # noqa: E402
from runtime.job_spec import CLIENT_CONFIG, META, SERVER_CONFIG, JobSpec, load_job_spec  # noqa: E402
from runtime.learner import SiteContext  # noqa: E402
from runtime.simulate import simulate  # noqa: E402
from runtime.weights import Weights, to_bytes  # noqa: E402

TEMPLATE = REPO / "templates" / "jobs" / "tabular_classifier"
SITES = ["site-1", "site-2", "site-3"]
DELTA = 1e-5
INITIAL_MODEL = "initial.safetensors"  # what a DP study here ships as its round-0 model (run_study)

# (row label, overrides of config_fed_server.yml); the server settings are the guide's suggestions, untuned
AGGREGATORS: list[tuple[str, list[str]]] = [
    ("fedavg", ["server.aggregator={name: fedavg}"]),
    ("fedavgm (momentum 0.9)", ["server.aggregator={name: fedavg, server_momentum: 0.9}"]),
    ("fedopt adam (lr 0.01)", ["server.aggregator={name: fedopt, optimizer: adam, server_lr: 0.01}"]),
    ("fedopt yogi (lr 0.01)", ["server.aggregator={name: fedopt, optimizer: yogi, server_lr: 0.01}"]),
    ("fedprox (mu 0.01)", ["server.aggregator={name: fedavg}", "server.proximal_mu=0.01"]),
    ("scaffold", ["server.aggregator={name: scaffold}"]),
    ("median", ["server.aggregator={name: median}"]),
    ("trimmed_mean (0.1)", ["server.aggregator={name: trimmed_mean, trim_fraction: 0.1}"]),
]
NOISE_MULTIPLIERS = [0.0, 0.5, 1.0, 2.0]
CLIP_NORM = 1.0


@dataclass
class Score:
    heldout_accuracy: float
    heldout_auc: float
    sites_accuracy: float
    sites_auc: float

    @staticmethod
    def cells(scores: list[Score]) -> list[str]:
        """held-out accuracy, held-out AUC, sites' val accuracy: each 'mean ± sd' over the seeds."""
        return [_mean_sd([getattr(s, f) for s in scores]) for f in ("heldout_accuracy", "heldout_auc",
                                                                    "sites_accuracy")]


def _template_learner_module() -> ModuleType:
    """The template job's custom/learner.py, imported from its file as a site's worker would."""
    spec = importlib.util.spec_from_file_location("fedkit_bench_template_learner", TEMPLATE / "custom" / "learner.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def site_algorithms_available() -> bool:
    """FedProx and SCAFFOLD need the site-side hooks (runtime/client/local_algorithms.py)."""
    return importlib.util.find_spec("runtime.client.local_algorithms") is not None


def job_spec(rounds: int, seed: int, overrides: list[str]) -> JobSpec:
    files = {name: (TEMPLATE / name).read_text() for name in (META, SERVER_CONFIG, CLIENT_CONFIG)}
    return load_job_spec(files, [f"server.rounds={rounds}", f"meta.min_clients={len(SITES)}",
                                 f"client.learner.args.seed={seed}", *overrides])


def run_study(module: ModuleType, spec: JobSpec, data: DemoData, work: Path, seed: int,
              apply_filters: bool = False) -> Score:
    """One simulated study from fresh learners; the final global model scored as the module docstring says.
    With filters, the job ships its round-0 model (`initial_model`, the one a site's learner would build), as
    docs/workflows.md advises for a DP job: no site then releases a whole model through the filters."""
    learners = {}
    for site, folder in data.site_dirs.items():
        context = SiteContext(site=site, job_id="bench", data_root=folder, work_dir=work / "sites" / site)
        context.work_dir.mkdir(parents=True, exist_ok=True)
        learners[site] = module.TabularLearner(context, **spec.client.learner.args)
    files = {}
    if apply_filters:
        files = {INITIAL_MODEL: to_bytes(next(iter(learners.values())).initial_weights())}
        spec = spec.model_copy(update={"server": spec.server.model_copy(update={"initial_model": INITIAL_MODEL})})
    result = asyncio.run(simulate(spec, learners, work / "server", job_files=files, apply_filters=apply_filters,
                                   filter_seed=seed))
    held = heldout_score(module, result.global_model, learners, data.heldout_csv)
    final = result.record.final_metrics
    return Score(held["accuracy"], held["auc"], final.get("accuracy", math.nan), final.get("auc", math.nan))


def heldout_score(module: ModuleType, model: Weights, learners: dict[str, Any], heldout_csv: Path) -> dict[str, float]:
    x, y = module.read_csv(heldout_csv)
    scores = []
    for learner in learners.values():
        learner.validate(model)  # loads the model into the learner's module
        x_site = torch.from_numpy((x - learner.mean) / learner.std)
        scores.append(module.evaluate(learner.model, x_site, y))
    return {k: float(np.mean([s[k] for s in scores])) for k in ("accuracy", "auc")}


def epsilon(noise_multiplier: float, rounds: int, delta: float = DELTA) -> float:
    """Per-site epsilon of `rounds` gaussian_dp releases with sampling rate 1."""
    try:
        from runtime.privacy_accounting import GaussianMechanism
        from runtime.privacy_accounting import epsilon as accounted

        return accounted({GaussianMechanism(noise_multiplier): rounds}, delta)
    except ImportError:  # before the site's accounting module existed: the same accountant, directly
        if noise_multiplier == 0:
            return math.inf
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        accountant = RdpAccountant()
        accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), rounds)
        return float(accountant.get_epsilon(delta))


def _mean_sd(values: list[float]) -> str:
    if any(math.isnan(v) for v in values):
        return "n/a"
    return f"{np.mean(values):.3f}" if len(values) == 1 else f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def aggregator_table(module: ModuleType, rounds: int, splits: dict[int, dict[str, DemoData]], work: Path
                     ) -> list[str]:
    names = list(next(iter(splits.values())))
    lines = ["| aggregator | " + " | ".join(f"{n}: held-out acc | {n}: held-out AUC | {n}: sites' val acc"
                                           for n in names) + " |",
             "|---|" + "---:|" * (3 * len(names))]
    with_sites = site_algorithms_available()
    for label, overrides in AGGREGATORS:
        if not with_sites and label.startswith(("fedprox", "scaffold")):
            print(f"  {label}: skipped, this checkout has no site-side FedProx/SCAFFOLD "
                  "(runtime/client/local_algorithms.py)", file=sys.stderr)
            continue
        cells = []
        for name in names:
            start, scores = time.monotonic(), []
            for seed, data in splits.items():
                folder = work / f"{label}-{name}-{seed}".replace(" ", "_")
                scores.append(run_study(module, job_spec(rounds, seed, overrides), data[name], folder, seed))
            print(f"  {label} on {name}: {time.monotonic() - start:.1f} s", file=sys.stderr)
            cells += Score.cells(scores)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def dp_table(module: ModuleType, rounds: int, splits: dict[int, DemoData], work: Path) -> list[str]:
    lines = [f"| noise multiplier (clip_norm {CLIP_NORM:g}) | held-out acc | held-out AUC | sites' val acc "
             f"| epsilon per site (delta {DELTA:g}) |", "|---:|---:|---:|---:|---:|"]
    for z in NOISE_MULTIPLIERS:
        dp = (f"client.filters=[{{name: gaussian_dp, args: {{clip_norm: {CLIP_NORM}, noise_multiplier: {z}, "
              f"delta: {DELTA!r}, sampling_rate: 1.0}}}}]")
        start = time.monotonic()
        scores = [run_study(module, job_spec(rounds, seed, ["server.aggregator={name: fedavg}", dp]), data,
                            work / f"dp-{z}-{seed}", seed, apply_filters=True) for seed, data in splits.items()]
        print(f"  noise {z}: {time.monotonic() - start:.1f} s", file=sys.stderr)
        eps = epsilon(z, rounds)
        lines.append(f"| {z:g} | " + " | ".join(Score.cells(scores))
                     + f" | {'inf (no noise)' if math.isinf(eps) else f'{eps:.1f}'} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/workflows.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--table", choices=["all", "aggregators", "dp"], default="all")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1: data split, model init, DP noise")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.seeds < 1:
        p.error("--rounds and --seeds must be >= 1")
    torch.set_num_threads(1)  # the sites train in threads side by side; one torch thread each
    module = _template_learner_module()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedkit-bench-workflows-") as tmp:
        root = Path(tmp)
        splits = {seed: {"demo": write_demo_data(root / f"demo-{seed}", SITES, seed=seed),
                         "label-skewed": write_label_skewed_data(root / f"skewed-{seed}", SITES, seed=seed)}
                  for seed in range(a.seeds)}
        runs, out = root / "runs", []
        across = f"{len(SITES)} sites, mean ± sd over {a.seeds} seeds" if a.seeds > 1 else f"{len(SITES)} sites"
        if a.table in ("all", "aggregators"):
            out += [f"Aggregators after {a.rounds} rounds ({across}):", "",
                    *aggregator_table(module, a.rounds, splits, runs), ""]
        if a.table in ("all", "dp"):
            out += [f"Gaussian DP on the demo split, fedavg, after {a.rounds} rounds ({across}):", "",
                    *dp_table(module, a.rounds, {seed: s["demo"] for seed, s in splits.items()}, runs), ""]
    print("\n".join(out))
    print(f"(whole bench: {time.monotonic() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
