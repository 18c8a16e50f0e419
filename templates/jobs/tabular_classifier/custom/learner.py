"""A PyTorch binary classifier of tabular data, as a fedkit learner.

Each site's data root holds `train.csv` and `val.csv`: numeric feature columns and a final `label`
column of 0/1. Features are standardized with the site's own training statistics (data never leaves).
`dtype` (float32, bfloat16, float16, float64) is the dtype the model trains and travels in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from runtime.learner import Learner, SiteContext, TrainResult, Weights
from runtime.torch_weights import load_module_weights, module_weights


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    return table[:, :-1], table[:, -1]


def build_model(n_features: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def evaluate(model: nn.Module, x: torch.Tensor, y: np.ndarray) -> dict[str, float]:
    with torch.no_grad():
        logits = model(x).squeeze(1).float()  # metrics in float32 whatever the model's dtype
        loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(y)).item()
        scores = torch.sigmoid(logits).numpy()
    accuracy = float(((scores >= 0.5) == (y >= 0.5)).mean())
    metrics = {"accuracy": accuracy, "loss": loss, "n_samples": float(len(y))}
    if len(np.unique(y)) == 2:  # AUC is undefined on one class: left out (a site refuses NaN in a metric)
        metrics["auc"] = float(roc_auc_score(y, scores))
    return metrics


class TabularLearner(Learner):
    def __init__(self, context: SiteContext, lr: float = 0.05, epochs: int = 1, batch_size: int = 32,
                 hidden: int = 16, seed: int = 0, dtype: str = "float32"):
        super().__init__(context)
        if context.data_root is None:
            raise ValueError("this learner needs the site's data_root (a site: data_root in local/site.yml; "
                             "fedkit simulate: --demo-data or --data-roots DIR)")
        if dtype not in DTYPES:
            raise ValueError(f"learner arg dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[dtype]
        x_train, self.y_train = read_csv(context.data_root / "train.csv")
        x_val, self.y_val = read_csv(context.data_root / "val.csv")
        self.mean, self.std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
        self.x_train = torch.from_numpy((x_train - self.mean) / self.std).to(self.dtype)
        self.x_val = torch.from_numpy((x_val - self.mean) / self.std).to(self.dtype)
        self.lr, self.epochs, self.batch_size, self.seed = lr, epochs, batch_size, seed
        torch.manual_seed(seed)
        self.model = build_model(x_train.shape[1], hidden).to(self.dtype)

    def initial_weights(self) -> Weights:
        return {k: v.copy() for k, v in module_weights(self.model).items()}

    def train(self, weights: Weights, round: int) -> TrainResult:
        load_module_weights(self.model, weights)
        optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9)
        y = torch.from_numpy(self.y_train).to(self.dtype)
        generator = torch.Generator().manual_seed(self.seed + round)
        self.model.train()
        total_loss, batches = 0.0, 0
        for _ in range(self.epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), self.batch_size):
                idx = order[start:start + self.batch_size]
                optimizer.zero_grad()
                loss = nn.functional.binary_cross_entropy_with_logits(self.model(self.x_train[idx]).squeeze(1), y[idx])
                loss.backward()
                optimizer.step()
                total_loss, batches = total_loss + loss.item(), batches + 1
                self.context.log_scalar("batch_loss", loss.item())  # one step per batch, across rounds
        self.model.eval()
        trained = {k: v.copy() for k, v in module_weights(self.model).items()}
        return TrainResult(weights=trained, n_samples=len(y), metrics={"loss": total_loss / max(batches, 1)})

    def validate(self, weights: Weights) -> dict[str, float]:
        load_module_weights(self.model, weights)
        self.model.eval()
        return evaluate(self.model, self.x_val, self.y_val)
