"""build_aggregator picks the class the job's config names; a job's own aggregator loads from its custom/
folder only through the loader, under a unique module name, and every way it can be broken is one line."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from runtime.aggregators import (
    FedAvgAggregator,
    FedOptAggregator,
    MedianAggregator,
    ScaffoldAggregator,
    TrimmedMeanAggregator,
    Update,
    build_aggregator,
    update_weight,
)
from runtime.aggregators.config import AggregatorConfig, CustomAggregatorConfig
from runtime.aggregators.custom import load_job_aggregator
from runtime.errors import JobRejected

GOOD = '''
import numpy as np
from dataclasses import dataclass


@dataclass
class Scale:
    factor: float


class {name}:
    """Moves the model by factor x the last delta folded."""

    def __init__(self, factor=1.0):
        self.scale = Scale(factor)
        self.last = None
        self.n_folded = 0

    def begin_round(self, model):
        self.last, self.n_folded = None, 0

    def fold(self, update):
        self.last = {{k: v.copy() for k, v in update.delta.items()}}
        self.n_folded += 1

    def close_round(self, model):
        return {{k: (v + self.scale.factor * self.last.get(k, 0)).astype(v.dtype) for k, v in model.items()}}

    def state(self):
        return {{}}

    def load_state(self, state):
        pass

    def task_extras(self):
        return {{}}

    def local_algorithm(self):
        return None
'''


def _parse(raw: dict) -> AggregatorConfig:
    return TypeAdapter(AggregatorConfig).validate_python(raw)


@pytest.mark.parametrize("raw, cls", [
    ({"name": "fedavg"}, FedAvgAggregator),
    ({"name": "fedopt", "optimizer": "yogi", "server_lr": 0.01}, FedOptAggregator),
    ({"name": "scaffold"}, ScaffoldAggregator),
    ({"name": "median"}, MedianAggregator),
    ({"name": "trimmed_mean", "trim_fraction": 0.1}, TrimmedMeanAggregator),
])
def test_the_config_names_the_aggregator(raw: dict, cls: type) -> None:
    assert type(build_aggregator(_parse(raw))) is cls


def test_a_custom_aggregator_needs_the_servers_loader() -> None:
    with pytest.raises(JobRejected, match="runs job code on the server"):
        build_aggregator(_parse({"name": "custom", "path": "my_agg:Mine"}))


def test_weighting_by_samples_uniform_and_map() -> None:
    assert update_weight("n_samples", "a", 17) == 17.0
    assert update_weight("uniform", "a", 17) == 1.0
    assert update_weight({"a": 2.5, "b": 0.0}, "a", 17) == 2.5


@pytest.mark.parametrize(("weights", "why"), [
    ({"a": 0.0, "b": 0.0}, "all 0: at least one site needs a weight > 0"),  # ran every round, never moved
    ({"a": float("inf"), "b": 1.0}, "finite numbers >= 0"),  # passed, then refused a's update every round
    ({"a": float("nan")}, "finite numbers >= 0"),
    ({"a": -1.0}, "finite numbers >= 0"),
])
def test_site_weights_that_could_never_train_are_refused_in_the_config(weights: dict, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        _parse({"name": "fedavg", "weighting": weights})


def _job(tmp_path: Path, name: str, source: str) -> Path:
    code_dir = tmp_path / name / "custom"
    code_dir.mkdir(parents=True)
    (code_dir / "my_agg.py").write_text(source)
    return code_dir


def _one_round(agg) -> dict[str, np.ndarray]:
    model = {"w": np.ones(2, np.float32)}
    agg.begin_round(model)
    agg.fold(Update(site="s", delta={"w": np.full(2, 0.5, np.float32)}, n_samples=1, weight=1.0))
    assert agg.n_folded == 1
    return agg.close_round(model)


def test_a_job_aggregator_loads_and_runs_without_touching_sys_path(tmp_path: Path) -> None:
    path_before = list(sys.path)
    config = CustomAggregatorConfig(path="my_agg:Mine", args={"factor": 2.0})
    agg = build_aggregator(config, lambda c: load_job_aggregator(_job(tmp_path, "job1", GOOD.format(name="Mine")),
                                                                 c))

    new = _one_round(agg)

    np.testing.assert_allclose(new["w"], [2.0, 2.0])
    assert sys.path == path_before
    assert "my_agg" not in sys.modules


def test_two_jobs_with_the_same_module_name_do_not_shadow_each_other(tmp_path: Path) -> None:
    first = load_job_aggregator(_job(tmp_path, "job1", GOOD.format(name="Mine")),
                                CustomAggregatorConfig(path="my_agg:Mine", args={"factor": 1.0}))
    second = load_job_aggregator(_job(tmp_path, "job2", GOOD.format(name="Mine").replace("+ self", "- self")),
                                 CustomAggregatorConfig(path="my_agg:Mine", args={"factor": 1.0}))

    np.testing.assert_allclose(_one_round(first)["w"], [1.5, 1.5])
    np.testing.assert_allclose(_one_round(second)["w"], [0.5, 0.5])


@pytest.mark.parametrize("path, source, why", [
    ("my_agg", GOOD.format(name="Mine"), "must be 'module:Class'"),
    ("../etc:Mine", GOOD.format(name="Mine"), "must be 'module:Class'"),
    ("other:Mine", GOOD.format(name="Mine"), "no file other.py in the job's custom/ folder"),
    ("my_agg:Nope", GOOD.format(name="Mine"), "defines no class Nope"),
    ("my_agg:Mine", "raise RuntimeError('boom\\nsecond line')",
     "importing my_agg.py failed: RuntimeError: boom second"),
    ("my_agg:Mine", "import sys\nsys.exit(3)", "importing my_agg.py failed: SystemExit: 3"),
    ("my_agg:Mine", "class Mine:\n    def fold(self, u): pass\n", "Mine lacks begin_round, close_round, state"),
    ("my_agg:Mine", GOOD.format(name="Mine").replace("factor=1.0", "factor"), None),
])
def test_a_broken_job_aggregator_is_one_line(tmp_path: Path, path: str, source: str, why: str | None) -> None:
    code_dir = _job(tmp_path, "job", source)
    args = {} if why is None else {"factor": 1.0}   # the last case: a required constructor argument missing
    why = why or r"Mine\(\*\*aggregator.args\) failed: TypeError"

    with pytest.raises(JobRejected, match=why) as info:
        load_job_aggregator(code_dir, CustomAggregatorConfig(path=path, args=args))

    assert "\n" not in str(info.value)


def test_a_module_outside_the_jobs_folder_is_refused(tmp_path: Path) -> None:
    code_dir = _job(tmp_path, "job", "")
    (tmp_path / "outside.py").write_text(GOOD.format(name="Mine"))
    (code_dir / "evil.py").symlink_to(tmp_path / "outside.py")

    with pytest.raises(JobRejected, match="no file evil.py"):
        load_job_aggregator(code_dir, CustomAggregatorConfig(path="evil:Mine"))


@pytest.mark.parametrize("returned, why", [
    ("{'x': 1}", "close_round\\(\\) must return a dict with exactly the model's tensor names"),
    ("{'w': np.ones(3, np.float32)}", "close_round\\(\\) returned tensor 'w' not as the model's float32\\[2\\]"),
    ("{'w': np.ones(2, np.float64)}", "close_round\\(\\) returned tensor 'w' not as the model's float32\\[2\\]"),
])
def test_a_job_aggregator_returning_garbage_fails_the_job(tmp_path: Path, returned: str, why: str) -> None:
    good_return = "return {k: (v + self.scale.factor * self.last.get(k, 0)).astype(v.dtype) for k, v in model.items()}"
    source = GOOD.format(name="Mine").replace(good_return, f"return {returned}")
    assert returned in source
    agg = load_job_aggregator(_job(tmp_path, "job", source), CustomAggregatorConfig(path="my_agg:Mine"))

    with pytest.raises(JobRejected, match=why):
        _one_round(agg)


def test_checked_calls_name_the_method(tmp_path: Path) -> None:
    source = (GOOD.format(name="Mine").replace("self.n_folded += 1", "self.n_folded += 1; raise KeyError('w')")
              .replace("return None", "return 'fedprox'"))
    agg = load_job_aggregator(_job(tmp_path, "job", source), CustomAggregatorConfig(path="my_agg:Mine"))
    agg.begin_round({"w": np.ones(1, np.float32)})

    with pytest.raises(JobRejected, match="fold\\(\\) failed: KeyError: 'w'"):
        agg.fold(Update(site="s", delta={"w": np.ones(1, np.float32)}, n_samples=1, weight=1.0))
    with pytest.raises(JobRejected, match="local_algorithm\\(\\) must return None"):
        agg.local_algorithm()


def test_a_nan_model_from_a_job_aggregator_fails_the_job(tmp_path: Path) -> None:
    source = GOOD.format(name="Mine")
    agg = load_job_aggregator(_job(tmp_path, "job", source), CustomAggregatorConfig(path="my_agg:Mine",
                                                                                     args={"factor": float("nan")}))

    with pytest.raises(JobRejected, match="NaN or Inf in tensor 'w'"):
        _one_round(agg)
