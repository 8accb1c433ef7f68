"""How a dq-train run's student samples in float16 / bfloat16 against float32 (PSNR to the float32 teacher).

    python experiments/half_precision.py <run_dir> [--n 100] [--batch-size 100] [--edges-only]

Teacher and student are sampled with DDIM at the run's step count from the same noise (evaluation seed 0), the
student in float32, then cast with `.to(dtype)` (which snaps each latent weight onto its grid first,
`QuantLayerMixin._apply`) and, for comparison, as a plain cast did before that: latent weights rounded to the dtype
before their grid codes are taken. The teacher in each dtype is the float model's own precision floor. Prints first
how many latent weights lie near a rounding edge (within 0.01 of a step, and within a float16 cast's reach), against
evenly spread weights, then one table (PSNR in dB to the float32 teacher; to the float32 student in the last column;
`--edges-only` stops after the first part). Runs on the CPU.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from dq.config import register_resolvers
from dq.metrics import psnr
from dq.models import ddim_sample, load_teacher, make_noise
from dq.quant import load_quantized
from dq.quant.layers import QuantLayerMixin


def plain_cast(student: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`student` in `dtype` with its latent weights rounded to `dtype` before they are snapped: a cast without dq's
    snap."""
    model = copy.deepcopy(student)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLayerMixin):
                m.weight.copy_(m.weight.to(dtype).float())
    return model.to(dtype)


def edge_shares(student: nn.Module) -> None:
    """Print the share of quantized layers' latent weights near a rounding edge of their grid, and the share evenly
    spread fractional parts would give."""
    near = cast = cast_even = total = 0
    for m in student.modules():
        if isinstance(m, QuantLayerMixin):
            q = m.weight_quantizer
            code = m.weight.detach().float() / q._view(q.scale.detach().float(), m.weight)  # W / Δ, in steps
            to_edge = (code - code.floor() - 0.5).abs()
            reach = code.abs() * 2.0**-11  # how far a float16 cast can move W / Δ
            near += int((to_edge < 0.01).sum())
            cast += int((to_edge < reach).sum())
            cast_even += float((2 * reach).clamp(max=1).sum())
            total += code.numel()
    print(
        f"latent weights within 0.01 of a step of a rounding edge: {100 * near / total:.2f} % (evenly spread: 2 %); "
        f"within a float16 cast's reach: {100 * cast / total:.2f} % (evenly spread: {100 * cast_even / total:.2f} %)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished dq-train run directory (with student/ and .hydra/config.yaml)")
    p.add_argument("--n", type=int, default=100, help="samples (default 100)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--edges-only", action="store_true", help="print the latent weights near rounding edges only")
    args = p.parse_args()
    register_resolvers()
    cfg = OmegaConf.load(args.run / ".hydra" / "config.yaml")
    student = load_quantized(args.run / "student").eval()
    edge_shares(student)
    if args.edges_only:
        return
    teacher, scheduler = load_teacher(cfg.model.path)
    noise = make_noise(args.n, tuple(cfg.model.sample_shape), 0)
    steps = int(cfg.model.num_inference_steps)

    def sample(model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        out = ddim_sample(model.eval(), scheduler, noise.to(dtype), steps, args.batch_size, progress=False)
        return out.float()

    t32, s32 = sample(teacher, torch.float32), sample(student, torch.float32)
    print(f"{args.n} samples, DDIM-{steps}; PSNR dB to the float32 teacher (last column: to the float32 student)")
    print(f"{'':10}{'teacher':>10}{'student':>10}{'plain cast':>12}{'to student':>12}")
    print(f"{'float32':10}{'-':>10}{psnr(s32, t32):>10.2f}{'-':>12}{'-':>12}")
    for dtype in (torch.float16, torch.bfloat16):
        t = sample(copy.deepcopy(teacher).to(dtype), dtype)
        s = sample(copy.deepcopy(student).to(dtype), dtype)
        plain = sample(plain_cast(student, dtype), dtype)
        name = str(dtype).removeprefix("torch.")
        print(f"{name:10}{psnr(t, t32):>10.2f}{psnr(s, t32):>10.2f}{psnr(plain, t32):>12.2f}{psnr(s, s32):>12.2f}")


if __name__ == "__main__":
    main()
