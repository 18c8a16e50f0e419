"""Each workflow on its own (runtime/workflows/), the checkpoint file and site selection: no gRPC, no
controller where the workflow alone says it."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from runtime.aggregators import Update, build_aggregator
from runtime.errors import UpdateRejected
from runtime.job_spec import load_job_spec
from runtime.model_bytes import SerializedModel
from runtime.server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from runtime.server.site_selection import eligible_sites, enough_sites
from runtime.simulate import simulate
from runtime.tasks import TaskKind
from runtime.weights import save_file
from runtime.workflows import FedAvgWorkflow, JobResults, RoundOutcome, SiteResult, WorkflowContext
from tests.runtime.workflows.numpy_learner import gd_step, learners, mse, site_data

MODEL = {"w": np.array([1.0, 2.0, 3.0], np.float32), "b": np.zeros(1, np.float32)}


def _spec(server: str = "rounds: 2", meta: str = "min_clients: 1"):
    return load_job_spec({"meta.yml": f"name: t\n{meta}", "config_fed_client.yml": "learner: {path: a:B}",
                          "config_fed_server.yml": server + "\nkey_metric: {name: mse, higher_is_better: false}"})


def _fedavg(tmp_path: Path, server: str = "rounds: 2") -> tuple[FedAvgWorkflow, list[dict]]:
    models = tmp_path / "models"
    models.mkdir(parents=True)
    save_file(MODEL, models / "global.safetensors")
    entries: list[dict] = []
    ctx = WorkflowContext(job_id="j", spec=_spec(server), job_dir=tmp_path, models_dir=models,
                          append_metrics=entries.append, audit=lambda *a, **k: None,
                          read_job_file=lambda name: b"", results=JobResults())
    return FedAvgWorkflow(ctx), entries


def _train(site: str, n: int, w: list[float], b: float = 0.0) -> SiteResult:
    return SiteResult(site=site, kind=TaskKind.TRAIN, n_samples=n,
                      weights={"w": np.array(w, np.float32), "b": np.array([b], np.float32)})


def test_fedavg_plans_train_rounds_then_a_final_validation(tmp_path: Path) -> None:
    workflow, entries = _fedavg(tmp_path)
    plans = []
    while (plan := workflow.next_round()) is not None:
        plans.append((plan.kind, plan.round))
        if plan.kind is TaskKind.TRAIN:
            workflow.fold(_train("a", 1, [1, 0, 0]))
        workflow.close_round(RoundOutcome(plan=plan, step=len(plans)))
    assert plans == [(TaskKind.TRAIN, 1), (TaskKind.TRAIN, 2), (TaskKind.VALIDATE, 2)]
    np.testing.assert_allclose(workflow.model["w"], [3.0, 2.0, 3.0])  # two rounds of +1 on w[0]
    assert [e["round"] for e in entries if e["type"] == "round"] == [1, 2]


def test_fedavg_weights_by_n_samples_and_by_the_jobs_site_weights(tmp_path: Path) -> None:
    by_samples, _ = _fedavg(tmp_path / "a")
    by_site, _ = _fedavg(tmp_path / "b", "rounds: 1\naggregator: {name: fedavg, weighting: {a: 3.0, b: 1.0}}")
    for workflow in (by_samples, by_site):
        plan = workflow.next_round()
        workflow.fold(_train("a", 1, [4, 0, 0]))
        workflow.fold(_train("b", 3, [0, 4, 0]))
        workflow.close_round(RoundOutcome(plan=plan, step=1))
    # n_samples: w += (1*[4,0,0] + 3*[0,4,0]) / 4 ; site weights 3:1: w += (3*[4,0,0] + 1*[0,4,0]) / 4
    np.testing.assert_allclose(by_samples.model["w"], [2.0, 5.0, 3.0])
    np.testing.assert_allclose(by_site.model["w"], [4.0, 3.0, 3.0])


@pytest.mark.parametrize("aggregator", ["{name: fedavg}", "{name: fedavg, server_momentum: 0.9}",
                                        "{name: fedopt, optimizer: adam, server_lr: 0.1}", "{name: median}"])
def test_rounds_on_the_model_read_from_its_file_step_as_on_the_model_in_memory(tmp_path: Path,
                                                                               aggregator: str) -> None:
    """The workflow reads the global model through a map of its file, and a round's close lets each old
    tensor's pages go once stepped: round after round its model is what the aggregator makes of the same
    model held in memory, bit for bit, a tensor no site sends included (until it is saved, the new model
    shares that tensor with the old file's map); and it is the saved file's, read-only."""
    workflow, _ = _fedavg(tmp_path, f"rounds: 3\naggregator: {aggregator}")
    reference = build_aggregator(_spec(f"rounds: 3\naggregator: {aggregator}").server.aggregator)
    model = {k: v.copy() for k, v in MODEL.items()}
    for rnd in (1, 2, 3):
        plan = workflow.next_round()
        assert plan is not None and plan.round == rnd
        reference.begin_round(model)
        for site, n, w in (("a", 2, [0.5, -1.0, 0.25 * rnd]), ("b", 1, [1.5, 2.0, -0.75])):
            delta = {"w": np.array(w, np.float32)}  # "b" is never sent
            workflow.fold(SiteResult(site=site, kind=TaskKind.TRAIN, n_samples=n, weights=delta))
            reference.fold(Update(site=site, delta=delta, n_samples=n, weight=float(n)))
        workflow.close_round(RoundOutcome(plan=plan, step=rnd))
        model = reference.close_round(model)
        saved = SerializedModel.read(tmp_path / "models" / "global.safetensors").weights()
        for name, expected in model.items():
            np.testing.assert_array_equal(workflow.model[name], expected)
            np.testing.assert_array_equal(saved[name], expected)
            assert not workflow.model[name].flags.writeable
    assert not np.array_equal(model["w"], MODEL["w"]) and np.array_equal(model["b"], MODEL["b"])


@pytest.mark.parametrize(("result", "reason"), [
    (_train("a", 1, [np.nan, 0, 0]), "NaN|finite"),
    (_train("a", 0, [1, 0, 0]), "n_samples must be positive"),
    (_train("a", 10**10, [1, 0, 0]), "max_n_samples"),
    (SiteResult(site="a", kind=TaskKind.TRAIN, n_samples=1, weights={"w": np.zeros(4, np.float32)}), "shape"),
    (SiteResult(site="a", kind=TaskKind.TRAIN, n_samples=1), "no weights"),
])
def test_fedavg_refuses_an_unusable_update_and_folds_nothing(tmp_path: Path, result: SiteResult, reason: str) -> None:
    workflow, _ = _fedavg(tmp_path)
    plan = workflow.next_round()
    with pytest.raises(UpdateRejected, match=reason):
        workflow.fold(result)
    workflow.fold(_train("b", 2, [1, 1, 1]))
    workflow.close_round(RoundOutcome(plan=plan, step=1))
    np.testing.assert_allclose(workflow.model["w"], [2.0, 3.0, 4.0])  # only b's update counted


def test_a_site_missing_from_the_jobs_weights_is_refused(tmp_path: Path) -> None:
    workflow, _ = _fedavg(tmp_path, "rounds: 1\naggregator: {name: fedavg, weighting: {a: 1.0}}")
    workflow.next_round()
    with pytest.raises(UpdateRejected, match="no weight for site"):
        workflow.fold(_train("z", 1, [1, 0, 0]))


def test_cross_site_scores_each_sites_best_local_model_on_every_site(tmp_path: Path) -> None:
    sizes = {"site-a": 20, "site-b": 40}
    spec = _spec("workflows: [fedavg, cross_site]\nrounds: 2", "min_clients: 2")
    result = asyncio.run(simulate(spec, learners(tmp_path / "sites", sizes), tmp_path / "server"))
    report = result.cross_site
    assert report["kind"] == "cross_site"
    assert report["models"] == ["global", "best", "site:site-a", "site:site-b"]
    data = {site: site_data(i, n, shift=float(i)) for i, (site, n) in enumerate(sizes.items())}
    # by hand: round 1 starts from zeros; each site's local model after round r is one GD step from the
    # global model of round r-1; the best by local mse is the one from the last round here
    model = {"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)}
    local = {}
    for _ in range(2):
        local = {site: gd_step(model, x, y, 0.1) for site, (x, y) in data.items()}
        deltas = {site: {k: local[site][k] - model[k] for k in model} for site in data}
        model = {k: model[k] + sum(sizes[s] * deltas[s][k] for s in data) / sum(sizes.values()) for k in model}
    for owner in sizes:
        for site, (x, y) in data.items():
            got = report["matrix"][f"site:{owner}"][site]["mse"]
            assert got == pytest.approx(mse(local[owner], x, y), rel=1e-5), (owner, site)
    for site, (x, y) in data.items():
        assert report["matrix"]["global"][site]["mse"] == pytest.approx(mse(model, x, y), rel=1e-5)
    summary = report["summary"]["site:site-a"]
    assert summary["on_diagonal"] == pytest.approx(report["matrix"]["site:site-a"]["site-a"]["mse"])
    assert summary["off_diagonal"] == pytest.approx(report["matrix"]["site:site-a"]["site-b"]["mse"])


def test_a_checkpoint_round_trips_tensors_state_and_results(tmp_path: Path) -> None:
    saved = Checkpoint(workflow_index=1, step=7, state={"round": 3, "labels": ["a"]},
                       results={"rounds_done": 3, "best_round": 2, "best_metric": 0.5, "sites": ["x"]},
                       tensors={"model": MODEL, "aggregator/m": {"w": np.ones(3, np.float32)}})
    save_checkpoint(tmp_path, saved)
    loaded = load_checkpoint(tmp_path)
    assert (loaded.workflow_index, loaded.step, loaded.state, loaded.results) == (1, 7, saved.state, saved.results)
    np.testing.assert_array_equal(loaded.tensors["model"]["w"], MODEL["w"])
    np.testing.assert_array_equal(loaded.tensors["aggregator/m"]["w"], np.ones(3))
    assert load_checkpoint(tmp_path / "nothing-here") is None


def test_site_selection_keeps_the_wanted_online_sites_in_registry_order() -> None:
    some = _spec(meta="sites: [c, a, dead]\nmin_clients: 2").meta
    every = _spec(meta="min_clients: 3").meta
    assert eligible_sites(some, ["a", "b", "c"]) == ["a", "c"]
    assert eligible_sites(every, ["a", "b", "c"], exclude={"b"}) == ["a", "c"]
    assert enough_sites(some, ["a", "c"]) and not enough_sites(some, ["a", "b"])
    assert not enough_sites(every, ["a", "b"])


def test_the_best_model_is_chosen_on_the_sites_that_scored_both_rounds(tmp_path: Path) -> None:
    """A weak site (b) that fails to validate one round must not make that round the best by its absence:
    rounds are compared on the sites that scored both (the key metric is mse, lower is better)."""
    workflow, entries = _fedavg(tmp_path, "rounds: 4")
    scores = {2: {"a": 1.0, "b": 5.0},  # round 2's sites validate the model of round 1: whole score 3.0
              3: {"a": 1.2},            # b failed: 1.2 alone beats 3.0, yet a's own score got worse
              4: {"a": 0.9, "b": 4.0}}  # better on both sites
    while (plan := workflow.next_round()) is not None and plan.kind is TaskKind.TRAIN:
        results = {}
        for site in ("a", "b"):
            if site in scores.get(plan.round, {"a": 0, "b": 0}):
                validation = {"mse": scores[plan.round][site], "n_samples": 1.0} if plan.round in scores else {}
                results[site] = replace(_train(site, 1, [0.1, 0, 0]), validation=validation)
                workflow.fold(results[site])
        workflow.close_round(RoundOutcome(plan=plan, step=plan.round, results=results))
    validations = {e["model_round"]: e for e in entries if e["type"] == "validation"}
    assert {r: (e["global"]["mse"], e["is_best"]) for r, e in validations.items()} == {
        1: (3.0, True), 2: (1.2, False), 3: (2.45, True)}
    assert validations[2]["compared_on"] == ["a"] and "compared_on" not in validations[3]
    assert (workflow._ctx.results.best_round, workflow._ctx.results.best_metric) == (3, 2.45)


def _results(best: dict[str, dict[str, float]]) -> JobResults:
    from runtime.workflows.base import weighted_metrics

    return JobResults(best_round=1, best_metric=weighted_metrics(best)["acc"], best_by_site=best)


@pytest.mark.parametrize(("best", "new", "expected"), [
    # one site of two (half the weight) cannot make a model the best, to be the yardstick of every later round
    ({"a": {"acc": 0.9}, "w": {"acc": 0.5}}, {"w": {"acc": 0.51}}, (False, ["w"])),
    # the sites that carry most of the best's weight can
    ({"a": {"acc": 0.9, "n_samples": 300}, "w": {"acc": 0.5, "n_samples": 100}}, {"a": {"acc": 0.91}},
     (True, ["a"])),
    ({"a": {"acc": 0.9, "n_samples": 300}, "w": {"acc": 0.5, "n_samples": 100}}, {"a": {"acc": 0.89}},
     (False, ["a"])),
    # a site whose reports withhold the key metric (every round) is no difference between the rounds
    ({"a": {"acc": 0.8}, "w": {"loss": 1.0}}, {"a": {"acc": 0.85}, "w": {"loss": 0.9}}, (True, None)),
    # more sites than the best had: compared on the best's
    ({"a": {"acc": 0.8}}, {"a": {"acc": 0.7}, "z": {"acc": 1.0}}, (False, ["a"])),
    # no per-site figures of the best (a checkpoint from before they were kept): the whole scores
    ({}, {"a": {"acc": 0.7}}, (True, None)),
], ids=["one-of-two", "most-weight-better", "most-weight-worse", "key-withheld", "superset", "old-checkpoint"])
def test_rounds_scored_by_other_sites_are_compared_fairly(best, new, expected) -> None:
    from runtime.workflows.base import weighted_metrics
    from runtime.workflows.fedavg import _improves

    results = _results(best) if best else JobResults(best_round=1, best_metric=0.5)
    assert _improves(new, weighted_metrics(new)["acc"], results, "acc", higher_is_better=True) == expected
