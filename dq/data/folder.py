"""A user's own image folder (PIL only, no torchvision), for FID reference statistics of real models."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dq.errors import MissingFileError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def image_files(path: str | Path, limit: int | None = None) -> list[Path]:
    """The images below `path`, sorted, the first `limit` of them.

    Raises:
        MissingFileError: the folder does not exist or holds no images.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"Image folder '{root}' does not exist (set `model.data.path` to a local folder).")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise MissingFileError(f"Image folder '{root}' holds no images with suffix {sorted(IMAGE_SUFFIXES)}.")
    return files


def folder_digest(path: str | Path, limit: int | None = None) -> str:
    """A digest of the images `load_image_folder` would read: names, sizes and modification times, so that statistics
    cached for a folder are not reused once images are added, removed or replaced (without reading every image)."""
    root = Path(path).expanduser()
    h = hashlib.sha256()
    for f in image_files(root, limit):
        stat = f.stat()
        h.update(f"{f.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_image_folder(path: str | Path, size: int, channels: int = 3, limit: int | None = None) -> torch.Tensor:
    """Load every image below `path` (sorted), resized to `size`x`size`, as [N, C, H, W] in [-1, 1].

    Raises:
        FileNotFoundError: the folder does not exist or holds no images.
    """
    files = image_files(path, limit)
    mode = {1: "L", 3: "RGB"}[channels]
    arrays = []
    for f in files:
        with Image.open(f) as img:
            img = img.convert(mode).resize((size, size), Image.BICUBIC)
            arrays.append(np.asarray(img, dtype=np.uint8).reshape(size, size, channels))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0
