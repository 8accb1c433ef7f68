"""Sample grids as PNG without torchvision."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dq.utils.io import atomic_write


def grid_array(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile [N, C, H, W] images in [-1, 1] into one uint8 array [H', W', C] (C = 1 or 3)."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    out = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = x[i]
    return out


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 8) -> np.ndarray:
    """Two grids next to each other with a white gap (teacher | student)."""
    h = max(left.shape[0], right.shape[0])
    spacer = np.full((h, gap, left.shape[2]), 255, dtype=np.uint8)
    pad = lambda a: np.pad(a, ((0, h - a.shape[0]), (0, 0), (0, 0)), constant_values=255)
    return np.concatenate([pad(left), spacer, pad(right)], axis=1)


def save_png(array: np.ndarray, path: str | Path, scale: int = 2) -> None:
    img = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"))
