"""Convert between a torch module and fedkit Weights without copying tensor data (CPU tensors share
memory with their NumPy views). Only learners import this; the daemon and server never import torch."""

from __future__ import annotations

import numpy as np
import torch

from .weights import Weights


def module_weights(module: torch.nn.Module) -> Weights:
    """The module's state dict as NumPy arrays (views of CPU tensors; copies only off-device)."""
    return {name: t.detach().cpu().numpy() for name, t in module.state_dict().items()}


def load_module_weights(module: torch.nn.Module, weights: Weights) -> None:
    """Copy `weights` into the module's parameters and buffers in place."""
    state = {name: torch.from_numpy(np.ascontiguousarray(arr)) for name, arr in weights.items()}
    module.load_state_dict(state, strict=True)
