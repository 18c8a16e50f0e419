"""runtime.simulate with a ProcessPool: the job's learner loaded from its custom/ folder in worker processes,
several sites per process. A site whose learner fails a task fails only its own round, a learner that prints
cannot corrupt the replies, and the global model is what FedAvg of the sites' steps gives."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from runtime.job_spec import load_job_spec
from runtime.simulate import simulate
from runtime.simulate_pool import ProcessPool, pool_shape

LEARNER = '''
import numpy as np
from runtime.learner import Learner, TrainResult


class Step(Learner):
    """Moves every weight by the site's number (its data folder's name), prints while it trains."""

    def __init__(self, context, fail_site=""):
        super().__init__(context)
        self.shift = float(context.data_root.name)
        self.fail = context.site == fail_site

    def initial_weights(self):
        return {"w": np.zeros(4, dtype=np.float32)}

    def train(self, weights, round):
        print("training", self.context.site, "{\\"ok\\": false}")  # on stdout: must not reach the replies
        if self.fail:
            raise RuntimeError("disk full on this site")
        return TrainResult({"w": weights["w"] + self.shift}, 10, {"shift": self.shift})

    def validate(self, weights):
        return {"size": float(np.abs(weights["w"]).sum()), "n_samples": 10.0}
'''


def test_a_pool_runs_the_job_learner_and_keeps_a_failure_to_its_site(tmp_path: Path) -> None:
    job = tmp_path / "job"
    (job / "custom").mkdir(parents=True)
    (job / "custom" / "step_learner.py").write_text(LEARNER)
    spec = load_job_spec({"meta.yml": "name: pool\nmin_clients: 2",
                          "config_fed_client.yml": "learner: {path: step_learner:Step, args: {fail_site: site-5}}",
                          "config_fed_server.yml": "rounds: 2\nkey_metric: {name: size}"})
    data = {}
    for i in range(5):
        data[f"site-{i + 1}"] = tmp_path / "data" / str(i + 1)
        data[f"site-{i + 1}"].mkdir(parents=True)

    async def run():
        pool = await ProcessPool.start(job, spec.client.learner.path, spec.client.learner.args, data,
                                       tmp_path / "work", processes=2)
        try:
            assert pool.processes == 2
            return await simulate(spec, pool, tmp_path / "server")
        finally:
            await pool.close()

    result = asyncio.run(run())
    rounds = [e for e in result.metrics if e["type"] == "round"]
    assert [e["sites"] for e in rounds] == [[f"site-{i}" for i in range(1, 5)]] * 2
    assert all(e["failed"] == {"site-5": "RuntimeError: disk full on this site"} for e in rounds)
    # FedAvg of equal-sized sites 1..4 moving every weight by 1..4: +2.5 a round
    np.testing.assert_allclose(result.global_model["w"], np.full(4, 5.0, np.float32))
    assert "training site-1" in "".join(p.read_text() for p in (tmp_path / "work").glob("pool-*.log"))


def test_pool_shape_shares_the_cores() -> None:
    assert pool_shape(100, cores=2) == (2, 1)
    assert pool_shape(1, cores=8) == (1, 8)       # one site: one process with every core
    assert pool_shape(3, cores=8) == (3, 2)
    assert pool_shape(100, processes=4, cores=2) == (4, 1)


ODD_METRICS = '''
import numpy as np
from runtime.learner import Learner, TrainResult


class Odd(Learner):
    """site-2 reports a metric a site's daemon refuses (a name with a space: it carries data)."""

    def initial_weights(self):
        return {"w": np.zeros(2, dtype=np.float32)}

    def train(self, weights, round):
        name = "patient 7 age" if self.context.site == "site-2" else "loss"
        return TrainResult({"w": weights["w"] + 1}, 10, {name: 0.5})

    def validate(self, weights):
        return {"score": 1.0}
'''


def test_a_reply_a_site_would_refuse_fails_that_site_in_a_simulation_too(tmp_path: Path) -> None:
    # `fedkit simulate` passed what every real site refuses, so a job that simulated fine failed in the study
    job = tmp_path / "job"
    (job / "custom").mkdir(parents=True)
    (job / "custom" / "odd.py").write_text(ODD_METRICS)
    spec = load_job_spec({"meta.yml": "name: odd\nmin_clients: 1", "config_fed_client.yml": "learner: {path: odd:Odd}",
                          "config_fed_server.yml": "rounds: 1\nkey_metric: {name: score}"})
    data = {s: tmp_path / "data" / s for s in ("site-1", "site-2")}
    for folder in data.values():
        folder.mkdir(parents=True)

    async def run():
        pool = await ProcessPool.start(job, spec.client.learner.path, {}, data, tmp_path / "work", processes=1)
        try:
            return await simulate(spec, pool, tmp_path / "server")
        finally:
            await pool.close()

    (round_1,) = [e for e in asyncio.run(run()).metrics if e["type"] == "round"]
    assert round_1["sites"] == ["site-1"]
    assert "worker reply refused" in round_1["failed"]["site-2"] and "metric" in round_1["failed"]["site-2"]
