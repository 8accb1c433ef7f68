"""The small MNIST classifier whose features give "classifier FID" and whose logits give "classifier IS"."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dq.errors import CheckpointError, MissingFileError
from dq.utils.io import atomic_write, atomic_write_text

INPUT_SHAPE = (1, 28, 28)  # the images it scores: MNIST's, [C, H, W]


class MNISTClassifier(nn.Module):
    """Four 3x3 convs and an MLP head; `features` is the penultimate [N, feat_dim] layer, `forward` the logits.

    Inputs are images in [-1, 1] of shape [N, *INPUT_SHAPE] = [N, 1, 28, 28].
    """

    def __init__(self, width: int = 32, feat_dim: int = 128, n_classes: int = 10) -> None:
        super().__init__()
        self.config = {"width": width, "feat_dim": feat_dim, "n_classes": n_classes}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * w * 49, feat_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feat_dim, n_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(features(x), forward(x))` from one pass through the body."""
        f = self.body(x)
        return f, self.head(f)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        atomic_write(d / "model.safetensors", lambda tmp: save_file(state, tmp))
        atomic_write_text(d / "config.json", json.dumps(self.config, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> MNISTClassifier:
        d = Path(directory).expanduser()
        if not (d / "model.safetensors").is_file():
            raise MissingFileError(
                f"No classifier at '{d}' (model.safetensors missing): set `eval.classifier_path` or run "
                "`dq-pretrain pretrain=classifier`."
            )
        try:
            model = cls(**json.loads((d / "config.json").read_text()))
            model.load_state_dict(load_file(str(d / "model.safetensors")))
        except Exception as e:
            raise CheckpointError(f"Classifier checkpoint in '{d}' is corrupt ({type(e).__name__}: {e}).") from e
        return model.eval().requires_grad_(False)


def random_shift(x: torch.Tensor, max_shift: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by a random sub-pixel offset of up to `max_shift` pixels (augmentation)."""
    n, _, h, _ = x.shape
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift * 2 / h
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # pad with background (-1)


class ClassifierPretraining(pl.LightningModule):
    """Trains `MNISTClassifier` with cross-entropy and shift augmentation; logs holdout accuracy."""

    def __init__(self, width: int = 32, feat_dim: int = 128, lr: float = 1e-3, max_shift: float = 2.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = MNISTClassifier(width, feat_dim)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(random_shift(x, self.hparams.max_shift)), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        self.log("val/acc", (self.model(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr)

    def export(self, directory: Path) -> dict[str, float]:
        """Save the classifier to `directory`; return metrics for its model card."""
        from dq.data.mnist import load_mnist_split

        self.model.eval().cpu()
        x, y = load_mnist_split(0)["holdout"]
        with torch.no_grad():
            acc = (self.model(x).argmax(1) == y).float().mean().item()
        self.model.save(directory)
        return {"holdout_accuracy": acc}
