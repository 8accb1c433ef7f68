"""Uniform fake quantizers: `UniformQuantizer` for weights and `TemporalQuantizer` (TPQ) for activations.

Both compute `Δ · (clamp(round(x/Δ) + round(z), qmin, qmax) − round(z))` with straight-through rounding and
LSQ gradient scaling of Δ and z (see METHOD.md, "Notation" and "TPQ").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dq.quant.spec import ACT_INITS, QuantizerSpec

__all__ = [
    "NonFiniteActivationError",
    "StepContext",
    "UniformQuantizer",
    "TemporalQuantizer",
    "fake_quant",
    "fake_quant_",
    "round_ste",
    "lsq_grad_scale",
    "affine_params",
    "mse_search",
    "SCALE_MIN",
    "HALF_DTYPES",
    "MSE_RATIOS",
    "OBSERVE_SAMPLES",
    "stratified_subsample",
]

SCALE_MIN = 1e-8  # step sizes are clamped to at least this
# Fake quantization of a half-precision tensor runs in float32 and casts back: x / Δ in float16 (11-bit mantissa) is
# off by up to 0.06 of a step at an 8-bit grid's ends, and in bfloat16 (8 bits) by half a step, which would flip values
# to a neighbouring level beyond what the input's own rounding does. (The larger loss of a student cast to half
# precision came from its latent weights: `QuantLayerMixin._apply`.)
HALF_DTYPES = (torch.float16, torch.bfloat16)
MSE_RATIOS = 100  # clipping ratios k/100, k = 1..100, tried by the MSE search
OBSERVE_SAMPLES = 2**16  # values kept per step for the MSE search of activation quantizers
_MSE_CHUNK_ELEMENTS = 2**22  # the MSE search evaluates this many candidate values at once


def stratified_subsample(parts: list[tuple[Tensor, int]], k: int, generator: torch.Generator) -> Tensor:
    """At most `k` of the values in `parts`, drawn so that they stand for every value counted alike.

    Each part is `(values, count)`: a uniform sample of `count` observed values (all of them when `count` equals
    `values.numel()`). Part j gives about `k * count_j / total` values (largest remainders get the leftovers), drawn
    without replacement by one `randperm` per part, parts in order. Merging a kept sample with a new batch this way
    keeps a sample of everything observed; keeping `k` of their concatenation would let the latest batch dominate.
    """
    if sum(v.numel() for v, _ in parts) <= k:
        return torch.cat([v for v, _ in parts])
    total = sum(c for _, c in parts)
    quota = [k * c / total for _, c in parts]  # <= min(count, k) = the values each part holds
    take = [min(int(q), v.numel()) for q, (v, _) in zip(quota, parts, strict=True)]
    by_remainder = sorted(range(len(parts)), key=lambda j: take[j] - quota[j])  # largest fractional part first
    for j in by_remainder[: k - sum(take)]:
        take[j] = min(take[j] + 1, parts[j][0].numel())
    picked = []
    for (v, _), n in zip(parts, take, strict=True):
        ids = torch.randperm(v.numel(), generator=generator, device=generator.device)[:n]
        picked.append(v[ids] if n < v.numel() else v)
    return torch.cat(picked)


class NonFiniteActivationError(ValueError):
    """An activation quantizer observed NaN or inf while calibrating (`calibrate_activations` names it)."""

    def __init__(self, message: str, quantizer: nn.Module | None = None) -> None:
        super().__init__(message)
        self.quantizer = quantizer  # the quantizer that saw it


class StepContext:
    """Shared per-forward state: the sampling-step index of every sample of the batch.

    The quantized model's forward pre-hook sets `index`; every `TemporalQuantizer` of the model holds a
    reference to the same object (not as a submodule). A distillation may set `drop_prob` (QDrop, Wei et al. 2022):
    while autograd records, each activation element then keeps its full-precision value with that probability, masks
    drawn from `generator`; sampling and every pass without gradients always quantize.
    """

    def __init__(self) -> None:
        self.index: Tensor | None = None  # [B] long, step index i of each sample, or None
        self.drop_prob = 0.0  # QDrop probability of leaving an element unquantized (training passes only)
        self.generator: torch.Generator | None = None  # draws the QDrop masks; None: the global generator

    def __repr__(self) -> str:
        return f"StepContext(index={self.index}, drop_prob={self.drop_prob})"


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest with a straight-through gradient; the forward value is exactly `x.round()`."""
    return x.round().detach() + (x - x.detach())


def _scale_grad(t: Tensor, g: float) -> Tensor:
    """Identity in the forward pass (exactly), gradient multiplied by `g` in the backward pass."""
    tg = t * g
    return t.detach() + (tg - tg.detach())


def lsq_grad_scale(numel_per_param: int, qmax: int) -> float:
    """LSQ gradient scale `1 / sqrt(numel_per_param * qmax)`."""
    return 1.0 / math.sqrt(max(numel_per_param, 1) * max(qmax, 1))


def fake_quant(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, grad_scale: float, clip_first: bool = False
) -> Tensor:
    """Uniform affine fake quantization with STE rounding and LSQ-scaled step-size gradients.

    Args:
        x: Values to quantize.
        scale: Step size Δ, broadcastable to `x`; clamped to at least `SCALE_MIN`.
        zero_point: Zero-point z (rounded with STE), broadcastable to `x`.
        qmin: Lowest integer of the grid.
        qmax: Highest integer of the grid.
        grad_scale: Multiplies the gradients of `scale` and `zero_point`.
        clip_first: Take the gradient of `round(clamp(x/scale + round(z), qmin, qmax))`, as LSQ does: a value beyond
            the grid passes no gradient to `x`, and the grid end's to `scale` and `z`. Otherwise (Q-Diffusion's and
            EfficientDM's order) rounding comes first and a value within half a step beyond either end still counts
            as on the grid. The forward value is the same either way.

    Returns:
        `scale * (clamp(round(x/scale) + round(z), qmin, qmax) - round(z))`, same shape as `x` (computed in
        float32 for a half-precision `x`, returned in the dtype of `x / scale`).
    """
    if x.dtype in HALF_DTYPES:
        out = fake_quant(x.float(), scale.float(), zero_point.float(), qmin, qmax, grad_scale, clip_first)
        return out.to(torch.result_type(x, scale))
    scale = _scale_grad(scale, grad_scale).clamp_min(SCALE_MIN)
    z = round_ste(_scale_grad(zero_point, grad_scale))
    u = x / scale
    q = torch.clamp(round_ste(u) + z, qmin, qmax)
    if clip_first:  # the same values, with the gradient of clamp(u + z) (unrounded) in place of clamp(round(u) + z)
        v = torch.clamp(u + z, qmin, qmax)
        q = v + (q - v).detach()
    return scale * (q - z)


@torch.no_grad()
def fake_quant_(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, inplace: bool = False) -> Tensor:
    """`fake_quant`'s forward value without autograd, as one in-place chain on a single new tensor.

    Bit-identical to `fake_quant(x, scale, zero_point, qmin, qmax, g)` where `x / scale` is finite and `scale`,
    `zero_point` have one shape (an inf input gives NaN there, the clamped grid end here), and several times faster
    on CPU (one temporary instead of ten); `x` itself is left unchanged unless `inplace`, which writes the result
    into `x` (a tensor or a view the caller owns) and allocates nothing, where `x` has the result's dtype. Used where
    nothing needs gradients: sampling and the MSE search of initial ranges. A half-precision `x` is quantized in
    float32 (`HALF_DTYPES`), like `fake_quant`.
    """
    if x.dtype in HALF_DTYPES:
        own = torch.broadcast_shapes(x.shape, scale.shape, zero_point.shape) == x.shape  # x.float() can hold it
        out = fake_quant_(x.float(), scale.float(), zero_point.float(), qmin, qmax, inplace=own)
        dtype = torch.result_type(x, scale)
        return x.copy_(out) if inplace and dtype == x.dtype else out.to(dtype)
    scale = scale.clamp_min(SCALE_MIN)
    zp = zero_point.round()
    inplace = inplace and torch.result_type(x, scale) == x.dtype  # else the result is promoted: a new tensor
    q = x.div_(scale) if inplace else x.div(scale)
    return q.round_().add_(zp).clamp_(qmin, qmax).sub_(zp).mul_(scale)


def affine_params(x_min: Tensor, x_max: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Step size and zero-point covering `[x_min, x_max]` (widened to include 0).

    Args:
        x_min: Range minimum, any shape.
        x_max: Range maximum, same shape.
        qmin: Lowest integer of the grid.
        qmax: Highest integer of the grid.
        symmetric: Symmetric grid (zero-point 0, Δ = max|x| / qmax).

    Returns:
        (scale, zero_point), both shaped like `x_min`.
    """
    x_min = torch.minimum(x_min, torch.zeros_like(x_min))
    x_max = torch.maximum(x_max, torch.zeros_like(x_max))
    if symmetric:
        scale = (torch.maximum(-x_min, x_max) / qmax).clamp_min(SCALE_MIN)
        return scale, torch.zeros_like(scale)
    scale = ((x_max - x_min) / (qmax - qmin)).clamp_min(SCALE_MIN)
    zero_point = (qmin - torch.round(x_min / scale)).clamp(qmin, qmax)
    return scale, zero_point


def mse_search(values: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Per-row (Δ, z) minimising the squared quantization error over clipping ratios k/100 of the min-max range.

    Ratio 1 (plain min-max) is tried first and only beaten by a strictly smaller error, so the result is never
    worse than min-max.

    Args:
        values: [C, N] values; one (Δ, z) per row.
        qmin: Lowest integer of the grid.
        qmax: Highest integer of the grid.
        symmetric: Symmetric grid.

    Returns:
        (scale, zero_point), each [C].
    """
    values = values.float()
    x_min, x_max = values.amin(dim=1), values.amax(dim=1)
    best_scale, best_zp = affine_params(x_min, x_max, qmin, qmax, symmetric)
    best_err = torch.full_like(x_min, float("inf"))
    ratios = torch.arange(MSE_RATIOS, 0, -1, device=values.device) / MSE_RATIOS  # [R] 1.0 first
    chunk = max(1, min(MSE_RATIOS, _MSE_CHUNK_ELEMENTS // max(values.numel(), 1)))
    for start in range(0, MSE_RATIOS, chunk):
        r = ratios[start : start + chunk, None]  # [r, 1]
        scale, zp = affine_params(x_min * r, x_max * r, qmin, qmax, symmetric)  # [r, C]
        q = fake_quant_(values, scale[..., None], zp[..., None], qmin, qmax)  # [r, C, N]
        err = q.sub_(values).square_().sum(dim=2)  # [r, C]
        j = err.argmin(dim=0, keepdim=True)  # [1, C] first minimum: the largest ratio among ties
        err, scale, zp = err.gather(0, j)[0], scale.gather(0, j)[0], zp.gather(0, j)[0]
        better = err < best_err  # earlier chunks (larger ratios) win ties
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


class _QuantizerBase(nn.Module):
    """Shared state handling: parameters or buffers for (Δ, z), flags; `initialized` and `enabled` kept in the state
    dict, so a quantizer switched off stays off through save / load and checkpoints."""

    scale: Tensor
    zero_point: Tensor

    def __init__(self, spec: QuantizerSpec, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.spec = spec
        self.qmin, self.qmax = spec.qmin, spec.qmax
        self.enabled = True  # False: identity (also saved in the state dict)
        self.initialized = False  # True once (Δ, z) hold real values (also saved in the state dict)
        self._set_params(torch.ones(shape), torch.zeros(shape))

    @property
    def bits(self) -> int:
        """Bit-width."""
        return self.spec.bits

    def _set_params(self, scale: Tensor, zero_point: Tensor) -> None:
        """(Re)register Δ and z: parameters when learnable (z only when asymmetric), buffers otherwise."""
        for name in ("scale", "zero_point"):
            if name in self._parameters:
                del self._parameters[name]
            if name in self._buffers:
                del self._buffers[name]
        learn = self.spec.learnable
        if learn:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        if learn and not self.spec.symmetric:
            self.zero_point = nn.Parameter(zero_point)
        else:
            self.register_buffer("zero_point", zero_point)

    @torch.no_grad()
    def _assign(self, scale: Tensor, zero_point: Tensor) -> None:
        self.scale.copy_(scale.to(self.scale))
        self.zero_point.copy_(zero_point.to(self.zero_point))
        self.initialized = True

    def get_extra_state(self) -> Tensor:
        return torch.tensor([int(self.initialized), int(self.enabled)], dtype=torch.uint8)  # [initialized, enabled]

    def set_extra_state(self, state: Tensor) -> None:
        self.initialized = bool(state[0])
        self.enabled = bool(state[1]) if state.numel() > 1 else True  # states saved before `enabled` was kept

    def extra_repr(self) -> str:
        return (
            f"bits={self.spec.bits}, symmetric={self.spec.symmetric}, shape={tuple(self.scale.shape)}, "
            f"enabled={self.enabled}, initialized={self.initialized}"
        )


class UniformQuantizer(_QuantizerBase):
    """Weight quantizer: one (Δ, z) per output channel (dim 0) or per tensor, shared by all timesteps.

    Args:
        spec: Bits, symmetry, granularity, init method, learnability.
        num_channels: Number of output channels (size of dim 0 of the weight) for per-channel granularity.
    """

    def __init__(self, spec: QuantizerSpec, num_channels: int = 1) -> None:
        n = num_channels if spec.granularity == "channel" else 1
        super().__init__(spec, (n,))  # scale, zero_point: [C_out] or [1]
        self.rounding: nn.Module | None = None  # learned rounding while a block trains (`dq.quant.adaround.AdaRound`)

    def _view(self, p: Tensor, x: Tensor) -> Tensor:
        # [C] -> [C, 1, ...] to broadcast over the weight's trailing dims
        return p.reshape(-1, *([1] * (x.ndim - 1)))

    def grad_scale(self, x: Tensor) -> float:
        """LSQ gradient scale for weight `x`: elements per step size = one row, or the whole tensor."""
        n = x[0].numel() if self.spec.granularity == "channel" else x.numel()
        return lsq_grad_scale(n, self.qmax)

    @torch.no_grad()
    def init_from(self, x: Tensor) -> None:
        """Initialise (Δ, z) from weight `x` by min-max, MSE search or LSQ's rule (per the spec)."""
        rows = x.detach().float().reshape(x.shape[0], -1) if self.spec.granularity == "channel" else x.reshape(1, -1)
        if rows.shape[0] != self.scale.numel():
            raise ValueError(
                f"weight has {rows.shape[0]} output channels but the quantizer was built for {self.scale.numel()}"
            )
        rows = rows.detach().float()
        if self.spec.init == "mse":
            scale, zp = mse_search(rows, self.qmin, self.qmax, self.spec.symmetric)
        elif self.spec.init == "lsq":  # Esser et al. 2020, per row; the spec allows it on symmetric grids only (z = 0)
            scale = (2 * rows.abs().mean(1) / math.sqrt(self.qmax)).clamp_min(SCALE_MIN)
            zp = torch.zeros_like(scale)
        else:
            scale, zp = affine_params(rows.amin(1), rows.amax(1), self.qmin, self.qmax, self.spec.symmetric)
        self._assign(scale, zp)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if not self.initialized:
            raise RuntimeError("weight quantizer is not initialised: call init_from(weight) first")
        if self.rounding is not None:  # AdaRound: the grid fixed, only the rounding trains
            return self.rounding(x, *self.grid(x), self.qmin, self.qmax)
        scale, zp = self._view(self.scale, x), self._view(self.zero_point, x)
        return fake_quant(x, scale, zp, self.qmin, self.qmax, self.grad_scale(x), self.spec.clip_first)

    def grid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`(Δ, round(z))` of weight `x`'s grid as `forward` uses them (Δ clamped to `SCALE_MIN`), detached, in
        float32, shaped to broadcast over `x`: grid point `c` is `Δ (c - round(z))` for `c` in `[qmin, qmax]`."""
        scale = self._view(self.scale, x).detach().float().clamp_min(SCALE_MIN)
        return scale, self._view(self.zero_point, x).detach().float().round()

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """The integer grid code `clamp(round(x/Δ) + round(z), qmin, qmax)` of each element of weight `x` (as floats,
        in float32); `forward(x)` is `Δ · (codes(x) - round(z))`."""
        scale, zp = self.grid(x)
        return torch.clamp(torch.round(x.float() / scale) + zp, self.qmin, self.qmax)


class TemporalQuantizer(_QuantizerBase):
    """Per-tensor activation quantizer with one (Δ, z) per sampling step (TPQ); `num_steps=1` shares one pair.

    Each sample of a batch uses the pair of its own step, read from `step_context.index` ([B] long).
    Calibration: `start_observation()`, run the model (inputs pass through unchanged while statistics are
    recorded per step), then `finish_observation()`.

    Args:
        spec: Bits, symmetry, init method ("minmax" or "mse"), learnability; granularity must be "tensor".
        step_context: Shared object whose `index` gives every sample's step index.
        num_steps: T, the number of (Δ, z) pairs.
    """

    def __init__(self, spec: QuantizerSpec, step_context: StepContext | None = None, num_steps: int = 1) -> None:
        if spec.granularity != "tensor":
            raise ValueError(f"granularity={spec.granularity!r} is invalid for TemporalQuantizer: allowed 'tensor'")
        if spec.init not in ACT_INITS:
            raise ValueError(f"init={spec.init!r} is invalid for TemporalQuantizer: allowed {', '.join(ACT_INITS)}")
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} is invalid: must be >= 1")
        super().__init__(spec, (num_steps,))  # scale, zero_point: [T] one step size per sampling step
        self.step_context = step_context if step_context is not None else StepContext()
        self.observing = False  # True: record statistics, return inputs unchanged
        self._reset_stats()

    @property
    def num_steps(self) -> int:
        """T, the number of per-step (Δ, z) pairs."""
        return self.scale.numel()

    def grad_scale(self, x: Tensor) -> float:
        """LSQ gradient scale: elements per step size = features of one sample (as LSQ's N_F)."""
        return lsq_grad_scale(x[0].numel() if x.ndim > 0 else 1, self.qmax)

    def expand_steps(self, num_steps: int) -> None:
        """Turn a shared quantizer (num_steps 1) into a per-step one by repeating its (Δ, z).

        Replaces the parameters: build optimizers after expanding.
        """
        if num_steps == self.num_steps:
            return
        if self.num_steps != 1:
            raise ValueError(f"only a shared quantizer (num_steps=1) can be expanded; this one has {self.num_steps}")
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps} is invalid: must be >= 1")
        if self.observing:
            raise RuntimeError("cannot expand_steps while observing")
        with torch.no_grad():
            scale = self.scale.detach().repeat(num_steps)
            zp = self.zero_point.detach().repeat(num_steps)
        self._set_params(scale, zp)
        self._reset_stats()

    # ---- step indices -------------------------------------------------------------------------------------
    def _step_index(self, x: Tensor) -> Tensor | None:
        """[B] step index of each sample, or None for a shared quantizer."""
        if self.num_steps == 1:
            return None
        index = self.step_context.index
        if index is None:
            raise RuntimeError(
                f"TemporalQuantizer has {self.num_steps} steps but no step index is set: run the quantized model "
                "with a timestep table (quantize_model(..., timesteps=...)) or set step_context(model).index"
            )
        if index.ndim != 1 or index.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"step index has shape {tuple(index.shape)} but the input batch has {x.shape[0]} samples"
            )
        return index

    # ---- calibration --------------------------------------------------------------------------------------
    def _reset_stats(self) -> None:
        t = self.num_steps
        self._obs_min = torch.full((t,), float("inf"))  # [T] running min per step
        self._obs_max = torch.full((t,), float("-inf"))  # [T] running max per step
        self._obs_samples: list[Tensor | None] = [None] * t  # per step: random subsample of values (mse init)
        self._obs_counts = [0] * t  # per step: how many values the subsample stands for
        self._obs_gen: torch.Generator | None = None  # seeded on first use, for reproducible subsamples

    def start_observation(self) -> None:
        """Reset statistics and switch to observing mode."""
        self._reset_stats()
        self.observing = True

    def _generator(self, device: torch.device) -> torch.Generator:
        """The subsampling generator, seeded on first use, on `device` (a CPU run draws what it always drew)."""
        if self._obs_gen is None or self._obs_gen.device != device:
            self._obs_gen = torch.Generator(device=device).manual_seed(0)
        return self._obs_gen

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        # Per-step statistics reach the host in one transfer per call, not a synchronisation per step: on a GPU this
        # runs for every quantizer and calibration batch (25 steps x ~90 quantizers x batches per calibration).
        index = self._step_index(x)
        if x.numel() == 0:
            return
        if index is None:  # shared: one row, values in the order they always had
            rows, index = x.detach().float().reshape(1, -1), torch.zeros(1, dtype=torch.long, device=x.device)
        else:
            rows, index = x.detach().float().reshape(x.shape[0], -1), index.to(x.device, torch.long)  # [B, N], [B]
        t = self.num_steps
        lo = torch.full((t,), float("inf"), dtype=rows.dtype, device=rows.device)
        hi = torch.full((t,), float("-inf"), dtype=rows.dtype, device=rows.device)
        safe = index.clamp(0, t - 1)  # an index out of range is reported below, not as a device-side assert
        lo.scatter_reduce_(0, safe, rows.amin(1), "amin")  # [T] min per step; steps not in the batch stay inf
        hi.scatter_reduce_(0, safe, rows.amax(1), "amax")
        # the step indices come along (exact in float: T is far below 2^24), for the range check and the sampling
        lo, hi, steps = torch.cat([lo, hi, index.to(rows.dtype)]).cpu().split([t, t, index.numel()])
        steps = steps.long()  # [B] on the host
        if steps.min() < 0 or steps.max() >= t:
            span = [int(steps.min()), int(steps.max())]
            raise IndexError(f"step indices span {span}, out of range for a quantizer with {t} steps")
        # a step not in the batch keeps (inf, -inf); NaN, a -inf minimum or an inf maximum mean non-finite values
        bad = lo.isnan() | hi.isnan() | (lo == float("-inf")) | (hi == float("inf"))
        if bad.any():
            raise NonFiniteActivationError(
                f"its input holds NaN or inf at step(s) {bad.nonzero().flatten().tolist()} of the calibration batch: "
                "the model's activations are not finite there (check the model checkpoint and the calibration set)",
                self,
            )
        self._obs_min = torch.minimum(self._obs_min, lo)
        self._obs_max = torch.maximum(self._obs_max, hi)
        if self.spec.init == "mse":
            # The kept values stay on the model's device and are subsampled there: moving every batch's activations
            # to the host and permuting them there would make a GPU wait on the host for each calibration batch.
            for i in torch.unique(steps).tolist():
                ids = (steps == i).nonzero().flatten().to(rows.device)
                flat = rows.index_select(0, ids).reshape(-1)  # the step's values, samples in batch order
                prev = self._obs_samples[i]
                parts = [(flat, flat.numel())] if prev is None else [(prev, self._obs_counts[i]), (flat, flat.numel())]
                self._obs_samples[i] = stratified_subsample(parts, OBSERVE_SAMPLES, self._generator(flat.device))
                self._obs_counts[i] += flat.numel()

    @torch.no_grad()
    def finish_observation(self, pooled: bool = False) -> bool:
        """Leave observing mode and initialise every step's (Δ, z) from its statistics.

        Steps never observed use the statistics of all steps together; with `pooled` every step does, so all start
        from one shared range that training then moves per step (EfficientDM's TALSQ starts so).

        Returns:
            True if initialised, False if no input was observed at all (the quantizer stays as it was).
        """
        self.observing = False
        observed = torch.isfinite(self._obs_min)
        if not observed.any():
            self._reset_stats()
            return False
        own = observed & (not pooled)  # [T] steps initialised from their own statistics
        if self.spec.init == "mse":
            device = self.scale.device  # the search runs where the model does, as do the kept samples
            search = lambda v: mse_search(v[None].to(device), self.qmin, self.qmax, self.spec.symmetric)
            if not own.all():  # the pair of all steps together, for the others
                parts = [(s, c) for s, c in zip(self._obs_samples, self._obs_counts, strict=True) if s is not None]
                all_scale, all_zp = search(
                    stratified_subsample(parts, OBSERVE_SAMPLES, self._generator(parts[0][0].device))
                )
            scales, zps = [], []
            for i in range(self.num_steps):
                sc, zp = search(self._obs_samples[i]) if own[i] else (all_scale, all_zp)
                scales.append(sc[0])
                zps.append(zp[0])
            scale, zp = torch.stack(scales), torch.stack(zps)
        else:
            lo = torch.where(own, self._obs_min, self._obs_min[observed].min())
            hi = torch.where(own, self._obs_max, self._obs_max[observed].max())
            scale, zp = affine_params(lo, hi, self.qmin, self.qmax, self.spec.symmetric)
        self._assign(scale, zp)
        self._reset_stats()
        return True

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, inplace: bool = False) -> Tensor:
        """Fake-quantize `x` with each sample's step's (Δ, z) (observe it while calibrating).

        `inplace`: when no gradient is recorded, write the result into `x` (a tensor the caller owns and no longer
        needs) instead of a new tensor; ignored when autograd records (training needs `x` unchanged).
        """
        if self.observing:
            self._observe(x)
            return x
        if not self.enabled:
            return x
        if not self.initialized:
            raise RuntimeError(
                "activation quantizer is not initialised: calibrate it (calibrate_activations(model)) "
                "or disable activation quantization"
            )
        index = self._step_index(x)
        if not torch.is_grad_enabled():
            return self._fused_inference(x, index, inplace)
        if index is None:
            shape = [1] * x.ndim
            scale, zp = self.scale.reshape(shape), self.zero_point.reshape(shape)
        else:
            shape = [x.shape[0]] + [1] * (x.ndim - 1)  # [B, 1, ...]: each sample its own step's pair
            scale, zp = self.scale[index].reshape(shape), self.zero_point[index].reshape(shape)
        out = fake_quant(x, scale, zp, self.qmin, self.qmax, self.grad_scale(x), self.spec.clip_first)
        p = self.step_context.drop_prob
        if p > 0:  # QDrop: each element stays full precision with probability p
            drop = torch.rand(x.shape, generator=self.step_context.generator, device=x.device) < p
            out = torch.where(drop, x, out)
        return out

    def _fused_inference(self, x: Tensor, index: Tensor | None, inplace: bool = False) -> Tensor:
        """Sampling path (no autograd): the arithmetic of `fake_quant` as one in-place chain.

        Bit-identical to `fake_quant`'s forward, ~5x faster on CPU (one temporary instead of ten; PyTorch's own
        `fake_quantize_per_*_affine` kernels measured slower still).
        """
        shape = [1] * x.ndim if index is None else [x.shape[0]] + [1] * (x.ndim - 1)  # [B, 1, ...] per-sample step
        scale = (self.scale if index is None else self.scale[index]).reshape(shape)
        zp = (self.zero_point if index is None else self.zero_point[index]).reshape(shape)
        return fake_quant_(x, scale, zp, self.qmin, self.qmax, inplace)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_steps={self.num_steps}"
