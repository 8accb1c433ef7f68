"""Per-block checkpoints of block-wise distillation: `<dir>/last.safetensors` (+ `last.json`, a readable mirror).

The safetensors file holds the student's full state dict and, in its metadata, how many blocks were finished, the
block names and the run's fingerprint; it is written atomically, so it is the single source of truth even when a
run dies between the two writes. A checkpoint written by another configuration is refused, never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dq.errors import CheckpointError
from dq.utils.io import atomic_write, atomic_write_text

__all__ = [
    "CHECKPOINT_NAME",
    "META_NAME",
    "checkpoint_fingerprint",
    "finished_checkpoint",
    "load_block_checkpoint",
    "save_block_checkpoint",
    "state_equal",
]

CHECKPOINT_NAME = "last.safetensors"
META_NAME = "last.json"


def save_block_checkpoint(
    directory: str | Path,
    model: nn.Module,
    finished_blocks: int,
    blocks: list[str],
    fingerprint: str,
    history: list[dict[str, Any]] | None = None,
    block_seconds: dict[str, float] | None = None,
) -> Path:
    """Atomically write `model`'s state dict after `finished_blocks` blocks; returns the safetensors path.

    `history` (per finished block: its MSEs and whether it was kept) and `block_seconds` (its wall time) travel in the
    metadata, so a resumed run reports every block, not only those it trained itself.
    """
    directory = Path(directory)
    meta = {
        "finished_blocks": finished_blocks,
        "blocks": blocks,
        "fingerprint": fingerprint,
        "history": history or [],
        "block_seconds": block_seconds or {},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = directory / CHECKPOINT_NAME
    resume = f"re-run the same command with hydra.run.dir={directory.parent} to resume"
    try:
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"dq_block_checkpoint": json.dumps(meta)}))
    except Exception as e:  # a full disk or a read-only directory (safetensors raises its own error type for both)
        raise CheckpointError(
            f"could not write the block checkpoint {path} after {finished_blocks} blocks ({type(e).__name__}: {e}); "
            f"the one before it is kept whole. Make room (or make the directory writable) and {resume} from it."
        ) from e
    try:
        atomic_write_text(directory / META_NAME, json.dumps(meta, indent=2))
    except OSError as e:
        raise CheckpointError(
            f"wrote the block checkpoint {path} after {finished_blocks} blocks, but not its readable copy "
            f"{directory / META_NAME} ({type(e).__name__}: {e}). Make room (or make the directory writable) and "
            f"{resume} from it."
        ) from e
    return path


def load_block_checkpoint(
    directory: str | Path, model: nn.Module, blocks: list[str], fingerprint: str
) -> dict[str, Any] | None:
    """Load the last block checkpoint into `model` (strictly); returns its metadata, None when there is none.

    Raises:
        CheckpointError: the file is unreadable, or was written for other blocks or another configuration.
    """
    path = Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    meta, state = _read(path, tensors=True)
    if meta.get("blocks") != blocks or meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"block checkpoint {path} was written by a different configuration (blocks or fingerprint differ): "
            "use a new run directory, or delete the checkpoints folder to start over"
        )
    finished = meta.get("finished_blocks")
    if isinstance(finished, bool) or not isinstance(finished, int) or not 0 <= finished <= len(blocks):
        raise CheckpointError(
            f"block checkpoint {path} is damaged: finished_blocks={finished!r} is not a count of its {len(blocks)} "
            "blocks; delete it to start over"
        )
    device = next(model.parameters()).device
    try:
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    except RuntimeError as e:  # keys or shapes that are not the model's
        raise CheckpointError(f"block checkpoint {path} does not fit the student ({e}); delete it to start over") from e
    return meta


def checkpoint_fingerprint(directory: str | Path) -> str | None:
    """The configuration fingerprint of `<directory>/last.safetensors` (its metadata only), None without one.

    Raises:
        CheckpointError: the file is unreadable.
    """
    path = Path(directory) / CHECKPOINT_NAME
    return _read(path, tensors=False)[0].get("fingerprint") if path.is_file() else None


def finished_checkpoint(directory: str | Path, fingerprint: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(metadata, state dict)` of `<directory>/last.safetensors` when it holds every block finished under
    `fingerprint`; `({}, {})` otherwise (none, another configuration, blocks left, or unreadable: the caller trains)."""
    path = Path(directory) / CHECKPOINT_NAME
    try:
        meta = _read(path, tensors=False)[0] if path.is_file() else {}
        blocks = meta.get("blocks")
        if meta.get("fingerprint") != fingerprint or not blocks or meta.get("finished_blocks") != len(blocks):
            return {}, {}
        return _read(path, tensors=True)  # the tensors only once the metadata says the run is finished
    except CheckpointError:
        return {}, {}


def _read(path: Path, tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(metadata, state dict)` of a block checkpoint (the state dict empty unless `tensors`)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["dq_block_checkpoint"])
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118 (not a Mapping)
    except Exception as e:  # safetensors raises several types for damaged files
        raise CheckpointError(
            f"block checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it to train every block again"
        ) from e
    return meta, state


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts hold the same keys and bitwise-equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
