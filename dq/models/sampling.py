"""A plain DDIM sampling loop over explicit noise, so two models can be sampled from identical noise."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm


def make_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """`n` standard-normal tensors of `shape` from a seeded CPU generator (the same on every device)."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def ddim_sample(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    noise: torch.Tensor,
    num_inference_steps: int,
    batch_size: int = 250,
    eta: float = 0.0,
    progress: bool = True,
    desc: str = "sampling",
) -> torch.Tensor:
    """Denoise `noise` [N, C, H, W] with DDIM; returns samples in [-1, 1] on the CPU.

    With `eta=0` the result is a deterministic function of the noise, which is what makes teacher and
    student samples from the same noise comparable pixel by pixel (PSNR-to-teacher).
    """
    device = next(unet.parameters()).device
    scheduler.set_timesteps(num_inference_steps)
    out = []
    bar = tqdm(total=len(noise) * num_inference_steps, desc=desc, disable=not progress, unit="img-step")
    for chunk in noise.split(batch_size):
        x = chunk.to(device)
        for t in scheduler.timesteps:
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x, eta=eta).prev_sample
            bar.update(len(chunk))
        out.append(x.clamp(-1, 1).cpu())
    bar.close()
    return torch.cat(out)
