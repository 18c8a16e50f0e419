"""FedProx and SCAFFOLD on the site, so a researcher's learner gets them without writing a line.

Both change only the gradient the learner's optimizer sees, so fedkit can apply them from outside: while
`train` runs, a global torch.optim step pre-hook adds to the gradient of every parameter of the learner's
`torch_module()` (mapped to weight names by `named_parameters()`, the names `runtime.torch_weights` uses)

    FedProx   mu * (p - w_global[name])      the gradient of mu/2 * ||w - w_global||^2
    SCAFFOLD  c[name] - c_i[name]            the server's minus this site's control variate

and counts the steps K and the sum L of their learning rates (of the first param group holding a mapped
parameter), which SCAFFOLD needs: after round R, c_i+ = c_i - c - delta / L (option II of Karimireddy et
al., with L = K * lr for a constant lr). For torch.optim.SGD with momentum each step's lr is weighted by
the momentum buffer a constant unit gradient would have built, so that -delta / L still estimates the
mean gradient (the plain sum overstates it up to 1 / (1 - momentum), and SCAFFOLD then diverges: on the
demo data with the template's momentum 0.9 it did); for plain SGD that weight is 1. The server computes
the same change of c_i from the delta and L it receives, so no control variate leaves the site. The hook
is removed when train returns or raises; an optimizer that holds none of the module's parameters is left
alone.

Only the parameters the federation shares (named in the global model received) are corrected: a tensor
a site's privacy policy keeps local has no global counterpart.

SCAFFOLD's c_i lives in work_dir/scaffold/c_i_round_{R:06d}.safetensors, written atomically after round R.
Training round R starts from the newest file of a round before R and first removes those of R and later:
a server that restarts re-sends round R, and the re-run must start from the same c_i as the first run.

torch is imported only when an algorithm runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..learner import Learner, LearnerError
from ..tasks import FedProx, LocalAlgorithm, Scaffold
from ..weights import Weights, is_float_dtype, load_file, save_file

if TYPE_CHECKING:
    import torch

SCAFFOLD_DIR = "scaffold"
_C_I_FILE = re.compile(r"^c_i_round_(\d{6,})\.safetensors$")


def c_i_path(work_dir: Path, round_: int) -> Path:
    return work_dir / SCAFFOLD_DIR / f"c_i_round_{round_:06d}.safetensors"


class ScaffoldState:
    """This site's control variate c_i, one file per round trained (see the module docstring)."""

    def __init__(self, work_dir: Path, is_main: bool = True):
        self.folder, self.is_main = work_dir / SCAFFOLD_DIR, is_main

    def _rounds(self) -> dict[int, Path]:
        if not self.folder.is_dir():
            return {}
        return {int(m.group(1)): p for p in self.folder.iterdir() if (m := _C_I_FILE.match(p.name))}

    def before(self, round_: int) -> Weights:
        """c_i as it was before round `round_` trained (zeros, as {}, before the first round)."""
        rounds = self._rounds()
        if self.is_main:  # other ranks only read, and never a file of round >= round_
            for r, path in rounds.items():
                if r >= round_:
                    path.unlink(missing_ok=True)
        earlier = [r for r in rounds if r < round_]
        return load_file(rounds[max(earlier)]) if earlier else {}

    def save(self, round_: int, c_i: Weights) -> None:
        if self.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file(c_i, c_i_path(self.folder.parent, round_))


def scaffold_next_c_i(c_i: Weights, c: Weights, delta: Weights, lr_sum: float, shared: set[str]) -> Weights:
    """c_i+ = c_i - c - delta / L, float32, for the shared float tensors of `delta` (a missing c or c_i is 0)."""
    lr = np.float32(lr_sum)
    out: Weights = {}
    for name, d in delta.items():
        if name not in shared or not is_float_dtype(d.dtype):
            continue
        d32 = np.asarray(d, dtype=np.float32)
        before = np.asarray(c_i[name], dtype=np.float32) if name in c_i else np.zeros_like(d32)
        server = np.asarray(c[name], dtype=np.float32) if name in c else np.zeros_like(d32)
        out[name] = ((before - server) - d32 / lr).astype(np.float32, copy=False)
    return out


def _label(algorithm: LocalAlgorithm) -> str:
    return "FedProx" if isinstance(algorithm, FedProx) else "SCAFFOLD"


def _unwrapped(module: Any) -> Any:
    """The module inside (Distributed)DataParallel, whose parameter names match the weights' names."""
    from torch import nn

    while isinstance(module, nn.DataParallel | nn.parallel.DistributedDataParallel):
        module = module.module
    return module


def _named_parameters(learner: Learner, algorithm: LocalAlgorithm) -> dict[int, tuple[str, torch.Tensor]]:
    from torch import nn

    module = _unwrapped(learner.torch_module())
    if not isinstance(module, nn.Module):
        raise LearnerError(f"{type(learner).__name__}.torch_module() returned a {type(module).__name__}, not a "
                           f"torch.nn.Module; {_label(algorithm)} needs the module train() updates")
    return {id(p): (name, p) for name, p in module.named_parameters()}


@dataclass
class _Optimizer:
    """What the hook knows of one optimizer: its mapped parameters and the param group whose lr counts."""

    ref: Any
    params: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    lr_group: int = -1
    unit_buffer: float = 0.0  # SGD's momentum buffer, had every gradient been 1 (see _lr_of_step)


class GradientCorrection:
    """The step pre-hook of one `train` call. Use as a context manager around learner.train."""

    def __init__(self, algorithm: LocalAlgorithm, learner: Learner, shared: Weights, control: Weights,
                 c_i: Weights):
        self.algorithm, self.learner, self.shared = algorithm, learner, shared
        self.steps, self.lr_sum, self.foreign_steps = 0, 0.0, 0
        self._optimizers: dict[int, _Optimizer] = {}
        self._tensors: dict[tuple[str, Any, Any], torch.Tensor] = {}  # per (name, device, dtype)
        self._handle: Any = None
        if isinstance(algorithm, Scaffold):  # constant during the round: c - c_i per shared float tensor
            zeros = {name: np.zeros(w.shape, np.float32) for name, w in shared.items() if is_float_dtype(w.dtype)}
            self._correction = {name: np.asarray(control.get(name, zero), np.float32)
                                - np.asarray(c_i.get(name, zero), np.float32) for name, zero in zeros.items()}
        self._params = self._mapped()

    def _mapped(self) -> dict[int, tuple[str, torch.Tensor]]:
        """torch_module()'s parameters that are in the shared model, checked against it."""
        params = _named_parameters(self.learner, self.algorithm)
        mapped = {key: (name, p) for key, (name, p) in params.items() if name in self.shared}
        if params and not mapped:
            raise LearnerError(
                f"{_label(self.algorithm)}: none of torch_module()'s parameters ({_few(n for n, _ in params.values())})"
                f" is named in the model's weights ({_few(self.shared)}); torch_module() must return the module "
                "whose state_dict() names the learner's weights")
        for name, p in mapped.values():
            if tuple(p.shape) != tuple(self.shared[name].shape):
                raise LearnerError(f"{_label(self.algorithm)}: parameter '{name}' of torch_module() has shape "
                                   f"{tuple(p.shape)} but the model's weight has {tuple(self.shared[name].shape)}")
        return mapped

    def __enter__(self) -> GradientCorrection:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._handle = register_optimizer_step_pre_hook(self._before_step)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        self._optimizers.clear()  # no references to the learner's tensors outlive train
        self._tensors.clear()

    def _known(self, optimizer: Any) -> _Optimizer:
        known = self._optimizers.get(id(optimizer))
        if known is None or known.ref is not optimizer:
            known = self._look_up(optimizer)
            if not known.params:  # the learner may have built a new model inside train: map it afresh
                self._params = self._mapped()
                known = self._look_up(optimizer)
            self._optimizers[id(optimizer)] = known
        return known

    def _look_up(self, optimizer: Any) -> _Optimizer:
        known = _Optimizer(ref=optimizer)
        for i, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) in self._params and self._params[id(p)][1] is p:
                    known.params.append((self._params[id(p)][0], p))
                    known.lr_group = i if known.lr_group < 0 else known.lr_group
        return known

    def _tensor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The global weight (FedProx) or the correction (SCAFFOLD) for `name`, on the parameter's device."""
        from ..torch_weights import numpy_to_tensor  # bfloat16 included

        key = (name, like.device, like.dtype)
        if key not in self._tensors:
            source = self.shared[name] if isinstance(self.algorithm, FedProx) else self._correction[name]
            self._tensors[key] = numpy_to_tensor(np.array(source)).to(device=like.device, dtype=like.dtype)
        return self._tensors[key]

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        import torch

        known = self._known(optimizer)
        if not known.params:
            self.foreign_steps += 1
            return None
        with_grad = [(name, p) for name, p in known.params if p.grad is not None]
        if isinstance(self.algorithm, Scaffold):
            with_grad = [(name, p) for name, p in with_grad if name in self._correction]
        if with_grad:  # one fused call per kind, not one per tensor: big models have hundreds of them
            grads = [p.grad for _, p in with_grad]
            with torch.no_grad():
                if isinstance(self.algorithm, FedProx):
                    distance = torch._foreach_sub([p.detach() for _, p in with_grad],
                                                  [self._tensor(name, p) for name, p in with_grad])
                    torch._foreach_add_(grads, distance, alpha=self.algorithm.mu)
                else:
                    torch._foreach_add_(grads, [self._tensor(name, p) for name, p in with_grad])
        self.steps += 1
        self.lr_sum += self._lr_of_step(optimizer, known)
        return None

    @staticmethod
    def _lr_of_step(optimizer: Any, known: _Optimizer) -> float:
        """How far this step moves a parameter per unit of a constant gradient: its lr for plain SGD (and
        any other optimizer); for SGD with momentum, lr times the momentum buffer a constant unit gradient
        would have built (1, 1 + b, 1 + b + b^2, ... -> 1 / (1 - b)), so that -delta / L estimates the mean
        gradient as SCAFFOLD's c_i needs, where the plain sum of lrs would overstate it up to 1 / (1 - b)."""
        import torch

        group = optimizer.param_groups[known.lr_group]
        lr = float(group["lr"])
        momentum = float(group.get("momentum", 0.0)) if isinstance(optimizer, torch.optim.SGD) else 0.0
        if momentum == 0.0:
            return lr
        dampening = float(group.get("dampening", 0.0))
        known.unit_buffer = 1.0 if known.unit_buffer == 0.0 else momentum * known.unit_buffer + 1.0 - dampening
        return lr * (1.0 + momentum * known.unit_buffer if group.get("nesterov") else known.unit_buffer)

    def report(self) -> dict[str, float]:
        """The reply's `local`: {"steps": K, "lr_sum": L}; fails the round if the correction never applied."""
        label = _label(self.algorithm)
        if self.steps == 0:
            also = (f" ({self.foreign_steps} steps of optimizers holding none of its parameters)"
                    if self.foreign_steps else "")
            raise LearnerError(f"{label}: the learner took no optimizer steps on torch_module()'s parameters{also}; "
                               f"train() must update them with a torch.optim optimizer for {label} to apply")
        if isinstance(self.algorithm, Scaffold) and not self.lr_sum > 0:
            raise LearnerError(f"SCAFFOLD: the learning rates of the learner's {self.steps} optimizer steps sum to "
                               f"{self.lr_sum:g}; they must be positive")
        return {"steps": self.steps, "lr_sum": self.lr_sum}


def _few(names: Any, n: int = 3) -> str:
    names = list(names)
    return ", ".join(f"'{x}'" for x in names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


class LocalRun:
    """One `train` call under a site-side algorithm: `with run.hooked(): learner.train(...)`, then
    `run.finish(delta)` checks the steps, saves SCAFFOLD's new c_i and gives the reply's `local`."""

    def __init__(self, algorithm: LocalAlgorithm, learner: Learner, shared: Weights, control: Weights,
                 round_: int, is_main: bool = True):
        self.algorithm, self.shared, self.control, self.round = algorithm, shared, control, round_
        self.state = ScaffoldState(learner.context.work_dir, is_main) if isinstance(algorithm, Scaffold) else None
        self.c_i = self.state.before(round_) if self.state is not None else {}
        self.correction = GradientCorrection(algorithm, learner, shared, control, self.c_i)

    def hooked(self) -> GradientCorrection:
        return self.correction

    def finish(self, delta: Weights) -> dict[str, float]:
        local = self.correction.report()
        if self.state is not None:
            self.state.save(self.round, scaffold_next_c_i(self.c_i, self.control, delta, local["lr_sum"],
                                                          set(self.shared)))
        return local
