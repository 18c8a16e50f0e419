"""`fedkit demo` (and `make demo`): the whole product on one machine in about a minute.

It prepares three hospitals' data (scikit-learn's bundled breast-cancer set, split by size and label
mix), provisions project.yml.example, unzips every kit as site IT would, starts the server and three
sites with their own start.sh, submits the tabular job with the lead's admin kit, follows it round by
round, downloads the results, and stops everything it started. `--task segmentation` gives the sites
synthetic images (provision/demo_segmentation.py) and submits the MONAI segmentation job instead.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .demo_data import write_demo_data
from .local_study import LocalStudy, cores_per_site, wait_until

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PROJECT = REPO / "project.yml.example"
JOB_TEMPLATE = REPO / "templates" / "jobs" / "tabular_classifier"
SEGMENTATION_TEMPLATE = REPO / "templates" / "jobs" / "segmentation"
TASKS = ("tabular", "segmentation")  # `fedkit demo --task`: the job each site trains


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run_demo(workspace: Path | None = None, rounds: int = 5, python: str = sys.executable,
             keep: bool = False, task: str = "tabular") -> dict:
    """Run the demo study; returns the job's record as show_job gives it."""
    if task not in TASKS:
        raise ValueError(f"--task {task}: choose one of {', '.join(TASKS)}")
    root = workspace or Path(tempfile.mkdtemp(prefix="fedkit-demo-"))
    is_temporary = workspace is None and not keep
    try:
        return _run(root, rounds, python, task)
    finally:
        if is_temporary:
            shutil.rmtree(root, ignore_errors=True)
            _say(f"removed {root} (kits, keys and results); run `fedkit demo --keep` to look at them")
        else:
            _say(f"kept {root}: kits (with private keys), data and results")


def _demo_sandbox() -> dict:
    """The sites' sandbox: the native one where this machine can run it. Where it cannot (no bubblewrap,
    no user namespaces) the demo, whose only job is fedkit's own template, runs it unsandboxed and says
    so; a real site refuses job code instead (local/site.yml `sandbox:`)."""
    from runtime.client.sandbox_native import NativeSandbox

    reason = NativeSandbox().unavailable_reason()
    if reason is None:
        return {"backend": "native"}
    _say(f"NOTE: the job sandbox cannot run on this machine, so the demo runs its job unsandboxed: {reason}")
    return {"backend": "off"}


def _run(root: Path, rounds: int, python: str, task: str = "tabular") -> dict:
    started = time.monotonic()
    if root.exists() and any(root.iterdir()):
        shutil.rmtree(root)
    _say(f"workspace: {root}")
    study = LocalStudy.create(EXAMPLE_PROJECT, root, python=python)
    _say(
        f"provisioned {EXAMPLE_PROJECT.name}: server '{study.server}' (ports {study.fed_learn_port}/"
        f"{study.admin_port}, free ones in place of the example's), sites {', '.join(study.clients)}, "
        f"admins {', '.join(study.admins)}; kits unzipped under {root / 'kits'}"
    )
    job_template, wait_s = (JOB_TEMPLATE, 300) if task == "tabular" else (SEGMENTATION_TEMPLATE, 1200)
    if task == "segmentation":
        from .demo_segmentation import describe_site, write_segmentation_data

        data = write_segmentation_data(root / "data", study.clients)
    else:
        data = write_demo_data(root / "data", study.clients)
    sandbox = _demo_sandbox()
    for site in study.clients:
        study.write_local(site, "site.yml", {"data_root": str(data.site_dirs[site]), "sandbox": sandbox,
                                             "threads": cores_per_site(len(study.clients))})
        if task == "segmentation":
            _say(describe_site(site, data.site_dirs[site]))
            continue
        n_train = sum(1 for _ in (data.site_dirs[site] / "train.csv").open()) - 1
        _say(f"{site}: {n_train} training records in {data.site_dirs[site]} (they never leave the site)")
    lead = next((a for a in study.admins if a.startswith("lead")), study.admins[0])
    try:
        study.start_server()
        _say(f"server up (log: {study.log_path(study.server)})")
        for site in study.clients:
            study.start(site)

        def all_online() -> bool:
            status = study.admin_json("check_status client", admin=lead)
            return sum(s["online"] for s in status["sites"]) == len(study.clients)

        wait_until(all_online, 60, "all sites to connect", interval_s=0.5)
        _say(f"{len(study.clients)} sites online; submitting job '{job_template.name}' as {lead}")
        job = root / "jobs" / job_template.name
        shutil.copytree(job_template, job)
        record = study.admin_json(f"submit_job {job} --set server.rounds={rounds}", admin=lead)
        job_id = record["job_id"]
        _say(f"job {job_id} queued; following it (fl_admin.sh -c 'wait_job {job_id}'):")
        if study.admin_live(f"wait_job {job_id} {wait_s}", admin=lead) != 0:
            raise RuntimeError(f"job {job_id} did not finish (see above)")
        results = root / "results"
        study.admin_json(f"download_job {job_id} {results}", admin=lead)
        models = results / job_id / "models"
        shown = study.admin_json(f"show_job {job_id}", admin=lead)["record"]
        _say(f"global model: {models / 'global.safetensors'}")
        key = "auc" if task == "tabular" else "dice"
        _say(
            f"best model:   {models / 'best.safetensors'} (round {shown['best_round']}, "
            f"{key} {shown['best_metric']:.4f})"
        )
        if task == "segmentation":
            from .demo_segmentation import report_heldout

            for line in report_heldout(job, models, data.heldout_dir):
                _say(line)
        _say(
            f"per-round metrics: {results / job_id / 'metrics.jsonl'}; audit trails: "
            f"{root / 'kits' / '*' / 'workspace' / 'audit.jsonl'}"
        )
        return shown
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as e:
        _say(f"FAILED: {e}")
        for name in [study.server, *study.clients]:
            _say(f"--- last lines of {name}'s log ---\n{study.log_tail(name, 1500)}")
        raise
    finally:
        study.stop_all()
        _say(f"stopped server and sites; took {time.monotonic() - started:.1f} s")
