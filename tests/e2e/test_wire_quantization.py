"""Quantized transfer in a real study (server.wire_dtype: int8): the server sends the model encoded, each
site's daemon decodes it before its worker sees it, encodes its delta after the privacy chain, and the
server folds the decoded deltas. Checked from the files the sites kept and the job's download."""

from __future__ import annotations

import json

import numpy as np

from runtime.quantize import decode, encode, is_encoded
from runtime.weights import load_file


def test_an_int8_round_folds_the_decoded_deltas_the_sites_sent(make_study, tmp_path):
    handle = make_study(sites=["site-1", "site-2"])
    study = handle.study
    study.start_server()
    study.start_sites()
    job = handle.job(tmp_path / "job")
    record = study.admin_json(f"submit_job {job} --set server.rounds=1 --set server.wire_dtype=int8 "
                              "--set client.keep_updates=true --set meta.min_clients=2")
    final = study.admin_json(f"wait_job {record['job_id']} 240")
    assert final["state"] == "finished", final
    results = tmp_path / "results"
    study.admin_json(f"download_job {record['job_id']} {results}")
    models = results / record["job_id"] / "models"
    initial, global_model = load_file(models / "initial.safetensors"), load_file(models / "global.safetensors")

    sent_to_sites = decode(encode(initial, "int8")[0])
    deltas, weights = [], []
    for site in study.clients:
        (round_dir,) = (study.kits[site] / "workspace" / "jobs" / record["job_id"] / "inbox").glob("*_train")
        received = load_file(round_dir / "global_in.safetensors")
        assert not is_encoded(received), "the worker must see the decoded model"
        for name, value in sent_to_sites.items():
            np.testing.assert_array_equal(received[name], value)
        (wire_file,) = round_dir.glob("*.wire.safetensors")
        wire = load_file(wire_file)
        assert is_encoded(wire)
        deltas.append(decode(wire))
        weights.append(json.loads((round_dir / "update_sent.json").read_text())["n_samples"])
    assert any(not np.array_equal(sent_to_sites[k], initial[k]) for k in initial), "int8 must change the model"
    for name, base in initial.items():
        expected = base.astype(np.float64) + sum(w * d[name].astype(np.float64)
                                                 for w, d in zip(weights, deltas, strict=True)) / sum(weights)
        np.testing.assert_allclose(global_model[name], expected, rtol=1e-5, atol=1e-6)
    (entry,) = [m for m in study.admin_json(f"show_job {record['job_id']}")["metrics"]
                if m["type"] == "wire" and m["task"] == "train"]
    assert entry["wire_dtype"] == "int8" and sorted(entry["received"]) == sorted(study.clients)
    assert entry["sent"]["max_abs_error"] > 0
