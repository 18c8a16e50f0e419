"""The tabular template's validation metrics pass a site's reply check on any data a site may hold: a site
whose validation split holds one class got AUC NaN, and the site refused the whole task for it."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import torch

from runtime.client.worker_replies import parse_reply
from tests.conftest import JOB_TEMPLATE


def _template_learner():
    spec = importlib.util.spec_from_file_location("tabular_learner", JOB_TEMPLATE / "custom" / "learner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_class_validation_data_leaves_auc_out_and_the_reply_passes() -> None:
    learner = _template_learner()
    torch.manual_seed(0)
    model = learner.build_model(4, 8)
    x = torch.randn(20, 4)
    both = learner.evaluate(model, x, np.array([0.0, 1.0] * 10, dtype=np.float32))
    one = learner.evaluate(model, x, np.zeros(20, dtype=np.float32))
    assert set(both) == {"accuracy", "auc", "loss", "n_samples"} and set(one) == {"accuracy", "loss", "n_samples"}
    assert all(math.isfinite(v) for v in one.values())
    assert parse_reply(json.dumps({"ok": True, "n_samples": 20, "metrics": {}, "validation": one}).encode()).ok
