"""A learner that trains with DistributedDataParallel across the worker's torchrun ranks (gloo on CPU
here), each rank on its own shard of the site's data, and reports what it saw across ranks."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from runtime.learner import Learner, SiteContext, TrainResult, Weights
from runtime.torch_weights import load_module_weights, module_weights


def _read(path):
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    x, y = table[:, :-1], table[:, -1]
    return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6), y


class DdpLearner(Learner):
    def __init__(self, context: SiteContext, lr: float = 0.05):
        super().__init__(context)
        x, y = _read(context.data_root / "train.csv")
        self.n_site = len(y)
        shard = slice(context.rank, None, context.world_size)  # each rank its own rows
        self.x, self.y = torch.from_numpy(x[shard]), torch.from_numpy(y[shard])
        xv, yv = _read(context.data_root / "val.csv")
        self.xv, self.yv = torch.from_numpy(xv), torch.from_numpy(yv)
        torch.manual_seed(0)
        self.model = nn.Linear(x.shape[1], 1)
        self.distributed = context.world_size > 1
        self.trainer = DistributedDataParallel(self.model) if self.distributed else self.model
        self.lr = lr

    def initial_weights(self) -> Weights:
        return {k: v.copy() for k, v in module_weights(self.model).items()}

    def train(self, weights: Weights, round: int) -> TrainResult:
        load_module_weights(self.model, weights)
        optimizer = torch.optim.SGD(self.trainer.parameters(), lr=self.lr)
        for start in range(0, len(self.y), 16):
            optimizer.zero_grad()
            out = self.trainer(self.x[start:start + 16]).squeeze(1)
            nn.functional.binary_cross_entropy_with_logits(out, self.y[start:start + 16]).backward()
            optimizer.step()
        seen = torch.tensor([len(self.y)], dtype=torch.long)
        if self.distributed:
            dist.all_reduce(seen)
        trained = {k: v.copy() for k, v in module_weights(self.model).items()}
        return TrainResult(weights=trained, n_samples=self.n_site,
                           metrics={"world_size": float(self.context.world_size), "samples_all_ranks": float(seen)})

    def validate(self, weights: Weights) -> dict[str, float]:
        load_module_weights(self.model, weights)
        with torch.no_grad():
            predicted = (self.model(self.xv).squeeze(1) > 0).float()
        return {"accuracy": float((predicted == self.yv).float().mean()), "n_samples": float(len(self.yv))}
