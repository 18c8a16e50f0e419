"""A bfloat16 and a float16 model train through two FedAvg rounds over real processes (server, two sites,
admin, mutual TLS on 127.0.0.1): the template learner trains in that dtype, the model travels and is
aggregated in it, and the server's global model is the float64 FedAvg of what the sites sent, rounded once
to the model's dtype."""

from __future__ import annotations

import json

import numpy as np
import torch

from runtime.torch_weights import load_module_weights
from runtime.weights import BFLOAT16, load_file

from .test_fedavg_study import _load_template_learner, _started

SITES = ["site-1", "site-2"]
DTYPES = {"bfloat16": BFLOAT16, "float16": np.dtype(np.float16)}


def _heldout_loss(weights: dict[str, np.ndarray], heldout_csv) -> float:
    learner = _load_template_learner()
    x, y = learner.read_csv(heldout_csv)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    model = learner.build_model(x.shape[1], weights["0.weight"].shape[0])
    model.to(torch.bfloat16 if weights["0.weight"].dtype == BFLOAT16 else torch.float16)
    load_module_weights(model, weights)
    model.eval()
    return learner.evaluate(model.float(), torch.from_numpy(x), y)["loss"]


def test_bfloat16_and_float16_models_train_two_rounds_end_to_end(make_study, tmp_path):
    handle = make_study(sites=SITES)
    study = _started(handle.study)
    job = handle.job(tmp_path / "job")

    for name, dtype in DTYPES.items():
        record = study.admin_json(f"submit_job {job} --set server.rounds=2 --set client.keep_updates=true "
                                  f"--set meta.min_clients=2 --set client.learner.args.dtype={name}")
        final = study.admin_json(f"wait_job {record['job_id']} 240")
        assert final["state"] == "finished", final
        assert final["rounds_done"] == 2

        results = tmp_path / f"results-{name}"
        study.admin_json(f"download_job {record['job_id']} {results}")
        models = results / record["job_id"] / "models"
        global_model = load_file(models / "global.safetensors")
        initial_model = load_file(models / "initial.safetensors")
        assert {k: v.dtype for k, v in global_model.items()} == {k: dtype for k in initial_model}
        assert {k: v.dtype for k, v in initial_model.items()} == {k: dtype for k in initial_model}

        # round 2 recomputed from what each site kept: the global it received and the update it sent
        received, deltas, weights = None, [], []
        for site in SITES:
            inbox = study.kits[site] / "workspace" / "jobs" / record["job_id"] / "inbox"
            round_dir = sorted(inbox.glob("round_*_train"))[-1]  # round 2's training task
            received = load_file(round_dir / "global_in.safetensors")
            deltas.append(load_file(round_dir / "update_sent.safetensors"))
            weights.append(json.loads((round_dir / "update_sent.json").read_text())["n_samples"])
            assert all(d.dtype == dtype for d in deltas[-1].values()), "the site sent its update in the model's dtype"
        for key, base in received.items():
            mean = sum(w * d[key].astype(np.float64) for w, d in zip(weights, deltas, strict=True)) / sum(weights)
            expected = (base.astype(np.float64) + mean).astype(dtype)
            assert global_model[key].tobytes() == expected.tobytes(), f"{name}: tensor {key}"

        assert _heldout_loss(global_model, handle.data.heldout_csv) < _heldout_loss(initial_model,
                                                                                    handle.data.heldout_csv)
