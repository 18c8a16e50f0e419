"""A MONAI UNet for binary segmentation (2D by default, 3D with `spatial_dims: 3`), as a fedkit learner.

Each site's data root holds `dataset.json` (see datalist.py) naming its image/label files, NIfTI or NumPy.
Images are scaled to [0, 1] per image, padded or cropped to `spatial_size`, and cached in memory once
(CacheDataset) since the learner lives for the whole job. Labels > 0 are foreground. Training uses Dice
loss on the sigmoid of one output channel; validation reports the mean foreground Dice of thresholded
predictions (`dice`, the job's key metric), the Dice loss and `n_samples` (validation images).

The UNet uses instance normalisation (MONAI's default), so the model has no running statistics: every
weight is a learned parameter, and averaging the sites' models means the same on every site.

On a site whose local/site.yml grants GPUs the model trains on the first one it is given; the template runs
one process per site (no DistributedDataParallel), so leave `nproc` at 1 for it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datalist import DatalistError, read_datalist
from monai.data import CacheDataset, DataLoader
from monai.losses import DiceLoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureTyped,
    LoadImaged,
    RandFlipd,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
)

from runtime.learner import Learner, SiteContext, TrainResult, Weights
from runtime.torch_weights import load_module_weights, module_weights

KEYS = ("image", "label")


def build_model(spatial_dims: int, channels: list[int], num_res_units: int) -> torch.nn.Module:
    return UNet(spatial_dims=spatial_dims, in_channels=1, out_channels=1, channels=tuple(channels),
                strides=(2,) * (len(channels) - 1), num_res_units=num_res_units)


def transforms(spatial_size: list[int], train: bool, seed: int) -> Compose:
    """Load, scale and size every image; training adds random flips (seeded, so a run is repeatable)."""
    steps: list[Any] = [
        LoadImaged(keys=KEYS, ensure_channel_first=True, image_only=True),
        ScaleIntensityd(keys="image"),
        AsDiscreted(keys="label", threshold=0.5),
        ResizeWithPadOrCropd(keys=KEYS, spatial_size=spatial_size),
        EnsureTyped(keys=KEYS, dtype=torch.float32, track_meta=False),
    ]
    if train:
        steps += [RandFlipd(keys=KEYS, prob=0.5, spatial_axis=axis) for axis in range(len(spatial_size))]
    composed = Compose(steps)
    composed.set_random_state(seed=seed)
    return composed


class SegmentationLearner(Learner):
    def __init__(self, context: SiteContext, datalist: str = "dataset.json", spatial_dims: int = 2,
                 spatial_size: list[int] | None = None, channels: list[int] | None = None, num_res_units: int = 1,
                 lr: float = 0.01, epochs: int = 1, batch_size: int = 4, validation_fraction: float = 0.2,
                 seed: int = 0):
        super().__init__(context)
        if context.data_root is None:
            raise DatalistError("this learner needs the site's data_root (a site: data_root in local/site.yml; "
                                "fedkit simulate: --demo-data or --data-roots DIR)")
        spatial_size = list(spatial_size or [64] * spatial_dims)
        channels = list(channels or [8, 16, 32])
        if spatial_dims not in (2, 3) or len(spatial_size) != spatial_dims:
            raise ValueError(f"learner args: spatial_dims {spatial_dims} with spatial_size {spatial_size}: give "
                             "spatial_dims 2 or 3 and that many sizes, e.g. spatial_dims: 3, spatial_size: [64, 64, 64]"
                             )
        factor = 2 ** (len(channels) - 1)
        if any(s % factor for s in spatial_size):
            raise ValueError(f"learner args: spatial_size {spatial_size} must be divisible by {factor} (the UNet "
                             f"halves it {len(channels) - 1} times for channels {channels}); change one of them")
        files = read_datalist(context.data_root, datalist)
        training, validation = files["training"], files["validation"]
        if not validation and len(training) > 1:  # no validation list: hold out the last images, in file order
            n_val = max(1, int(len(training) * validation_fraction))
            training, validation = training[:-n_val], training[-n_val:]
        if not validation:
            raise DatalistError(f"{context.data_root / datalist}: no validation images; add a \"validation\" "
                                "list (or more training images)")
        self.lr, self.epochs, self.batch_size, self.seed = lr, epochs, batch_size, seed
        # CacheDataset keeps the loaded, resized images in memory: they are read from disk once per job.
        self.train_data = CacheDataset(training, transforms(spatial_size, True, seed), cache_rate=1.0,
                                       num_workers=1, progress=False) if training else None
        self.val_data = CacheDataset(validation, transforms(spatial_size, False, seed), cache_rate=1.0,
                                     num_workers=1, progress=False)
        # The site's GPU when local/site.yml grants one (the worker sees only those: CUDA_VISIBLE_DEVICES).
        use_gpu = bool(context.gpus) and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{context.rank % torch.cuda.device_count()}" if use_gpu else "cpu")
        torch.manual_seed(seed)  # on the CPU, before moving: the round-0 model is the same on every machine
        self.model = build_model(spatial_dims, channels, num_res_units).to(self.device)
        self.loss = DiceLoss(sigmoid=True)

    def initial_weights(self) -> Weights:
        return {k: v.copy() for k, v in module_weights(self.model).items()}

    def train(self, weights: Weights, round: int) -> TrainResult:
        if self.train_data is None:
            raise DatalistError(f"{self.context.data_root}: dataset.json lists no training images; add a "
                                "\"training\" list")
        load_module_weights(self.model, weights)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        generator = torch.Generator().manual_seed(self.seed + round)
        loader = DataLoader(self.train_data, batch_size=self.batch_size, shuffle=True, num_workers=0,
                            generator=generator)
        self.model.train()
        total_loss, batches = 0.0, 0
        for _ in range(self.epochs):
            for batch in loader:
                optimizer.zero_grad()
                image, label = batch["image"].to(self.device), batch["label"].to(self.device)
                loss = self.loss(self.model(image), label)
                loss.backward()
                optimizer.step()
                total_loss, batches = total_loss + loss.item(), batches + 1
        self.model.eval()
        trained = {k: v.copy() for k, v in module_weights(self.model).items()}
        return TrainResult(weights=trained, n_samples=len(self.train_data),
                           metrics={"loss": total_loss / max(batches, 1)})

    def validate(self, weights: Weights) -> dict[str, float]:
        load_module_weights(self.model, weights)
        self.model.eval()
        metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=False)
        losses = []
        with torch.no_grad():
            for batch in DataLoader(self.val_data, batch_size=self.batch_size, shuffle=False, num_workers=0):
                image, label = batch["image"].to(self.device), batch["label"].to(self.device)
                logits = self.model(image)
                losses.append(self.loss(logits, label).item() * len(logits))
                metric(y_pred=(torch.sigmoid(logits) > 0.5).float(), y=label)
        dice = float(metric.aggregate().item())
        n_images = len(self.val_data)
        return {"dice": dice, "loss": float(np.sum(losses) / n_images), "n_samples": float(n_images)}
