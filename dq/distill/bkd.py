"""Block-wise Knowledge Distillation (BKD, DilateQuant section 3) as one LightningModule and one `Trainer.fit`.

Blocks (`partition_blocks`) train one after the other, `iters_per_block` steps each: global step
`g = k * iters_per_block + i` is step `i` of block `k`. At the start of block `k` the whole calibration set is pushed
through the student (earlier blocks already quantized and trained) and the teacher, keeping the student's inputs to
block `k` and the teacher's output of block `k`; each step then re-runs student block `k` on a minibatch of those
inputs (its temporal quantizers reading each sample's own step index) and takes an Adam step on the MSE to the
teacher's output. A block whose training leaves its MSE over the calibration set above where it started is put
back as it was before training (`revert_worse`). After each block the student's state is checkpointed; a restarted
run with the same run directory loads it and goes on with the next block, and gives the same final student as an
uninterrupted run: minibatches of block `k` are drawn from a generator seeded by `(seed, k)` alone, and each block's
optimizer state starts fresh.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dq.distill.base import (
    QuantDistillation,
    calib_inputs,
    check_finite,
    check_finite_parameters,
    cosine_factor,
)
from dq.distill.blocks import Block, BlockIO, ModuleCall, capture_block_io, partition_blocks, run_block
from dq.distill.calibration import CalibrationSet
from dq.distill.checkpoint import CHECKPOINT_NAME, load_block_checkpoint, save_block_checkpoint
from dq.distill.oscillation import OscillationTracker, dampening_loss, trained_weight_layers
from dq.distill.parallel import all_sum, local, owned, shard, world
from dq.quant import quantized_weight_layers, step_context
from dq.quant.adaround import AdaRound, attach_adaround, bake_adaround, rounding_beta, rounding_loss

log = logging.getLogger(__name__)

__all__ = ["BlockwiseDistillation", "block_seed", "contiguous_io"]


def block_seed(seed: int, k: int) -> int:
    """Seed of block `k`'s minibatch sampling: a function of `(seed, k)` only, so resuming does not change it."""
    return (seed * 1_000_003 + 7_919 * (k + 1)) % (2**63 - 1)


def contiguous_io(io: BlockIO) -> BlockIO:
    """`io` with its top-level call tensors made contiguous.

    Captured tensors keep their producer's strides (the attention output reaching a resnet is channels-last), and
    torch 2.13's CPU GroupNorm backward crashes (segfault) on a channels-last input that needs no gradient.
    """
    f = lambda v: v.contiguous() if isinstance(v, Tensor) else v
    calls = {k: ModuleCall(tuple(map(f, c.args)), {n: f(v) for n, v in c.kwargs.items()}) for k, c in io.calls.items()}
    return BlockIO(calls, io.output.contiguous())


ROUNDING_FIXES_WEIGHTS = (
    "distill.lr_rounding > 0 with distill.lr_weight={lr_weight}, distill.lr_weight_qparams={lr_weight_qparams}: "
    "AdaRound learns each weight's rounding with the weights and their step sizes fixed, so they would not train; "
    "set both to 0 or lr_rounding=0"
)


class BlockwiseDistillation(QuantDistillation):
    """Train the quantized student block by block to match the teacher's block outputs (MSE).

    One Adam holds every block's parameters in groups of their own rates (latent weights with biases and norm
    affines, weight step sizes / zero-points, activation step sizes / zero-points, and where configured adapters,
    relative-rate activation step sizes and zero-points: `param_groups`); only block `k`'s parameters require
    gradients while it trains, and Adam skips parameters without gradients, so this is the same as a fresh Adam
    per block. A group with learning rate 0 stays frozen (`ptq_recon`: `lr_weight: 0`).

    Args:
        teacher: The full-precision UNet.
        student: The quantized copy, trained in place.
        calib: Calibration pairs `(x_t, t)`.
        iters_per_block: Training steps per block.
        batch_size: Minibatch size.
        lr_weight: Learning rate of latent weights, biases and norm affines.
        lr_weight_qparams: Learning rate of weight step sizes and zero-points.
        lr_act_qparams: Learning rate of activation step sizes and zero-points (per step under TPQ).
        lr_schedule: "cosine" (within each block, to 0) or "constant".
        lr_bits: Weight bit-width the rates are for; a student with other weight bits (`weight_bits`) scales
            `lr_weight` and `lr_weight_qparams` of its quantized layers by the step-size ratio (`param_groups`).
            None: no scaling.
        lr_lora: Learning rate of the adapters of the `lora` callback (QALoRA; EfficientDM); 0 without it.
        lr_act_step_rel: Activation step sizes move by about this fraction of their own value per step
            (`RelativeAdam`) instead of at `lr_act_qparams`; None: absolute, like zero-points.
        lr_zero_point: Learning rate of every zero-point, in grid steps per step (`param_groups`); None: they train
            with their step sizes, at `lr_weight_qparams` / `lr_act_qparams`, where `round(z)` never changes.
        adam_eps: Adam's ε. LSQ's gradient scale makes quantizer parameters' gradients small (mostly 1e-10 .. 1e-8 for
            activation step sizes), where the default 1e-8 shortens their steps below the rates.
        revert_worse: Put a block back as it was before training when training leaves its calibration-set MSE
            higher than before (its history entry then says `"kept": "untrained"`).
        act_drop_prob: QDrop: in each training step every activation element of the block stays full precision
            with this probability (masks seeded by `(seed, k)`); 0: off. Evaluation and sampling always quantize.
        dampen: Weight λ of oscillation dampening (Nagel et al. 2022, `dampening_loss`): step `i` of a block trains
            on `MSE + λ · r_i · MSE_0 · D`, where `D` is the mean squared distance of the block's latent weights to
            their bin centres in steps, `MSE_0` the block's calibration MSE before training (so λ means the same in
            every block) and `r_i` rises from 0 to 1 over the block (one minus the cosine schedule). 0: off.
        freeze: Oscillation freezing (Nagel et al. 2022, `OscillationTracker`): a latent weight whose moving average
            of code reversals per step (momentum 0.01) passes this threshold is held at its average code for the rest
            of its block. 0: off.
        lr_rounding: AdaRound (`dq.quant.adaround`, Nagel et al. 2020): each weight of block `k` learns whether it
            rounds down or up, at this rate, and the block ends with that choice written into its latent weights
            (BRECQ, Q-Diffusion and EDA-DM: the `ptq_recon` baseline). 0: off, round to nearest.
        rounding_reg: AdaRound's regulariser weight λ as BRECQ sets it (0.01), for its loss that sums the squared
            error over dim 1 (channels) and averages the rest; dq's loss is the mean, so λ is divided by the block
            output's channels.
        **kwargs: `QuantDistillation` arguments (calib_batch_size, run_dir, seed, fingerprint, name, progress).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        calib: CalibrationSet,
        iters_per_block: int = 120,
        batch_size: int = 32,
        lr_weight: float = 1e-3,
        lr_weight_qparams: float = 1e-3,
        lr_act_qparams: float = 1e-4,
        lr_schedule: str = "cosine",
        lr_bits: int | None = 4,
        lr_act_step_rel: float | None = None,
        lr_lora: float = 0.0,
        lr_zero_point: float | None = None,
        adam_eps: float = 1e-8,
        revert_worse: bool = True,
        act_drop_prob: float = 0.0,
        dampen: float = 0.0,
        freeze: float = 0.0,
        lr_rounding: float = 0.0,
        rounding_reg: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(teacher, student, calib, **kwargs)
        if iters_per_block < 1:
            raise ValueError(f"iters_per_block={iters_per_block} must be >= 1")
        self.set_optimization(batch_size=batch_size, lr_weight=lr_weight, lr_weight_qparams=lr_weight_qparams,
                              lr_act_qparams=lr_act_qparams, lr_schedule=lr_schedule, lr_bits=lr_bits,
                              lr_act_step_rel=lr_act_step_rel, lr_lora=lr_lora,
                              lr_zero_point=lr_zero_point, adam_eps=adam_eps, lr_rounding=lr_rounding)  # fmt: skip
        if not 0 <= act_drop_prob < 1:  # also refuses NaN
            raise ValueError(
                f"distill.act_drop_prob={act_drop_prob} must be in [0, 1): the probability that an activation element "
                "skips quantization in a training step (QDrop; 0.5 in QDrop and EDA-DM), 0 for off"
            )
        if not (dampen >= 0 and math.isfinite(dampen)):  # also refuses NaN
            raise ValueError(
                f"distill.dampen={dampen} must be a finite number >= 0: the weight of oscillation dampening "
                "(Nagel et al. 2022) relative to each block's MSE, 0 for off"
            )
        if not 0 <= freeze < 1:  # also refuses NaN
            raise ValueError(
                f"distill.freeze={freeze} must be in [0, 1): the moving-average frequency of code reversals per step "
                "above which a latent weight is frozen (Nagel et al. 2022; try 0.02 .. 0.05), 0 for off"
            )
        if not (rounding_reg >= 0 and math.isfinite(rounding_reg)):  # also refuses NaN
            raise ValueError(
                f"distill.rounding_reg={rounding_reg} must be a finite number >= 0 (AdaRound's regulariser)"
            )
        if lr_rounding > 0 and (lr_weight > 0 or lr_weight_qparams > 0):
            raise ValueError(ROUNDING_FIXES_WEIGHTS.format(lr_weight=lr_weight, lr_weight_qparams=lr_weight_qparams))
        self.rounding_reg = rounding_reg
        self._roundings: list[AdaRound] = []  # block k's learned roundings while it trains
        self.iters_per_block = iters_per_block
        self.dampen = dampen
        self.freeze = freeze
        self.revert_worse = revert_worse
        self.act_drop_prob = act_drop_prob
        self.blocks: list[Block] = partition_blocks(teacher)  # same names in the student
        self.max_steps = len(self.blocks) * iters_per_block
        self.history: list[dict[str, Any]] = []  # per finished block: name, mse before / trained / after, kept
        self._block: int | None = None  # index of the block whose inputs are cached
        self._cache: BlockIO | None = None  # student inputs to block k, teacher output of block k, all N samples
        self._cache_steps: Tensor | None = None  # [N] step index of each cached sample
        self._batches: Tensor | None = None  # [iters_per_block, batch_size] minibatch indices of block k
        self._trainable: set[int] = set()  # ids of the parameters in the optimizer
        self._untrained: list[tuple[nn.Parameter, Tensor]] = []  # block k's parameters and their values at its start
        self._oscillation: OscillationTracker | None = None  # code flips of block k's latent weights
        self.block_seconds: dict[str, float] = {}  # wall time of each finished block (capture included), kept on resume
        self._block_start = 0.0

    # ---- set-up ---------------------------------------------------------------------------------------------
    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def block_modules(self, k: int) -> list[nn.Module]:
        """The student's modules of block `k`."""
        return [self.student.get_submodule(name) for name in self.blocks[k].modules]

    def block_params(self, k: int) -> list[nn.Parameter]:
        """Parameters of block `k` of the student (deduplicated, in module order)."""
        seen: dict[int, nn.Parameter] = {}
        for module in self.block_modules(k):
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = self.make_adam()
        if self.lr_rounding > 0:  # AdaRound's α: a block's own, made when it starts; at a constant rate, as in BRECQ
            lr = self.lr_rounding
            opt.add_param_group({"name": "rounding", "params": [], "lr": lr, "base_lr": lr, "constant": True})
        self._trainable = {id(p) for g in opt.param_groups for p in g["params"]}
        return opt

    def on_fit_start(self) -> None:
        """Calibrate what is uninitialised, then resume from `<run_dir>/checkpoints` when a checkpoint exists."""
        super().on_fit_start()
        if self.checkpoint_dir is None:
            return
        meta = load_block_checkpoint(self.checkpoint_dir, self.student, self.block_names, self.fingerprint)
        if meta is not None:
            finished = int(meta["finished_blocks"])
            self.history = list(meta.get("history", []))
            self.block_seconds = dict(meta.get("block_seconds", {}))  # absent in checkpoints of older versions
            self.start_step = finished * self.iters_per_block
            if finished == len(self.blocks):  # a re-run of a finished run: Lightning then reports no training batches
                log.info(f"all {finished} blocks were already trained in this run: nothing left to train")
            else:
                log.info(f"resuming block-wise distillation after {finished}/{len(self.blocks)} finished blocks")

    # ---- block I/O ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def capture(self, block: Block) -> tuple[BlockIO, Tensor]:
        """Student inputs to `block` and teacher output of `block` for the whole calibration set.

        Returns:
            `(io, steps)`: `io.calls` the student's inputs, `io.output` [N, ...] the teacher's block output;
            `steps` [N] each sample's step index.
        """
        ios, mine = [], owned(len(self.calib))  # trainer=ddp: this process's samples (all in one process)
        for idx in mine.split(self.calib_batch_size):
            x, t, kw = calib_inputs(self.calib, idx, self.device)
            s_io = capture_block_io(self.student, block, lambda x=x, t=t, kw=kw: self.student(x, t, **kw))
            t_io = capture_block_io(self.teacher, block, lambda x=x, t=t, kw=kw: self.teacher(x, t, **kw))
            ios.append(contiguous_io(BlockIO(s_io.calls, t_io.output)))
        return BlockIO.cat(ios), self.calib.step_index[mine].to(self.device)

    def block_loss(self, k: int, idx: Tensor) -> Tensor:
        """MSE between student block `k` on cached inputs `idx` and the teacher's block output."""
        io = self._cache.slice(idx)
        step_context(self.student).index = self._cache_steps[idx.to(self._cache_steps.device)]
        return F.mse_loss(run_block(self.student, self.blocks[k], io), io.output)

    @torch.no_grad()
    def block_mse(self, k: int) -> float:
        """Block `k`'s MSE to the teacher over the whole calibration set (each process of trainer=ddp sums its
        cached samples', and the sums are added: the same value in every process)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for idx in torch.arange(self._cache.batch_size).split(self.calib_batch_size):
            total += self.block_loss(k, idx).double() * len(idx)
        return all_sum(total).item() / len(self.calib)

    def start_block(self, k: int) -> None:
        """Cache block `k`'s I/O, draw its minibatches from `(seed, k)`, unfreeze its parameters."""
        self._block_start = time.perf_counter()
        self._cache, self._cache_steps = None, None
        self._cache, self._cache_steps = self.capture(self.blocks[k])
        g = torch.Generator().manual_seed(block_seed(self.seed, k))
        self._batches = torch.randint(len(self.calib), (self.iters_per_block, self.batch_size), generator=g)
        ctx = step_context(self.student)  # QDrop masks: drawn from (seed, k) too, so resuming does not change them
        ctx.drop_prob = self.act_drop_prob
        # each process its own masks (trainer=ddp: its own share of the minibatch)
        ctx.generator = torch.Generator(self.device).manual_seed(block_seed(self.seed, k) + 1 + world()[0])
        params = [p for p in self.block_params(k) if id(p) in self._trainable]
        self.freeze_all_but(params)
        if self.revert_worse:
            self._untrained = [(p, p.detach().clone()) for p in params]
        self._block = k
        layers = trained_weight_layers(self.block_modules(k))
        self._oscillation = OscillationTracker(layers, freeze_threshold=self.freeze)
        self._mse_before = self.block_mse(k)
        self.log_block({f"block/{k:02d}/mse_before": self._mse_before}, k * self.iters_per_block)
        if self.lr_rounding > 0:
            self.start_rounding(k)

    def start_rounding(self, k: int) -> None:
        """AdaRound on block `k`'s quantized weights: attach the roundings, put their α in the optimizer's group
        `rounding` and keep the latent weights that `finish_rounding` overwrites (for `revert_worse`)."""
        modules = self.block_modules(k)
        if self.revert_worse:
            self._untrained += [(m.weight, m.weight.detach().clone()) for m in quantized_weight_layers(modules)]
        self._roundings = attach_adaround(modules)
        group = next(g for g in self.optimizers().optimizer.param_groups if g["name"] == "rounding")
        group["params"] = [r.alpha for r in self._roundings]
        self._trainable.update(id(r.alpha) for r in self._roundings)

    def finish_rounding(self, k: int) -> float:
        """Write block `k`'s rounding choices into its latent weights and drop the roundings (and their Adam state);
        returns the share of its quantized weights that round otherwise than to nearest."""
        changed = bake_adaround(self.block_modules(k))
        total = sum(r.alpha.numel() for r in self._roundings)
        opt = self.optimizers().optimizer
        for r in self._roundings:
            opt.state.pop(r.alpha, None)
            self._trainable.discard(id(r.alpha))
        next(g for g in opt.param_groups if g["name"] == "rounding")["params"] = []
        self._roundings = []
        return changed / max(total, 1)

    def finish_block(self, k: int) -> None:
        """Check block `k`'s parameters are finite, log its final MSE and write the checkpoint."""
        check_finite_parameters(self.student, f"block {k} ({self.blocks[k].name})", self.checkpoint_path)
        rounding = {"rounded_otherwise": self.finish_rounding(k)} if self._roundings else {}
        mse_trained = mse_after = self.block_mse(k)
        kept = "trained"
        if self.revert_worse and mse_trained > self._mse_before:  # training made the block worse: undo it
            with torch.no_grad():
                for p, value in self._untrained:
                    p.copy_(value)
            mse_after, kept = self._mse_before, "untrained"
            rise = f" (+{100 * (mse_trained / self._mse_before - 1):.2g}%)" if self._mse_before > 0 else ""
            log.info(f"block {k} ({self.blocks[k].name}): training raised its MSE from {self._mse_before:.4g} to "
                     f"{mse_trained:.4g}{rise}; kept the block as it was before training")  # fmt: skip
        last = (k + 1) * self.iters_per_block - 1
        seconds = self.block_seconds[self.blocks[k].name] = time.perf_counter() - self._block_start
        weights = {"oscillated": self._oscillation.share(), **rounding}
        if self.freeze:
            weights["frozen"] = self._oscillation.frozen_share()
        self.log_block(
            {f"block/{k:02d}/mse_after": mse_after, f"block/{k:02d}/reverted": float(kept == "untrained"),
             f"block/{k:02d}/seconds": seconds, **{f"block/{k:02d}/{n}": v for n, v in weights.items()}}, last,
        )  # fmt: skip
        self.history.append({"block": self.blocks[k].name, "mse_before": self._mse_before, "mse_trained": mse_trained,
                             "mse_after": mse_after, "kept": kept, **weights})  # fmt: skip
        self.student.requires_grad_(False)
        ctx = step_context(self.student)
        ctx.drop_prob, ctx.generator = 0.0, None  # QDrop off again: only training steps use it
        self._cache, self._cache_steps, self._batches, self._untrained = None, None, None, []
        self._oscillation = None
        if self.checkpoint_dir is not None and self.trainer.is_global_zero:  # trainer=ddp: the students are equal
            meta = {"history": self.history, "block_seconds": self.block_seconds}
            save_block_checkpoint(self.checkpoint_dir, self.student, k + 1, self.block_names, self.fingerprint, **meta)
        self.trainer.strategy.barrier()  # no process starts the next block before the checkpoint is written

    def log_block(self, metrics: dict[str, float], step: int) -> None:
        """Write block metrics to every logger once, at global step `step` (`k * iters_per_block + i`).

        Not `self.log`: within the one epoch of the fit Lightning writes every key's last value again at each later
        logging step, so block 0's loss would go on being logged, unchanged, until the last block.
        """
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    @property
    def checkpoint_path(self) -> Path | None:
        return self.checkpoint_dir / CHECKPOINT_NAME if self.checkpoint_dir is not None else None

    # ---- training -----------------------------------------------------------------------------------------
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        k, i = divmod(int(batch[0]), self.iters_per_block)  # block k, its step i
        if self._block != k:
            self.start_block(k)
        self.schedule_lr(i, self.iters_per_block)
        opt = self.optimizers()
        # this process's share of the minibatch, weighted so that the shares' losses sum to the minibatch's mean
        mine, share = shard(self._batches[i])
        mse = self.block_loss(k, local(mine)) if len(mine) else torch.zeros((), device=self.device)
        loss = share * mse
        size = world()[1]  # the parameter terms below are counted once over the processes
        if self.dampen and self._oscillation.layers:  # rises from 0 as the learning rate falls (Nagel et al.)
            weight = self.dampen * (1.0 - cosine_factor(i, self.iters_per_block, "cosine")) * self._mse_before
            loss = loss + weight * dampening_loss(self._oscillation.layers) / size
        if self._roundings and (beta := rounding_beta(i + 1, self.iters_per_block)) is not None:
            # BRECQ's loss sums the squared error over dim 1 (channels / features) and averages the rest: C times
            # dq's mean, so BRECQ's λ is λ / C here
            weight = self.rounding_reg / self._cache.output.shape[1]
            loss = loss + weight * rounding_loss(self._roundings, beta) / size
        mse, total = all_sum(torch.stack([share * mse.detach(), loss.detach()]))  # the whole minibatch's
        where = f"block {k} ({self.blocks[k].name}) at step {i}/{self.iters_per_block}"
        check_finite(total, where, self.checkpoint_path)  # the same in every process: all stop together
        self.take_step(opt, loss)
        self._oscillation.update()
        # the bar only: Lightning's step restarts at 0 in a resumed run, the run's own step (batch[0]) does not
        self.log("distill/loss", mse.detach(), prog_bar=True, logger=False)
        self.log("distill/block", float(k), prog_bar=True, logger=False)
        every = self.trainer.log_every_n_steps  # 0 (Lightning's "never", barebones): the block's last step only
        if (every and i % every == 0) or i == self.iters_per_block - 1:
            value = mse.item()
            self.log_block({f"block/{k:02d}/loss": value, "distill/loss": value, "distill/block": k}, int(batch[0]))
        if i == self.iters_per_block - 1:
            self.finish_block(k)
        return total
