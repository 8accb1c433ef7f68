"""Training the embedded teacher: a diffusers UNet2DModel with epsilon-prediction DDPM loss and EMA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel


class DiffusionPretraining(pl.LightningModule):
    """DDPM training of `UNet2DModel(**unet)`; the exported weights are the EMA weights."""

    def __init__(
        self,
        unet: dict[str, Any],
        scheduler: dict[str, Any],
        lr: float = 1e-3,
        warmup_steps: int = 200,
        ema_decay: float = 0.999,
        max_steps: int = 6000,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.unet = UNet2DModel(**unet)
        _trial_forward(self.unet)
        self.noise_scheduler = DDPMScheduler(**scheduler)
        self.ema = EMAModel(self.unet.parameters(), decay=ema_decay)

    def on_fit_start(self) -> None:
        self.ema.to(self.device)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x0 = batch[0]
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(x0),), device=x0.device)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(self.unet(x_t, t).sample, noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        self.ema.step(self.unet.parameters())

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        sched = get_cosine_schedule_with_warmup(opt, self.hparams.warmup_steps, self.hparams.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, directory: Path) -> dict[str, float]:
        """Save the EMA UNet and the noise schedule as a diffusers directory (`unet/`, `scheduler/`)."""
        ema_unet = UNet2DModel(**self.hparams.unet)
        self.ema.copy_to(ema_unet.parameters())
        ema_unet.save_pretrained(directory / "unet", safe_serialization=True)
        self.noise_scheduler.save_pretrained(directory / "scheduler")
        n_params = sum(p.numel() for p in ema_unet.parameters())
        return {"parameters": float(n_params)}


def _trial_forward(unet: UNet2DModel) -> None:
    """One forward pass of a single zero sample: diffusers checks few architecture settings when it builds a UNet,
    and a bad one (a head dim above a block's width: heads = 0) would fail only at the first training step."""
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    try:
        with torch.no_grad():
            unet(torch.zeros(1, unet.config.in_channels, h, w), torch.zeros(1, dtype=torch.long))
    except Exception as e:
        raise ValueError(f"UNet2DModel fails a forward pass with these settings ({type(e).__name__}: {e})") from e
