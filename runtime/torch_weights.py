"""Convert between a torch module and fedkit Weights without copying tensor data (CPU tensors share
memory with their NumPy views). Only learners import this; the daemon and server never import torch.

torch's `.numpy()` refuses bfloat16 (NumPy has no such dtype): a bfloat16 tensor is reinterpreted as int16
(same bits, no copy) and viewed as ml_dtypes' bfloat16, the dtype `runtime.weights` carries it in; the way
back is the mirror image.
"""

from __future__ import annotations

import numpy as np
import torch

from .weights import BFLOAT16, Weights


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor (a copy only off-device), bfloat16 included."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BFLOAT16)
    return t.numpy()


def numpy_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """A tensor sharing memory with `arr` (made contiguous first), bfloat16 included."""
    arr = np.ascontiguousarray(arr) if arr.ndim else arr
    if arr.dtype == BFLOAT16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def module_weights(module: torch.nn.Module) -> Weights:
    """The module's state dict as NumPy arrays (views of CPU tensors; copies only off-device)."""
    return {name: tensor_to_numpy(t) for name, t in module.state_dict().items()}


def load_module_weights(module: torch.nn.Module, weights: Weights) -> None:
    """Copy `weights` into the module's parameters and buffers in place."""
    state = {name: numpy_to_tensor(arr) for name, arr in weights.items()}
    module.load_state_dict(state, strict=True)
