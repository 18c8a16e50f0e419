"""context.log_scalar and the checks on the logged scalars at every hop: where they are logged (the
learner), in the worker's reply (the daemon) and in the result's metrics (the server)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from runtime.client.worker import handle
from runtime.client.worker_replies import WorkerReplyRefused, parse_reply
from runtime.errors import UpdateRejected
from runtime.learner import Learner, SiteContext, TrainResult
from runtime.scalar_log import MAX_SCALAR_NAMES_PER_TASK, MAX_SCALARS_PER_TASK, ScalarLog, ScalarLogError
from runtime.server.metrics_check import decode_metrics, scalars
from runtime.weights import save_file


def _context(tmp_path: Path) -> SiteContext:
    return SiteContext(site="site-1", job_id="job", data_root=None, work_dir=tmp_path)


def test_points_keep_their_steps_and_a_left_out_step_counts_on_per_name(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    ctx.log_scalar("loss", 0.5)
    ctx.log_scalar("loss", np.float32(0.25))  # NumPy numbers are numbers
    ctx.log_scalar("lr", 0.1, step=7)
    ctx.log_scalar("loss", 2)
    assert ctx.scalars.take() == [("loss", 0, 0.5), ("loss", 1, 0.25), ("lr", 7, 0.1), ("loss", 2, 2.0)]
    ctx.log_scalar("loss", 1.0)  # the next task goes on counting where the last one stopped
    assert ctx.scalars.take() == [("loss", 3, 1.0)]
    assert ctx.scalars.take() == []


def test_a_bad_name_or_value_is_refused_where_it_is_logged(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    with pytest.raises(ScalarLogError, match="names must match") as e:
        ctx.log_scalar("patient 1234 secret", 1.0)
    assert "1234" not in str(e.value), "the refusal must not repeat the name (it may be what leaks)"
    for value in ("1.5", True, None, [1.0, 2.0]):
        with pytest.raises(ScalarLogError, match="value must be a number"):
            ctx.log_scalar("loss", value)
    for step in (-1, 1.5, True, 1 << 60):
        with pytest.raises(ScalarLogError, match="step must be an integer"):
            ctx.log_scalar("loss", 1.0, step=step)
    assert ctx.scalars.take() == []


def test_nan_and_points_past_the_bounds_are_dropped_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    log = ScalarLog()
    log.log("loss", float("nan"))
    log.log("loss", float("inf"))
    for i in range(MAX_SCALARS_PER_TASK + 5):
        log.log("loss", float(i))
    with caplog.at_level(logging.WARNING, logger="runtime.scalar_log"):
        points = log.take()
    assert len(points) == MAX_SCALARS_PER_TASK
    assert points[0] == ("loss", 2, 0.0), "a dropped point still takes its step"
    assert len(caplog.records) == 1
    assert "2 point(s) not finite" in caplog.text and "5 point(s) past 1000 points" in caplog.text

    for i in range(MAX_SCALAR_NAMES_PER_TASK + 3):
        log.log(f"name{i}", 1.0)
    assert len({name for name, _, _ in log.take()}) == MAX_SCALAR_NAMES_PER_TASK


class _LoggingLearner(Learner):
    def __init__(self, context: SiteContext, fail: bool = False):
        super().__init__(context)
        self.fail = fail

    def train(self, weights, round: int) -> TrainResult:
        for i in range(3):
            self.context.log_scalar("batch_loss", 1.0 / (i + 1))
        self.context.log_scalar("lr", 0.01, step=round)
        if self.fail:
            raise RuntimeError("diverged")
        return TrainResult({k: v + 1 for k, v in weights.items()}, n_samples=4)

    def validate(self, weights) -> dict[str, float]:
        return {"mse": 1.0, "n_samples": 4.0}


def test_the_worker_reply_carries_what_the_learner_logged_during_the_task(tmp_path: Path) -> None:
    save_file({"w": np.zeros(2, np.float32)}, tmp_path / "in.safetensors")
    learner = _LoggingLearner(_context(tmp_path))
    cmd = {"op": "train", "weights": str(tmp_path / "in.safetensors"), "round": 2, "out": str(tmp_path / "out")}
    reply = handle(learner, cmd)
    assert reply["scalars"] == [["batch_loss", 0, 1.0], ["batch_loss", 1, 0.5], ["batch_loss", 2, 1 / 3],
                                ["lr", 2, 0.01]]
    checked = parse_reply(json.dumps(reply).encode())  # what the daemon makes of it
    assert checked.scalars == [("batch_loss", 0, 1.0), ("batch_loss", 1, 0.5), ("batch_loss", 2, 1 / 3),
                               ("lr", 2, 0.01)]
    assert "scalars" not in handle(learner, {"op": "validate", "weights": cmd["weights"]}), "nothing new logged"

    failing = _LoggingLearner(_context(tmp_path), fail=True)
    with pytest.raises(RuntimeError):
        handle(failing, cmd)
    assert failing.context.scalars.take() == [], "a failed task's points are not sent with the next reply"


@pytest.mark.parametrize(("scalars_value", "reason"), [
    ("loss", "must be a list"),
    ([["loss", 1]], "is not a \\[name, step, value\\] triple"),
    ([["secret patient 42", 1, 1.0]], "its name is not allowed"),
    ([["loss", -1, 1.0]], "step must be an integer"),
    ([["loss", True, 1.0]], "step must be an integer"),
    ([["loss", 1.5, 1.0]], "step must be an integer"),
    ([["loss", 1, "NaN"]], "value must be a finite number"),
    ([["loss", 1, None]], "value must be a finite number"),
    ([["loss", i, 1.0] for i in range(MAX_SCALARS_PER_TASK + 1)], "more than the 1000 allowed"),
    ([[f"n{i}", 0, 1.0] for i in range(MAX_SCALAR_NAMES_PER_TASK + 1)], "names, more than the 64 allowed"),
])
def test_malformed_scalars_are_refused_by_the_daemon_and_the_server(scalars_value, reason) -> None:
    line = json.dumps({"ok": True, "n_samples": 1, "scalars": scalars_value})
    with pytest.raises(WorkerReplyRefused, match=reason) as e:
        parse_reply(line.encode())
    assert "secret" not in str(e.value) and "patient" not in str(e.value)
    with pytest.raises(UpdateRejected, match=reason) as e:
        decode_metrics(json.dumps({"train": {}, "scalars": scalars_value}))
    assert "secret" not in str(e.value)


def test_nan_in_reply_json_is_refused_too() -> None:
    with pytest.raises(WorkerReplyRefused, match="finite"):
        parse_reply(b'{"ok": true, "scalars": [["loss", 1, NaN]]}')


def test_the_server_takes_well_formed_scalars_as_triples() -> None:
    data = decode_metrics(json.dumps({"train": {"loss": 0.5}, "scalars": [["loss", 3, 0.5], ["lr", 0, 1]]}))
    assert scalars(data.get("scalars")) == (("loss", 3, 0.5), ("lr", 0, 1.0))
    assert scalars(None) == ()


_STEPPING_LEARNER = '''
from runtime.learner import Learner

class Stepping(Learner):
    def train(self, weights, round):
        raise NotImplementedError

    def validate(self, weights):
        self.context.log_scalar("val_loss", 0.5)  # no step: the worker counts on per name
        return {"score": 1.0}
'''


async def _two_workers(tmp_path: Path) -> list[list]:
    """One job's worker, stopped and started again (a site restarted mid-job), with the steps the daemon
    kept in between (runtime/client/daemon.py keeps them in the job's scalar_steps.json)."""
    from runtime.client.job_folders import JobFolders
    from runtime.client.sandbox import OffSandbox
    from runtime.client.worker_handle import WorkerHandle
    from runtime.scalar_log import last_steps

    folders = JobFolders(tmp_path / "job")
    folders.create()
    (folders.code / "custom").mkdir(parents=True)
    (folders.code / "custom" / "stepping.py").write_text(_STEPPING_LEARNER)
    weights = folders.inbox / "global.safetensors"
    save_file({}, weights)
    steps: dict[str, int] = {}
    sent = []
    for _ in range(2):
        worker = await WorkerHandle.start(sandbox=OffSandbox(), python="", kit=Path(__file__).parents[2],
                                          folders=folders, site="s", job_id="j", data_root="", gpus=[],
                                          learner="stepping:Stepping", learner_args={},
                                          log_path=tmp_path / "worker.log", scalar_steps=steps)
        try:
            for _ in range(2):
                reply = await worker.call({"op": "validate", "weights": str(weights)}, 120.0)
                sent += reply["scalars"]
                steps = last_steps(steps, reply["scalars"])
        finally:
            await worker.stop()
    return sent


def test_a_restarted_workers_curves_go_on_from_the_last_step(tmp_path: Path) -> None:
    # they started again at 0, drawn over the first worker's points in TensorBoard
    import asyncio

    assert [(name, step) for name, step, _ in asyncio.run(_two_workers(tmp_path))] == [
        ("val_loss", 0), ("val_loss", 1), ("val_loss", 2), ("val_loss", 3)]


def test_a_name_ending_in_a_line_break_is_refused_at_the_site_as_at_the_server() -> None:
    # `^...$` matched "loss\n" at the site; the server's fullmatch refused the whole result, whose metrics
    # the site then never recorded as sent
    with pytest.raises(WorkerReplyRefused):
        parse_reply(json.dumps({"ok": True, "n_samples": 1, "metrics": {"loss\n": 0.5}}).encode())
    with pytest.raises(ScalarLogError):
        ScalarLog().log("loss\n", 0.5)
