"""Data-parallel distillation over several processes (`trainer=ddp`): Lightning's DDP launcher, process group and
barriers, without torch's `DistributedDataParallel` wrapper.

Every process holds the whole teacher, student and calibration set and runs the same steps on the same minibatch
indices. Each owns every `world_size`-th calibration sample (`owned`): BKD captures each block's inputs for those
alone, and each process takes the entries of every minibatch that it owns (`shard`). The gradients are summed across
processes (`sum_gradients`) before the optimizer step, so every process applies the same update and the students
stay equal.

Evaluation is sharded too: every process samples a run of whole batches of the evaluation noise (`batch_share`), and
the first process gathers the samples in order (`gather_in_order`) and scores them alone.

torch's wrapper does not fit block-wise distillation: it registers the parameters that require gradients once, when the
fit starts, while BKD trains one block's parameters at a time and AdaRound makes new ones for each block.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
from lightning_fabric import Fabric
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from omegaconf import DictConfig
from pytorch_lightning.overrides.distributed import _sync_module_states
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from torch import Tensor, nn

from dq.distill.calibration import teacher_fingerprint
from dq.errors import UserError
from dq.utils.progress import ConsoleHandler

__all__ = [
    "STRATEGY",
    "BlockParallelStrategy",
    "all_sum",
    "barrier",
    "batch_share",
    "broadcast_from_first",
    "check_equal_students",
    "ddp_child",
    "end_children",
    "external_launcher",
    "first_decides",
    "gather_in_order",
    "join_parent",
    "launch",
    "leaving_process_group",
    "local",
    "mark_parent",
    "owned",
    "shard",
    "sum_gradients",
    "wait_for_parent",
    "world",
]

T = TypeVar("T")
STRATEGY = "dq_ddp"  # `trainer.strategy` of conf/trainer/ddp.yaml
PARENT_ENV = "DQ_DDP_PARENT"  # the pid of the process that started the others (`ddp_child`)


class BlockParallelStrategy(DDPStrategy):
    """Lightning's `DDPStrategy` (processes started by re-running the command, one per device; `torch.distributed`
    process group; barriers) that leaves the LightningModule unwrapped: the distillation modules reduce their own
    gradients (`sum_gradients`). The processes start with the same student (rank 0's state is broadcast once here,
    and again once the callbacks and calibration have run: `QuantDistillation.on_train_start`)."""

    strategy_name = STRATEGY

    def configure_ddp(self) -> None:
        _sync_module_states(self.model)  # rank 0's parameters and buffers everywhere

    def on_exception(self, exception: BaseException) -> None:
        """In the first process: end the others (`end_children`; an error raised in the first process alone, e.g.
        writing a checkpoint)."""
        super().on_exception(exception)
        end_children(self)


@contextmanager
def leaving_process_group(strategy: object) -> Iterator[None]:
    """Around the work after the fit (dq-train) or the launch (dq-eval): destroy the process group at the end, in
    every process; where the first process fails alone (any error but a `UserError`, which every process raises
    together), end the others (`end_children`), which would wait for it in their next collective."""
    try:
        yield
    except BaseException as e:
        if world()[0] == 0 and not isinstance(e, UserError):
            end_children(strategy)
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def end_children(strategy: object) -> None:
    """In the first process of a `trainer=ddp` run: kill the processes its launcher started, which would otherwise
    wait in their next collective (NCCL: for 30 minutes) for a process that has stopped."""
    for proc in getattr(getattr(strategy, "launcher", None), "procs", None) or []:
        if proc.poll() is None:
            proc.kill()


if STRATEGY not in StrategyRegistry:
    StrategyRegistry.register(
        STRATEGY, BlockParallelStrategy, description="dq: data-parallel distillation without the DDP wrapper"
    )


def world() -> tuple[int, int]:
    """`(rank, world_size)` of this process in the process group; `(0, 1)` outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ddp_child() -> bool:
    """True in a process that Lightning's launcher started for `trainer=ddp`: its parent, the process the user
    started, put its own pid in `DQ_DDP_PARENT` before the fit (`mark_parent`). Processes that torchrun or srun start
    are not children: each would be a run of its own (and the run-directory lock refuses the second)."""
    parent = os.environ.get(PARENT_ENV)
    return parent is not None and parent != str(os.getpid())


def external_launcher() -> str | None:
    """What started this process as one of several, when Lightning would take it so and start no processes itself:
    `"srun"` (SLURM: `SLURM_NTASKS` set, the job not named `bash` or `interactive`), `"torchrun"`, or None."""
    if SLURMEnvironment.detect():
        return "srun"
    if TorchElasticEnvironment.detect():
        return "torchrun"
    return None


@contextmanager
def mark_parent() -> Iterator[None]:
    """Mark this process as the parent of the processes a `trainer=ddp` fit starts (`ddp_child`), for the fit."""
    os.environ[PARENT_ENV] = str(os.getpid())
    try:
        yield
    finally:
        os.environ.pop(PARENT_ENV, None)


def launch(cfg: DictConfig) -> Fabric | None:
    """dq-eval under `trainer.strategy=dq_ddp` with several devices: start the other processes (Lightning Fabric's
    launcher re-runs the command, as dq-train's does; they are marked as children, `mark_parent`) and join their
    process group, with gloo on CPUs and NCCL on GPUs. Returns the Fabric; None for one process."""
    trainer = cfg.get("trainer")
    if trainer is None or trainer.get("strategy") != STRATEGY:
        return None
    fabric = Fabric(accelerator=trainer.accelerator, devices=trainer.devices, strategy="ddp")
    if fabric.world_size == 1:
        return None
    with mark_parent():
        fabric.launch()
    return fabric


def join_parent(cfg: DictConfig) -> None:
    """Set up a process that Lightning's launcher started for `trainer=ddp`: its lines (info, warnings, errors) go to
    its own log file only (`<run>/train_ddp_process_<rank>.log`; the first process prints the same ones, and its
    progress bars), and `device: cuda` is its own GPU (that of its local rank)."""
    cfg.eval.progress = False
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ConsoleHandler):
            handler.setLevel(logging.CRITICAL + 1)
    if str(cfg.device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def wait_for_parent(timeout_s: float = 120.0) -> None:
    """In a child: wait until the parent exits (or `timeout_s`). An error that every process raises (a non-finite
    loss) then reaches the user through the parent, which Lightning would SIGKILL as soon as a child exits with it."""
    parent, end = os.getppid(), time.monotonic() + timeout_s
    while os.getppid() == parent and time.monotonic() < end:
        time.sleep(0.2)


def owned(n: int) -> Tensor:
    """The calibration samples (of `n`) this process owns: every `world_size`-th from its rank on. BKD captures each
    block's inputs for these alone, so the capture and its memory are split over the processes."""
    rank, size = world()
    return torch.arange(n)[rank::size]


def local(idx: Tensor) -> Tensor:
    """Positions of owned samples `idx` among this process's owned samples (`owned`)."""
    return idx // world()[1]


def shard(idx: Tensor) -> tuple[Tensor, float]:
    """This process's share of the minibatch `idx` [B] of calibration-set indices: the entries it owns (`owned`; in
    one process all of them, in their order), and the share's weight `len(share) / B`. The weighted per-share means
    sum to the whole minibatch's mean over the processes. A share may be empty."""
    rank, size = world()
    if size == 1:
        return idx, 1.0
    mine = idx[idx % size == rank]
    return mine, len(mine) / len(idx)


def batch_share(n: int, batch_size: int) -> slice:
    """The samples (of `n`, in batches of `batch_size`) this process samples in evaluation: a contiguous run of whole
    batches, split as evenly as they go, the first processes taking the extra ones (a last process may have none).
    Each batch holds the samples it holds in one process, so the samples do not depend on the number of processes."""
    rank, size = world()
    batches = math.ceil(n / batch_size)
    first, end = math.ceil(rank * batches / size), math.ceil((rank + 1) * batches / size)
    return slice(min(first * batch_size, n), min(end * batch_size, n))


def gather_in_order(part: Tensor, device: torch.device | str) -> Tensor | None:
    """The processes' `part`s [n_r, ...] concatenated in rank order, on the CPU, in the first process; None in the
    others; `part` itself in one process. The parts travel through `device` (NCCL gathers CUDA tensors alone)."""
    rank, size = world()
    if size == 1:
        return part
    length = torch.tensor([len(part)], device=device)
    lengths = [torch.zeros_like(length) for _ in range(size)]
    dist.all_gather(lengths, length)
    longest = max(int(n) for n in lengths)
    padded = torch.zeros((longest, *part.shape[1:]), dtype=part.dtype, device=device)  # gather: equal shapes
    padded[: len(part)] = part
    parts = [torch.empty_like(padded) for _ in range(size)] if rank == 0 else None  # all of them on the first alone
    dist.gather(padded, parts, dst=0)
    if rank > 0:
        return None
    return torch.cat([p[: int(n)].cpu() for p, n in zip(parts, lengths, strict=True)])


def first_decides(value: T) -> T:
    """The first process's `value` (any picklable object) in every process; `value` itself in one process."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every process arrives here (nothing in one process)."""
    if world()[1] > 1:
        dist.barrier()


def broadcast_from_first(module: nn.Module) -> None:
    """Put the first process's parameters, buffers and extra states (`get_extra_state`: a quantizer's `initialized`
    and `enabled`) into `module` in every process (nothing in one process)."""
    if world()[1] == 1:
        return
    _sync_module_states(module)
    extra = {
        name: m.get_extra_state()
        for name, m in module.named_modules()
        if type(m).get_extra_state is not nn.Module.get_extra_state
    }
    for name, state in first_decides(extra).items():
        module.get_submodule(name).set_extra_state(state)


def all_sum(value: Tensor) -> Tensor:
    """`value` summed over the processes (a detached copy; `value` itself outside a process group)."""
    if world()[1] == 1:
        return value.detach()
    total = value.detach().clone()
    dist.all_reduce(total)
    return total


def sum_gradients(params: Iterable[nn.Parameter]) -> None:
    """Sum the gradients of `params` over the processes, in place, in one flat all-reduce (nothing in one process).

    A parameter that has a gradient in some process and none (None) in another (whose share of the minibatch was
    empty) takes zeros there; one with none anywhere keeps None, as a single process's Adam would skip it.
    """
    if world()[1] == 1:
        return
    params = list(params)
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has)
    grads = []
    for p, h in zip(params, has.tolist(), strict=True):
        if h and p.grad is None:
            p.grad = torch.zeros_like(p)
        if h:
            grads.append(p.grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


def check_equal_students(student: nn.Module) -> None:
    """trainer=ddp: every process must end with the same student (same minibatches, summed gradients); the first one
    saves and evaluates its own. Raise, naming the processes that differ, when they do not."""
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, teacher_fingerprint(student))
    if differ := [rank for rank, d in enumerate(digests) if d != digests[0]]:
        raise RuntimeError(
            f"trainer=ddp: the students of processes {differ} differ from process 0's after training; nothing was "
            "saved. This is a bug in dq: please report it, and train with trainer.devices=1 meanwhile."
        )
