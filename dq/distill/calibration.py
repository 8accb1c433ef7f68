"""Data-free calibration set for block-wise distillation: `(x_t, t)` pairs from teacher DDIM trajectories.

The set is drawn step-balanced from deterministic (eta = 0) teacher trajectories started from seeded noise, and
cached on disk as one safetensors file whose name is the hash of everything that determines its contents.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dq.models.sampling import make_noise
from dq.paths import cache_dir
from dq.utils.io import write_cache

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CalibrationCacheWarning",
    "CalibrationSet",
    "build_calibration_set",
    "calibration_cache_path",
    "calibration_key_fields",
    "get_calibration_set",
    "load_or_build_calibration",
    "resolve_n_traj",
    "select_balanced",
    "teacher_fingerprint",
]

CACHE_FORMAT_VERSION = 1  # bump when the layout or the drawing scheme of cached sets changes
_SELECTION_SEED_OFFSET = 1_000_003  # the step/trajectory choice uses `seed + offset`, apart from the noise stream


class CalibrationCacheWarning(UserWarning):
    """A cached calibration file was unusable (corrupt, truncated, mismatched or non-finite) and is rebuilt."""


@dataclass
class CalibrationSet:
    """`N` teacher inputs `(x_t, t)` taken at the steps of a DDIM sampler.

    Attributes:
        x_t: [N, C, H, W] float32, the sampler's input at that step (x_T = the initial noise at step 0).
        timesteps: [N] int64, the sampler's timestep value fed to the UNet (`table[step_index]`).
        step_index: [N] int64, position in the sampler's timestep table; 0 = first (noisiest) step.
        trajectory: [N] int64, which seeded trajectory (row of `make_noise(n_traj, shape, seed)`) it came from.
        table: [T] int64, the sampler's timestep table (`scheduler.timesteps`).
        encoder_hidden_states: [N, L, D] conditioning for a `UNet2DConditionModel`, None when unconditional.
    """

    x_t: torch.Tensor  # [N, C, H, W]
    timesteps: torch.Tensor  # [N]
    step_index: torch.Tensor  # [N]
    trajectory: torch.Tensor  # [N]
    table: torch.Tensor  # [T]
    encoder_hidden_states: torch.Tensor | None = None  # [N, L, D]

    def __post_init__(self) -> None:
        problem = _consistency_problem(self)
        if problem is not None:
            raise ValueError(f"Inconsistent CalibrationSet: {problem}.")

    def __len__(self) -> int:
        return self.x_t.shape[0]

    @property
    def num_steps(self) -> int:
        """T, the number of sampler steps."""
        return self.table.shape[0]

    def subset(self, idx: torch.Tensor | list[int] | slice) -> CalibrationSet:
        """The entries at `idx` (an index tensor, list or slice); the timestep table is kept whole."""
        if isinstance(idx, list):
            idx = torch.as_tensor(idx, dtype=torch.long)
        ehs = self.encoder_hidden_states
        return CalibrationSet(
            x_t=self.x_t[idx],
            timesteps=self.timesteps[idx],
            step_index=self.step_index[idx],
            trajectory=self.trajectory[idx],
            table=self.table,
            encoder_hidden_states=None if ehs is None else ehs[idx],
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat dict of contiguous tensors for safetensors."""
        out = {
            "x_t": self.x_t,
            "timesteps": self.timesteps,
            "step_index": self.step_index,
            "trajectory": self.trajectory,
            "table": self.table,
        }
        if self.encoder_hidden_states is not None:
            out["encoder_hidden_states"] = self.encoder_hidden_states
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> CalibrationSet:
        """Inverse of `to_tensors`; raises `ValueError` on missing, extra or inconsistent tensors."""
        required = {"x_t", "timesteps", "step_index", "trajectory", "table"}
        names = set(tensors)
        if not required <= names or names - required - {"encoder_hidden_states"}:
            raise ValueError(f"expected tensors {sorted(required)} (+ encoder_hidden_states), found {sorted(names)}")
        return cls(**{k: tensors[k] for k in required}, encoder_hidden_states=tensors.get("encoder_hidden_states"))


def _consistency_problem(s: CalibrationSet) -> str | None:
    """A description of what is wrong with `s`, or None when shapes, dtypes and values are consistent."""
    if s.x_t.dim() != 4 or s.x_t.dtype != torch.float32:
        return f"x_t must be a float32 [N, C, H, W] tensor, got {s.x_t.dtype} {tuple(s.x_t.shape)}"
    n = s.x_t.shape[0]
    for name in ("timesteps", "step_index", "trajectory"):
        t = getattr(s, name)
        if t.shape != (n,) or t.dtype != torch.int64:
            return f"{name} must be an int64 [{n}] tensor, got {t.dtype} {tuple(t.shape)}"
    if s.table.dim() != 1 or s.table.dtype != torch.int64 or s.table.numel() == 0:
        return f"table must be a non-empty int64 [T] tensor, got {s.table.dtype} {tuple(s.table.shape)}"
    if n and (s.step_index.min() < 0 or s.step_index.max() >= s.table.numel()):
        return f"step_index must lie in [0, {s.table.numel()})"
    if n and (s.trajectory.min() < 0):
        return "trajectory indices must be >= 0"
    if not torch.equal(s.timesteps, s.table[s.step_index]):
        return "timesteps != table[step_index]"
    if not torch.isfinite(s.x_t).all():
        return "x_t holds NaN or Inf values"
    ehs = s.encoder_hidden_states
    if ehs is not None:
        if ehs.dim() != 3 or ehs.shape[0] != n or not ehs.is_floating_point():
            return f"encoder_hidden_states must be a float [{n}, L, D] tensor, got {ehs.dtype} {tuple(ehs.shape)}"
        if not torch.isfinite(ehs).all():
            return "encoder_hidden_states holds NaN or Inf values"
    return None


def select_balanced(n_calib: int, num_steps: int, n_traj: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step-balanced choice of `(trajectory, step)` pairs; returns `(trajectory [n_calib], step [n_calib])`.

    Scheme: write `n_calib = q * T + r`. Every step gets `q` entries and `r` steps, chosen by a seeded random
    permutation of the steps, get one more, so per-step counts differ by at most 1 (and are all equal when
    `n_calib` is a multiple of T). For each step, its entries come from distinct trajectories, chosen by a seeded
    random permutation of the `n_traj >= ceil(n_calib / T)` trajectories. The result is sorted by (step, trajectory).
    """
    if n_calib < 1 or num_steps < 1:
        raise ValueError(f"n_calib and num_inference_steps must be >= 1, got {n_calib} and {num_steps}.")
    q, r = divmod(n_calib, num_steps)
    if q + (r > 0) > n_traj:
        raise ValueError(f"n_traj={n_traj} trajectories cannot give {q + (r > 0)} distinct entries per step.")
    gen = torch.Generator().manual_seed(seed + _SELECTION_SEED_OFFSET)
    counts = torch.full((num_steps,), q, dtype=torch.long)
    counts[torch.randperm(num_steps, generator=gen)[:r]] += 1
    trajs, steps = [], []
    for s in range(num_steps):
        chosen = torch.randperm(n_traj, generator=gen)[: int(counts[s])].sort().values
        trajs.append(chosen)
        steps.append(torch.full_like(chosen, s))
    return torch.cat(trajs), torch.cat(steps)


def resolve_n_traj(n_calib: int, num_steps: int, n_traj: int | None) -> int:
    """The number of trajectories a set is drawn from: `n_traj`, or the fewest that can serve (`ceil(n_calib / T)`)."""
    fewest = math.ceil(n_calib / max(num_steps, 1))
    if n_traj is None:
        return fewest
    if isinstance(n_traj, bool) or not isinstance(n_traj, int) or n_traj < fewest:
        raise ValueError(
            f"calib.n_traj={n_traj!r} is invalid: {n_calib} pairs over {num_steps} steps need at least {fewest} "
            "trajectories (or null for that minimum)."
        )
    return n_traj


def _per_trajectory_conditioning(ehs: torch.Tensor | None, n_traj: int) -> torch.Tensor | None:
    """Broadcast `[L, D]` / `[1, L, D]` conditioning to `[n_traj, L, D]`; `[n_traj, L, D]` passes through."""
    if ehs is None:
        return None
    if ehs.dim() == 2:
        ehs = ehs[None]
    if ehs.dim() != 3 or ehs.shape[0] not in (1, n_traj):
        raise ValueError(
            f"encoder_hidden_states must be [L, D], [1, L, D] or [{n_traj}, L, D] (one per trajectory), "
            f"got {tuple(ehs.shape)}."
        )
    return ehs.expand(n_traj, -1, -1)


@torch.no_grad()
def build_calibration_set(
    unet: torch.nn.Module,
    scheduler: Any,
    n_calib: int,
    num_inference_steps: int,
    shape: tuple[int, int, int],
    seed: int,
    batch_size: int = 64,
    encoder_hidden_states: torch.Tensor | None = None,
    progress: bool = True,
    n_traj: int | None = None,
) -> CalibrationSet:
    """Run teacher DDIM trajectories (eta 0) from seeded noise and keep a step-balanced set of their inputs.

    `n_traj` trajectories (default: the fewest that can serve, `ceil(n_calib / T)`) start from
    `make_noise(n_traj, shape, seed)`; the pairs kept are `select_balanced(n_calib, T, n_traj, seed)`. More
    trajectories give a more diverse set (more distinct images behind the same number of pairs) for more teacher
    sampling: with the fewest, every trajectory gives an input at (nearly) every step. The result is bitwise
    deterministic for given arguments on a given device; another `batch_size` changes only float rounding (so it
    is not part of the cache key).

    Args:
        unet: the teacher; called as `unet(x, t).sample` (plus `encoder_hidden_states=` when given).
        scheduler: a diffusers `DDIMScheduler` (copied; the caller's is not modified).
        n_calib: number of `(x_t, t)` pairs.
        num_inference_steps: T, the sampler's number of steps.
        shape: `(C, H, W)` of one sample.
        seed: seed of the initial noise and of the selection.
        batch_size: trajectories denoised together.
        encoder_hidden_states: conditioning, `[L, D]` / `[1, L, D]` shared or `[n_traj, L, D]` per trajectory.
        progress: show a progress bar.
        n_traj: number of teacher trajectories to draw from; None: `ceil(n_calib / T)`.
    """
    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(
            f"calibration runs DDIM trajectories (eta 0), not {type(scheduler).__name__}: pass "
            f"DDIMScheduler.from_config(scheduler.config)"
        )
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_inference_steps)
    table = sched.timesteps.detach().cpu().to(torch.int64)  # [T]
    n_steps = table.numel()
    n_traj = resolve_n_traj(n_calib, n_steps, n_traj)
    traj_sel, step_sel = select_balanced(n_calib, n_steps, n_traj, seed)
    wanted = torch.zeros(n_traj, n_steps, dtype=torch.bool)  # [n_traj, T] which inputs to keep
    wanted[traj_sel, step_sel] = True
    slot = torch.full((n_traj, n_steps), -1, dtype=torch.long)  # [n_traj, T] row in the output
    slot[traj_sel, step_sel] = torch.arange(n_calib)

    noise = make_noise(n_traj, tuple(shape), seed)  # [n_traj, C, H, W]
    cond = _per_trajectory_conditioning(encoder_hidden_states, n_traj)  # [n_traj, L, D] | None
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    x_out = torch.empty((n_calib, *noise.shape[1:]), dtype=torch.float32)  # [N, C, H, W]
    bar = tqdm(total=n_traj * n_steps, desc="calibration", disable=not progress, unit="img-step")
    for start in range(0, n_traj, batch_size):
        rows = torch.arange(start, min(start + batch_size, n_traj))
        x = noise[rows].to(device)
        kwargs = {} if cond is None else {"encoder_hidden_states": cond[rows].to(device=device, dtype=dtype)}
        for s, t in enumerate(sched.timesteps):
            keep = wanted[rows, s]
            if keep.any():
                x_out[slot[rows[keep], s]] = x[keep.to(device)].float().cpu()
            eps = unet(x.to(dtype), t, **kwargs).sample
            x = sched.step(eps, t, x, eta=0.0).prev_sample
            bar.update(len(rows))
    bar.close()
    return CalibrationSet(
        x_t=x_out,
        timesteps=table[step_sel],
        step_index=step_sel,
        trajectory=traj_sel,
        table=table,
        encoder_hidden_states=None if cond is None else cond[traj_sel].detach().float().cpu().contiguous(),
    )


# ----------------------------------------------------------------------------------------------- fingerprints


def teacher_fingerprint(unet: torch.nn.Module, max_elements_per_tensor: int | None = 1 << 22) -> str:
    """sha256 hex digest of a model's class, config and state dict (parameters and buffers).

    Every tensor contributes its name, dtype, shape and bytes. A tensor with more than `max_elements_per_tensor`
    elements contributes an evenly strided sample of about that many elements instead of all of them (plus its
    sum), which keeps hashing a multi-GB UNet to seconds; None hashes everything. Small teachers are hashed fully.
    """
    h = hashlib.sha256()
    h.update(type(unet).__name__.encode())
    config = getattr(unet, "config", None)
    if config is not None:
        h.update(_canonical_json({k: v for k, v in dict(config).items() if not k.startswith("_")}).encode())
    for name, t in sorted(unet.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if max_elements_per_tensor is not None and flat.numel() > max_elements_per_tensor:
            stride = math.ceil(flat.numel() / max_elements_per_tensor)
            h.update(repr(float(flat.double().sum())).encode())
            flat = flat[::stride]
        h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces; tuples as lists, unknown objects as `str`)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def calibration_key_fields(
    unet: torch.nn.Module,
    scheduler: Any,
    n_calib: int,
    num_inference_steps: int,
    shape: tuple[int, int, int],
    seed: int,
    encoder_hidden_states: torch.Tensor | None = None,
    n_traj: int | None = None,
) -> dict[str, Any]:
    """Everything that determines `build_calibration_set`'s result, as a JSON-able dict (the cache key)."""
    sched_cfg = {
        k: v for k, v in dict(scheduler.config).items() if k not in ("_diffusers_version", "_use_default_values")
    }
    ehs_hash = None
    if encoder_hidden_states is not None:
        ehs = encoder_hidden_states.detach().float().cpu().contiguous()
        ehs_hash = hashlib.sha256(f"{tuple(ehs.shape)}".encode() + ehs.numpy().tobytes()).hexdigest()
    return {
        "teacher": teacher_fingerprint(unet),
        "scheduler": {"class": type(scheduler).__name__, "config": json.loads(_canonical_json(sched_cfg))},
        "n_calib": int(n_calib),
        "num_inference_steps": int(num_inference_steps),
        "shape": [int(s) for s in shape],
        "seed": int(seed),
        "n_traj": resolve_n_traj(int(n_calib), int(num_inference_steps), n_traj),
        "encoder_hidden_states": ehs_hash,
        "selection": "step_balanced",
        # trajectories sampled on another device differ in the last bits: a set is reused on its own device only
        "device": next(unet.parameters()).device.type,
    }


# ------------------------------------------------------------------------------------------------------ cache


def _full_key_fields(key_fields: dict[str, Any]) -> dict[str, Any]:
    return {"dq_calib_format": CACHE_FORMAT_VERSION, **json.loads(_canonical_json(key_fields))}


def calibration_cache_path(cache_root: str | Path | None, key_fields: dict[str, Any]) -> Path:
    """`<cache_root>/calib/<sha256 of the canonical JSON of key_fields + format version>.safetensors`."""
    root = cache_dir() if cache_root is None else Path(cache_root).expanduser()
    key = hashlib.sha256(_canonical_json(_full_key_fields(key_fields)).encode()).hexdigest()
    return root / "calib" / f"{key}.safetensors"


def _load_checked(path: Path, key_fields: dict[str, Any]) -> CalibrationSet:
    """Load and verify a cached set; raises `ValueError` (with the reason) when it must not be used."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except Exception as e:  # safetensors raises SafetensorError/OSError/ValueError… for damaged files
        raise ValueError(f"cannot be parsed ({type(e).__name__}: {e})") from e
    expected = _canonical_json(_full_key_fields(key_fields))
    if metadata.get("key_fields") != expected:
        raise ValueError(f"metadata does not match the requested key fields (found {metadata.get('key_fields')!r})")
    calib = CalibrationSet.from_tensors(tensors)  # raises ValueError on inconsistent shapes/dtypes/NaN
    n = key_fields.get("n_calib")
    if n is not None and len(calib) != n:
        raise ValueError(f"holds {len(calib)} entries, expected n_calib={n}")
    return calib


def load_or_build_calibration(
    cache_root: str | Path | None,
    key_fields: dict[str, Any],
    build_fn: Callable[[], CalibrationSet],
) -> CalibrationSet:
    """Return the cached calibration set for `key_fields`, or build it with `build_fn()` and cache it.

    A file that cannot be parsed, whose metadata differs from `key_fields`, or whose tensors are inconsistent
    or non-finite is never used: a `CalibrationCacheWarning` naming it is emitted and the set is rebuilt and
    rewritten. Writes are atomic (temporary file + rename), so concurrent writers and crashes are safe.

    Args:
        cache_root: cache directory; None means `dq.paths.cache_dir()`.
        key_fields: JSON-able dict of everything that determines the set (see `calibration_key_fields`).
        build_fn: builds the set when the cache cannot serve it.
    """
    path = calibration_cache_path(cache_root, key_fields)
    if path.is_file():
        try:
            return _load_checked(path, key_fields)
        except ValueError as e:
            warnings.warn(
                f"Calibration cache file '{path}' is unusable ({e}); rebuilding it.",
                CalibrationCacheWarning,
                stacklevel=2,
            )
    calib = build_fn()
    problem = _consistency_problem(calib)
    if problem is not None:
        raise ValueError(f"The freshly built calibration set is invalid: {problem}.")
    metadata = {"key_fields": _canonical_json(_full_key_fields(key_fields))}
    tensors = calib.to_tensors()
    write_cache(
        path, lambda tmp: save_file(tensors, tmp, metadata=metadata), "calibration cache", CalibrationCacheWarning
    )
    return calib


def get_calibration_set(
    unet: torch.nn.Module,
    scheduler: Any,
    n_calib: int,
    num_inference_steps: int,
    shape: tuple[int, int, int],
    seed: int,
    batch_size: int = 64,
    encoder_hidden_states: torch.Tensor | None = None,
    cache_root: str | Path | None = None,
    progress: bool = True,
    n_traj: int | None = None,
) -> CalibrationSet:
    """`build_calibration_set` through the disk cache (`load_or_build_calibration` with `calibration_key_fields`)."""
    fields = calibration_key_fields(
        unet, scheduler, n_calib, num_inference_steps, shape, seed, encoder_hidden_states, n_traj=n_traj
    )
    args = (unet, scheduler, n_calib, num_inference_steps, shape, seed, batch_size, encoder_hidden_states, progress)
    return load_or_build_calibration(cache_root, fields, lambda: build_calibration_set(*args, n_traj=n_traj))
