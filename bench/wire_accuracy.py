"""What quantized transfer (server.wire_dtype) costs the demo job in accuracy, and saves in bytes.

The template job (templates/jobs/tabular_classifier) on the demo data (three sites), run in-process by
runtime.simulate with the real controller, FedAvg and the sites' wire edges, once per wire dtype. Prints
per dtype: bytes of one model on the wire, the largest codec error reported in any round, and the final
global model's validation metrics (weighted over sites) and held-out accuracy/AUC.

    python bench/wire_accuracy.py                    # 5 rounds, every wire dtype
    python bench/wire_accuracy.py --rounds 3 --wire float32 int8
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provision.demo_data import write_demo_data  # noqa: E402
from runtime.job_spec import load_job_spec  # noqa: E402
from runtime.learner import SiteContext  # noqa: E402
from runtime.simulate import simulate  # noqa: E402

JOB = REPO / "templates" / "jobs" / "tabular_classifier"
SITES = ["site-1", "site-2", "site-3"]


def _learner_module():
    spec = importlib.util.spec_from_file_location("tabular_learner", JOB / "custom" / "learner.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tabular_learner"] = module
    spec.loader.exec_module(module)
    return module


def run(wire: str, rounds: int, root: Path) -> dict:
    module = _learner_module()
    data = write_demo_data(root / "data", SITES)
    files = {name: (JOB / name).read_text() for name in ("meta.yml", "config_fed_client.yml", "config_fed_server.yml")}
    spec = load_job_spec(files, [f"server.rounds={rounds}", f"server.wire_dtype={wire}"])
    args = spec.client.learner.args
    learners = {site: module.TabularLearner(SiteContext(site=site, job_id="sim", data_root=data.site_dirs[site],
                                                        work_dir=root / "work" / site), **args) for site in SITES}
    for site in SITES:
        (root / "work" / site).mkdir(parents=True, exist_ok=True)
    result = asyncio.run(simulate(spec, learners, root / "server"))
    wires = [m for m in result.metrics if m["type"] == "wire" and m["task"] == "train"]
    worst_sent = max((m["sent"]["rel_l2_error"] for m in wires if m["sent"]), default=0.0)
    worst_received = max((e["rel_l2_error"] for m in wires for e in m["received"].values()), default=0.0)
    model_bytes = wires[-1]["bytes_sent"] if wires else (root / "server" / "simulated" / "models" /
                                                         "global.safetensors").stat().st_size
    heldout = _heldout(module, result.global_model, data.heldout_csv)
    return {"wire": wire, "rounds": rounds, "model_bytes": model_bytes,
            "rel_l2_error_sent": worst_sent, "rel_l2_error_received": worst_received,
            "final_validation": result.record.final_metrics, "heldout": heldout}


def _heldout(module, weights: dict[str, np.ndarray], csv: Path) -> dict[str, float]:
    import torch

    x, y = module.read_csv(csv)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    model = module.build_model(x.shape[1], weights["0.weight"].shape[0])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    model.eval()
    return module.evaluate(model, torch.from_numpy(x), y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--wire", nargs="+", default=["float32", "float16", "bfloat16", "int8"])
    args = parser.parse_args()
    for wire in args.wire:
        with tempfile.TemporaryDirectory(prefix="fedkit-wire-") as tmp:
            print(json.dumps(run(wire, args.rounds, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
