"""Real images that FID compares against, chosen by the model's `data` config."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dq.data.folder import folder_digest, load_image_folder
from dq.data.mnist import load_mnist_split
from dq.errors import ConfigError

DATASETS = ("mnist", "image_folder")


def reference_images(data: DictConfig) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1]: the MNIST train split, or a user's image folder (`model.data.path`)."""
    if data.name == "mnist":
        return load_mnist_split(data.get("seed", 0))["train"][0]
    if data.name == "image_folder":
        if not data.get("path"):
            raise ConfigError("model.data.path must name a local image folder for FID reference statistics.")
        return load_image_folder(data.path, data.size, data.channels, data.get("limit"))
    raise ConfigError(f"model.data.name='{data.name}' is not one of {list(DATASETS)}.")


def reference_name(data: DictConfig) -> str:
    """A cache key part naming the reference data set: for a folder, also how it is read and what it holds now."""
    if data.name == "mnist":
        return f"mnist-train-seed{data.get('seed', 0)}"
    limit = data.get("limit")
    read = f"{data.size}-{data.channels}ch-{limit}"
    return f"folder-{str(data.path).replace('/', '_')}-{read}-{folder_digest(data.path, limit)}"
