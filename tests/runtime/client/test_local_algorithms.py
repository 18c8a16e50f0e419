"""FedProx and SCAFFOLD run on a site without the learner knowing: the worker corrects the gradients of the
learner's torch module at each optimizer step, counts the steps and their learning rates, keeps SCAFFOLD's
control variate per round, and the site submits its best local model. Checked against hand computations of
SGD on a linear model with a mean-squared-error loss (no gRPC, no daemon)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import _global_optimizer_pre_hooks

from runtime.client.local_algorithms import c_i_path
from runtime.client.worker import SiteState, handle
from runtime.client.worker_replies import parse_reply
from runtime.learner import Learner, LearnerError, SiteContext, TrainResult
from runtime.tasks import CONTROL_PREFIX, TaskKind, with_control
from runtime.torch_weights import load_module_weights, module_weights
from runtime.weights import load_file, save_file

X = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0], [2.0, 0.5, -0.5], [-1.0, 1.0, 2.0]])
Y = np.array([1.0, -0.5, 2.0, 0.25])
W0 = {"lin.weight": np.array([[0.2, -0.1, 0.3]], np.float32), "lin.bias": np.array([0.05], np.float32)}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).squeeze(1)


class LinearLearner(Learner):
    """Full-batch SGD (no momentum) on (X, Y), `steps` steps; an optional StepLR halving lr every step."""

    def __init__(self, work_dir: Path, lr: float = 0.1, steps: int = 1, halve_lr: bool = False,
                 fail_after_steps: bool = False):
        super().__init__(SiteContext(site="s", job_id="j", data_root=None, work_dir=work_dir))
        self.net, self.loss = Net(), nn.MSELoss()  # a loss module holds no parameters: net is torch_module()
        self.lr, self.steps, self.halve_lr, self.fail = lr, steps, halve_lr, fail_after_steps
        self.seen: list[set[str]] = []
        self.hooks_during_train: int | None = None

    def initial_weights(self):
        return {k: v.copy() for k, v in W0.items()}

    def train(self, weights, round):
        self.seen.append(set(weights))
        self.hooks_during_train = len(_global_optimizer_pre_hooks)
        load_module_weights(self.net, weights)
        optimizer = torch.optim.SGD(self.net.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5) if self.halve_lr else None
        x, y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)
        for _ in range(self.steps):
            optimizer.zero_grad()
            self.loss(self.net(x), y).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        if self.fail:
            raise RuntimeError("the learner broke after training")
        return TrainResult({k: v.copy() for k, v in module_weights(self.net).items()}, n_samples=len(Y))

    def validate(self, weights):
        self.seen.append(set(weights))
        load_module_weights(self.net, weights)
        with torch.no_grad():
            loss = self.loss(self.net(torch.tensor(X, dtype=torch.float32)), torch.tensor(Y, dtype=torch.float32))
        return {"loss": float(loss), "n_samples": float(len(Y))}


def _grad(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """d/dw of mean((X w^T + b - Y)^2), in float64."""
    r = X @ w["lin.weight"].astype(np.float64)[0] + w["lin.bias"].astype(np.float64)[0] - Y
    return {"lin.weight": (2 / len(Y) * X.T @ r)[None, :], "lin.bias": np.array([2 / len(Y) * r.sum()])}


def _sgd(w: dict, lr: float, extra) -> dict:
    g = _grad(w)
    return {k: w[k].astype(np.float64) - lr * (g[k] + extra(k, w)) for k in w}


def _train(learner: Learner, tmp_path: Path, weights: dict, round_: int, local: SiteState | None = None,
           **cmd) -> tuple[dict, dict]:
    """Run one train op; (reply as the daemon would parse it, delta written)."""
    save_file(weights, tmp_path / "in.safetensors")
    reply = handle(learner, {"op": TaskKind.TRAIN.value, "weights": str(tmp_path / "in.safetensors"),
                             "round": round_, "out": str(tmp_path / "delta.safetensors"), **cmd}, local)
    parse_reply(json.dumps(reply).encode())  # everything the worker says must pass the daemon's checks
    return reply, load_file(tmp_path / "delta.safetensors")


def test_fedprox_adds_mu_times_distance_to_the_global_model(tmp_path: Path) -> None:
    lr, mu = 0.1, 0.5
    reply, delta = _train(LinearLearner(tmp_path, lr=lr, steps=2), tmp_path, W0, 1,
                          algorithm={"name": "fedprox", "mu": mu})
    w1 = _sgd(W0, lr, lambda k, w: 0.0)  # at the global model the proximal term is zero
    w2 = _sgd(w1, lr, lambda k, w: mu * (w[k] - W0[k].astype(np.float64)))
    plain = _sgd(w1, lr, lambda k, w: 0.0)
    for k in W0:
        np.testing.assert_allclose(delta[k], w2[k] - W0[k], rtol=1e-5, atol=1e-6)
        assert not np.allclose(w2[k], plain[k], rtol=1e-5, atol=1e-6)  # the term made a difference here
    assert reply["local"] == {"steps": 2, "lr_sum": pytest.approx(2 * lr)}


def test_scaffold_step_adds_c_minus_c_i_and_updates_c_i(tmp_path: Path) -> None:
    lr = 0.1
    c = {"lin.weight": np.array([[0.5, -0.25, 1.0]], np.float32), "lin.bias": np.array([-0.5], np.float32)}
    c_i = {"lin.weight": np.array([[0.1, 0.2, -0.3]], np.float32), "lin.bias": np.array([0.25], np.float32)}
    c_i_path(tmp_path, 2).parent.mkdir()
    save_file(c_i, c_i_path(tmp_path, 2))  # this site's c_i after its round 2
    reply, delta = _train(LinearLearner(tmp_path, lr=lr), tmp_path, with_control(W0, c), 3,
                          algorithm={"name": "scaffold"})
    w1 = _sgd(W0, lr, lambda k, w: c[k].astype(np.float64) - c_i[k])
    new_c_i = load_file(c_i_path(tmp_path, 3))
    for k in W0:
        np.testing.assert_allclose(delta[k], w1[k] - W0[k], rtol=1e-5, atol=1e-6)
        hand = c_i[k].astype(np.float64) - c[k] - (w1[k] - W0[k]) / lr
        np.testing.assert_allclose(new_c_i[k], hand, rtol=1e-4, atol=1e-5)
        assert new_c_i[k].dtype == np.float32
    assert set(delta) == set(W0)  # control tensors never go back as part of the update
    assert reply["local"] == {"steps": 1, "lr_sum": pytest.approx(lr)}


def test_steps_and_lr_sum_follow_an_lr_scheduler(tmp_path: Path) -> None:
    reply, _ = _train(LinearLearner(tmp_path, lr=0.2, steps=3, halve_lr=True), tmp_path, W0, 1,
                      algorithm={"name": "fedprox", "mu": 0.01})
    assert reply["local"]["steps"] == 3
    assert reply["local"]["lr_sum"] == pytest.approx(0.2 + 0.1 + 0.05)


def test_scaffold_rerun_of_a_round_starts_from_the_c_i_before_it(tmp_path: Path) -> None:
    c = {"lin.weight": np.array([[0.5, -0.25, 1.0]], np.float32)}  # no c for the bias: zero
    learner, model = LinearLearner(tmp_path, lr=0.05, steps=2), dict(W0)
    deltas, c_i_bytes = {}, {}
    for r in (1, 2, 3):
        _, deltas[r] = _train(learner, tmp_path, with_control(model, c), r, algorithm={"name": "scaffold"})
        c_i_bytes[r] = c_i_path(tmp_path, r).read_bytes()
        model = {k: model[k] + deltas[r][k] for k in model}
        if r == 1:
            model_before_2 = dict(model)
    # the server restarted and re-sends round 2 with the same model
    _, again = _train(learner, tmp_path, with_control(model_before_2, c), 2, algorithm={"name": "scaffold"})
    for k in W0:
        assert again[k].tobytes() == deltas[2][k].tobytes()
    assert c_i_path(tmp_path, 2).read_bytes() == c_i_bytes[2]
    assert not c_i_path(tmp_path, 3).exists()  # a later round's c_i is gone: it came from the abandoned run
    assert c_i_bytes[2] != c_i_bytes[1]


def _unaffected_step() -> None:
    """An optimizer step outside train: plain SGD, whatever ran before."""
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = torch.optim.SGD([p], lr=0.5)
    p.grad = torch.tensor([0.5, -1.0])
    optimizer.step()
    assert p.detach().tolist() == [0.75, 2.5]


@pytest.mark.parametrize("algorithm", [{"name": "fedprox", "mu": 1.0}, {"name": "scaffold"}])
def test_the_hook_is_gone_after_train_also_when_train_raises(tmp_path: Path, algorithm: dict) -> None:
    before = len(_global_optimizer_pre_hooks)
    learner = LinearLearner(tmp_path, steps=2)
    _train(learner, tmp_path, with_control(W0, {"lin.bias": np.array([3.0], np.float32)}), 1, algorithm=algorithm)
    assert learner.hooks_during_train == before + 1
    assert len(_global_optimizer_pre_hooks) == before
    _unaffected_step()

    with pytest.raises(RuntimeError, match="broke after training"):
        _train(LinearLearner(tmp_path, steps=2, fail_after_steps=True), tmp_path, W0, 2, algorithm=algorithm)
    assert len(_global_optimizer_pre_hooks) == before
    _unaffected_step()


def test_without_an_algorithm_no_hook_is_installed(tmp_path: Path) -> None:
    before = len(_global_optimizer_pre_hooks)
    learner = LinearLearner(tmp_path, lr=0.1)
    reply, delta = _train(learner, tmp_path, W0, 1, algorithm=None)
    assert learner.hooks_during_train == before
    assert reply["local"] == {} and "local_validation" not in reply
    w1 = _sgd(W0, 0.1, lambda k, w: 0.0)
    for k in W0:
        np.testing.assert_allclose(delta[k], w1[k] - W0[k], rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "scaffold").exists()


def test_control_tensors_are_stripped_before_the_learner_sees_weights(tmp_path: Path) -> None:
    learner = LinearLearner(tmp_path)
    control = {"lin.weight": np.ones((1, 3), np.float32), "lin.bias": np.ones(1, np.float32)}
    _, delta = _train(learner, tmp_path, with_control(W0, control), 1, algorithm={"name": "scaffold"})
    save_file(with_control(W0, control), tmp_path / "v.safetensors")
    handle(learner, {"op": "validate", "weights": str(tmp_path / "v.safetensors")})
    assert learner.seen == [set(W0)] * 3  # validate before training, train, validate
    assert not any(k.startswith(CONTROL_PREFIX) for k in delta)


def test_scaffold_fails_in_one_line_when_the_learner_takes_no_steps(tmp_path: Path) -> None:
    with pytest.raises(LearnerError, match="^SCAFFOLD: the learner took no optimizer steps") as info:
        _train(LinearLearner(tmp_path, steps=0), tmp_path, W0, 1, algorithm={"name": "scaffold"})
    assert "\n" not in str(info.value)
    assert not c_i_path(tmp_path, 1).exists()


class TwoNets(LinearLearner):
    def __init__(self, work_dir: Path):
        super().__init__(work_dir)
        self.teacher = Net()


def test_torch_module_must_be_defined_when_the_learner_has_several_models(tmp_path: Path) -> None:
    with pytest.raises(LearnerError, match=r"TwoNets has 2 torch.nn.Module attributes \(net, teacher\): define "
                                           r"torch_module\(\)"):
        _train(TwoNets(tmp_path), tmp_path, W0, 1, algorithm={"name": "fedprox", "mu": 0.1})


def test_weights_not_named_like_the_module_are_refused(tmp_path: Path) -> None:
    renamed = {"model." + k: v for k, v in W0.items()}

    class Renaming(LinearLearner):
        def train(self, weights, round):
            return super().train({k.removeprefix("model."): v for k, v in weights.items()}, round)

        def validate(self, weights):
            return {"loss": 0.0}

    with pytest.raises(LearnerError, match="FedProx: none of torch_module\\(\\)'s parameters"):
        _train(Renaming(tmp_path), tmp_path, renamed, 1, algorithm={"name": "fedprox", "mu": 0.1})


class Scored(Learner):
    """Training sets every weight to the round number; validate returns a score per round."""

    def __init__(self, scores: dict[int, float]):
        super().__init__(SiteContext(site="s", job_id="j", data_root=None, work_dir=Path(".")))
        self.scores = scores
        self.w = np.zeros(2, np.float32)

    def train(self, weights, round):
        self.w[:] = round  # the same array every round: the kept best must be a copy
        return TrainResult({"w": self.w}, n_samples=1)

    def validate(self, weights):
        return {"auc": self.scores[int(weights["w"][0])], "n_samples": 1.0}


def _submitted(learner: Learner, tmp_path: Path, local: SiteState) -> float:
    handle(learner, {"op": TaskKind.SUBMIT_MODEL.value, "out": str(tmp_path / "m.safetensors")}, local)
    return float(load_file(tmp_path / "m.safetensors")["w"][0])


@pytest.mark.parametrize(("higher_is_better", "best_round"), [(True, 2), (False, 3)])
def test_submit_model_sends_the_best_local_model_by_the_key_metric(tmp_path: Path, higher_is_better: bool,
                                                                   best_round: int) -> None:
    learner, local = Scored({0: 0.5, 1: 0.6, 2: 0.9, 3: 0.4, 4: 0.7}), SiteState()
    key = {"name": "auc", "higher_is_better": higher_is_better}
    for r in (1, 2, 3, 4):
        reply, _ = _train(learner, tmp_path, {"w": np.zeros(2, np.float32)}, r, local,
                          key_metric=key, keep_best_local=True)
        assert reply["local_validation"]["auc"] == learner.scores[r]
    assert _submitted(learner, tmp_path, local) == best_round


def test_submit_model_sends_the_last_model_without_keep_best_local(tmp_path: Path) -> None:
    learner, local = Scored({0: 0.5, 1: 0.9, 2: 0.1}), SiteState()
    for r in (1, 2):
        _train(learner, tmp_path, {"w": np.zeros(2, np.float32)}, r, local, key_metric={"name": "auc"})
    assert _submitted(learner, tmp_path, local) == 2


def test_a_key_metric_validate_does_not_return_is_named(tmp_path: Path) -> None:
    with pytest.raises(LearnerError, match="key metric 'accuracy' is not among the metrics validate\\(\\) "
                                           "returned \\(auc, n_samples\\)"):
        _train(Scored({0: 0.5, 1: 0.5}), tmp_path, {"w": np.zeros(2, np.float32)}, 1, keep_best_local=True)
    assert not (tmp_path / "delta.safetensors").exists()  # refused before training, not after


def test_submit_model_before_training_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(LearnerError, match="has not trained in this job"):
        _submitted(Scored({}), tmp_path, SiteState())


class ConstantGradient(LinearLearner):
    """The loss is linear in the weights, so every step's gradient is the same (G); SGD with momentum."""

    G = {"lin.weight": np.array([[1.0, -2.0, 0.5]]), "lin.bias": np.array([3.0])}

    def __init__(self, work_dir: Path, momentum: float, nesterov: bool, dampening: float):
        super().__init__(work_dir, lr=0.1, steps=4, halve_lr=True)
        self.kw = {"momentum": momentum, "nesterov": nesterov, "dampening": dampening}

    def train(self, weights, round):
        load_module_weights(self.net, weights)
        optimizer = torch.optim.SGD(self.net.parameters(), lr=self.lr, **self.kw)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        g = {k: torch.tensor(v, dtype=torch.float32) for k, v in self.G.items()}
        for _ in range(self.steps):
            optimizer.zero_grad()
            ((self.net.lin.weight * g["lin.weight"]).sum() + (self.net.lin.bias * g["lin.bias"]).sum()).backward()
            optimizer.step()
            scheduler.step()
        return TrainResult({k: v.copy() for k, v in module_weights(self.net).items()}, n_samples=1)


@pytest.mark.parametrize(("momentum", "nesterov", "dampening"), [(0.0, False, 0.0), (0.9, False, 0.0),
                                                                 (0.9, True, 0.0), (0.5, False, 0.3)])
def test_lr_sum_makes_scaffold_c_i_the_mean_gradient_also_with_momentum(tmp_path: Path, momentum: float,
                                                                         nesterov: bool, dampening: float) -> None:
    """-delta / L must estimate the gradient: with a constant gradient it is exactly that gradient. The plain
    sum of lrs would overstate it by up to 1 / (1 - momentum) and make SCAFFOLD's correction diverge."""
    learner = ConstantGradient(tmp_path, momentum, nesterov, dampening)
    reply, delta = _train(learner, tmp_path, W0, 1, algorithm={"name": "scaffold"})
    c_i = load_file(c_i_path(tmp_path, 1))  # c = c_i = 0 before: c_i+ = -delta / L
    for k in W0:
        np.testing.assert_allclose(c_i[k], learner.G[k], rtol=1e-4)
    if momentum == 0.0:
        assert reply["local"]["lr_sum"] == pytest.approx(0.1 + 0.05 + 0.025 + 0.0125)
