"""A task's settings: the server builds a TaskConfig, the daemon decodes it from the wire (refusing what a
server could not have meant), and hands the worker the train fields, which the worker reads without
pydantic. The round trip keeps every setting; bad values are refused at the daemon, by name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from runtime.task_config import TaskConfig
from runtime.tasks import FedProx, KeyMetricRef, Scaffold, read_train_fields, train_fields


@pytest.mark.parametrize("algorithm", [None, FedProx(mu=0.01), Scaffold()])
def test_train_fields_reach_the_worker_unchanged_through_the_wire(algorithm):
    sent = TaskConfig(algorithm=algorithm, key_metric=KeyMetricRef(name="auc", higher_is_better=False),
                      keep_best_local=True)
    decoded = TaskConfig.model_validate_json(sent.model_dump_json())  # what the daemon gets
    assert decoded == sent
    command = train_fields(decoded.algorithm, decoded.key_metric, decoded.keep_best_local)
    assert command["keep_best_local"] is True
    assert read_train_fields(command) == (algorithm, KeyMetricRef(name="auc", higher_is_better=False))


def test_the_default_key_metric_is_accuracy_higher_is_better():
    assert read_train_fields({}) == (None, KeyMetricRef(name="accuracy", higher_is_better=True))


@pytest.mark.parametrize(("wire", "where"), [
    ({"algorithm": {"name": "fedprox", "mu": 0}}, "algorithm.fedprox"),
    ({"algorithm": {"name": "fedprox", "mu": -1.0}}, "algorithm.fedprox"),
    ({"algorithm": {"name": "fedprox", "mu": float("nan")}}, "algorithm.fedprox"),
    ({"algorithm": {"name": "fedprox", "mu": "a lot"}}, "algorithm.fedprox.mu"),
    ({"algorithm": {"name": "fedprox"}}, "algorithm.fedprox.mu"),
    ({"algorithm": {"name": "fedprox", "mu": 0.1, "extra": 1}}, "algorithm.fedprox.extra"),
    ({"algorithm": {"name": "scaffold", "mu": 0.1}}, "algorithm.scaffold.mu"),
    ({"algorithm": {"name": "fedsomething"}}, "algorithm"),
    ({"key_metric": {"nme": "auc"}}, "key_metric.nme"),
    ({"key_metric": {"name": ["auc"]}}, "key_metric.name"),
])
def test_the_daemon_refuses_a_task_whose_settings_are_malformed(wire, where):
    with pytest.raises(ValidationError) as caught:
        TaskConfig.model_validate(wire)
    assert where in str(caught.value)


def test_the_worker_refuses_an_unknown_local_algorithm_in_one_line():
    with pytest.raises(ValueError, match="unknown local algorithm 'fedsomething'"):
        read_train_fields({"algorithm": {"name": "fedsomething"}})


def test_a_local_algorithm_built_in_python_is_checked_and_sent_as_json() -> None:
    """A custom aggregator builds FedProx itself, maybe from a NumPy scalar: it must still go on the wire."""
    import json

    import numpy as np

    config = TaskConfig(algorithm=FedProx(mu=np.float32(0.5)))
    assert json.loads(config.model_dump_json())["algorithm"] == {"name": "fedprox", "mu": 0.5}
    json.dumps(train_fields(config.algorithm, config.key_metric, False))
    for bad in ("0.1", True, None):
        with pytest.raises(TypeError, match="mu must be a number"):
            FedProx(mu=bad)
    with pytest.raises(TypeError, match="a key metric is a name and a true/false"):
        KeyMetricRef(name="auc", higher_is_better="no")
