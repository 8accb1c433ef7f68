"""`QALoRA` callback: EfficientDM's quantization-aware low-rank adapters (the `efficientdm` baseline, METHOD.md §5).

`setup` adds a rank-r adapter to every quantized weight (`dq.quant.lora.add_lora`: `Q(W + B A)`, `B = 0`); this adds
parameters, so it runs before the optimizer is built, where they form the group `lora` (`distill.lr_lora`).
`on_fit_end` merges the adapters into the weights (`merge_lora`), so the saved student is an ordinary quantized model.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl

from dq.errors import ConfigError
from dq.quant.lora import add_lora, lora_layers, merge_lora, stored_weight

log = logging.getLogger(__name__)

__all__ = ["QALoRA"]


class QALoRA(pl.Callback):
    """Low-rank adapters on every quantized weight, trained through the weight quantizer, merged when training ends.

    Args:
        rank: Adapter rank r (EfficientDM: 32), cut per layer to its smallest dimension.
    """

    order = 5  # acts in setup and on_fit_end only; Weight Dilation dilates W + B A itself (dq.quant.dilation)

    def __init__(self, rank: int = 32) -> None:
        if type(rank) is not int or rank < 1:
            raise ConfigError(f"callbacks.lora.rank={rank!r} is invalid: the adapter rank, a whole number >= 1")
        self.rank = rank
        self.stats: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not getattr(pl_module, "lrs", {}).get("lora", 0) > 0:
            raise ConfigError(
                "callbacks.lora adds adapters that distill.lr_lora=0 would leave untrained: set distill.lr_lora > 0 "
                "(experiment=efficientdm sets it), or remove the callback ('~callbacks.lora')"
            )
        added = add_lora(pl_module.student, self.rank)
        layers = lora_layers(pl_module.student)
        base = sum(stored_weight(layer).numel() for _, layer in layers)
        self.stats = {"layers": float(len(layers)), "adapter_params": float(added), "share": added / max(base, 1)}
        log.info(f"QALoRA: rank-{self.rank} adapters on {len(layers)} layers, {added:,} parameters "
              f"({100 * self.stats['share']:.0f}% of their weights)")  # fmt: skip

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        merge_lora(pl_module.student)
        for logger in trainer.loggers:
            logger.log_metrics({f"lora/{k}": v for k, v in self.stats.items()}, step=0)
