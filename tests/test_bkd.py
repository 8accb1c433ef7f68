"""Block-wise distillation on a tiny UNet: per-block training, frozen other blocks, exact resume, NaN guard."""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from diffusers import DDIMScheduler, UNet2DModel

from dq.callbacks import TemporalParallelQuantizer, WeightDilation
from dq.distill import (
    BlockwiseDistillation,
    ModelDistillation,
    NoDistillation,
    NonFiniteLossError,
    load_block_checkpoint,
    lr_factor,
    param_groups,
)
from dq.distill.base import RelativeAdam, calibrate_student, step_sizes, weight_bits
from dq.distill.calibration import build_calibration_set
from dq.errors import CheckpointError
from dq.quant import QuantSpec, act_quantizers, quantize_model, step_context, weight_quantizers
from dq.quant.quantizer import SCALE_MIN, UniformQuantizer

LRS = dict(lr_weight=1e-4, lr_weight_qparams=1e-4, lr_act_qparams=1e-4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calib(teacher):
    return build_calibration_set(teacher, DDIMScheduler(num_train_timesteps=1000), 16, 3, (1, 8, 8), 0, progress=False)


def make_student(teacher: UNet2DModel, calib, weight_bits: int = 4) -> UNet2DModel:
    student = copy.deepcopy(teacher)
    quantize_model(student, QuantSpec(weight_bits=weight_bits, act_bits=8), calib.table)
    return student


def fit(module: pl.LightningModule, callbacks: list[pl.Callback] = (), **trainer_kw) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=module.max_steps, max_epochs=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=list(callbacks),
        default_root_dir=module.run_dir,  # dilation.json goes there, never into the working directory
        **trainer_kw,
    )  # fmt: skip
    trainer.fit(module)
    return trainer


def bkd(teacher, calib, run_dir: Path | None = None, iters: int = 4, bits: int = 4, **kw) -> BlockwiseDistillation:
    args = dict(iters_per_block=iters, batch_size=8, calib_batch_size=8, run_dir=run_dir, progress=False, **LRS)
    return BlockwiseDistillation(teacher, make_student(teacher, calib, bits), calib, **(args | kw))


def block_param_names(module: BlockwiseDistillation, k: int) -> set[str]:
    """Names (in the student) of block `k`'s parameters."""
    return {f"{m}.{n}" for m in module.blocks[k].modules for n, _ in module.student.get_submodule(m).named_parameters()}


class ParamWatch(pl.Callback):
    """Records, per training step, the parameters that changed and the block that was training."""

    def __init__(self) -> None:
        self.changed: list[tuple[int, set[str]]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before = {n: p.detach().clone() for n, p in module.student.named_parameters()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        after = dict(module.student.named_parameters())
        self.changed.append((module._block, {n for n, p in self.before.items() if not torch.equal(p, after[n])}))


def test_param_groups_split_weights_and_quantizer_params(teacher, calib):
    student = make_student(teacher, calib)
    groups = {g["name"]: g for g in param_groups(student, {"weights": 1.0, "weight_qparams": 2.0, "act_qparams": 3.0})}
    names = {id(p): n for n, p in student.named_parameters()}
    of = lambda g: {names[id(p)] for p in groups[g]["params"]}  # noqa: E731
    assert "conv_in.weight" in of("weights") and "conv_in.bias" in of("weights")
    assert "conv_in.weight_quantizer.scale" in of("weight_qparams")
    assert "conv_in.act_quantizer.zero_point" in of("act_qparams")
    assert "down_blocks.1.attentions.0.processor.prob_quantizer.scale" in of("act_qparams")
    assert sum(len(g["params"]) for g in groups.values()) == len(names)
    frozen = param_groups(student, {"weights": 0, "weight_qparams": 1e-3, "act_qparams": 1e-3})  # ptq_recon
    assert [g["name"] for g in frozen] == ["weight_qparams", "act_qparams"]


def test_param_groups_scale_rates_by_the_students_weight_bits(teacher, calib):
    """Rates given for 4-bit weights: an 8-bit student's weights, biases and weight step sizes get them x 15/255."""
    assert lr_factor(8, 4) == pytest.approx(15 / 255) and lr_factor(4, 4) == 1.0 and lr_factor(8, None) == 1.0
    lrs = {"weights": 1.0, "weight_qparams": 2.0, "act_qparams": 3.0}
    plain = [("weights", 1.0), ("weight_qparams", 2.0), ("act_qparams", 3.0)]
    w4 = make_student(teacher, calib)  # W4A8 with 8-bit conv_in / conv_out (keep_8bit): a 4-bit student
    assert weight_bits(w4) == 4
    assert [(g["name"], g["lr"]) for g in param_groups(w4, lrs, lr_bits=4)] == plain
    w8 = make_student(teacher, calib, weight_bits=8)
    assert weight_bits(w8) == 8
    groups = {g["name"]: g for g in param_groups(w8, lrs, lr_bits=4)}
    names = {id(p): n for n, p in w8.named_parameters()}
    of = lambda g: {names[id(p)] for p in groups[g]["params"]}  # noqa: E731
    assert groups["weights@w8"]["lr"] == pytest.approx(15 / 255)
    assert groups["weight_qparams@w8"]["lr"] == pytest.approx(2 * 15 / 255)
    assert {"conv_in.weight", "conv_in.bias", "down_blocks.0.resnets.0.conv1.weight"} <= of("weights@w8")
    assert of("weight_qparams@w8") == {n for n in names.values() if n.endswith("weight_quantizer.scale")}
    assert "conv_in.weight_quantizer.zero_point" in of("weight_qparams")  # grid units: not scaled
    assert "down_blocks.0.resnets.0.norm1.weight" in of("weights")  # norm affines are not scaled
    assert "conv_in.act_quantizer.scale" in of("act_qparams") and groups["act_qparams"]["lr"] == 3.0
    assert sorted(n for g in groups.values() for n in of(g["name"])) == sorted(names.values())  # each once
    assert [(g["name"], g["lr"]) for g in param_groups(w8, lrs, lr_bits=8)] == plain
    assert [(g["name"], g["lr"]) for g in param_groups(w8, lrs, lr_bits=None)] == plain


@pytest.mark.parametrize(("bits", "factor"), [(8, 15 / 255), (4, 1.0)])
def test_one_adam_step_moves_the_weights_by_the_scaled_rate(teacher, calib, bits: int, factor: float):
    """Against a plain reference: Adam's first step moves each weight by ~lr (|g| >> eps), so by lr x factor;
    the 8-bit conv_in of a 4-bit student keeps the 4-bit rate."""
    rates = dict(lr_weight=1e-3, lr_weight_qparams=0, lr_act_qparams=0, lr_bits=4)
    module = bkd(teacher, calib, iters=1, revert_worse=False, bits=bits, **rates)
    before = {n: p.detach().clone() for n, p in module.student.named_parameters()}
    fit(module)
    after = dict(module.student.named_parameters())
    for name in ("conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"):
        moved = (after[name] - before[name]).abs()
        moved = moved[moved > 0]
        assert moved.numel() > 0 and torch.allclose(moved.median(), torch.tensor(1e-3 * factor), rtol=0.05), name


def test_param_groups_put_activation_step_sizes_in_a_relative_group(teacher, calib):
    student = make_student(teacher, calib)
    lrs = {"weights": 1.0, "weight_qparams": 2.0, "act_qparams": 3.0}
    groups = {g["name"]: g for g in param_groups(student, lrs, act_step_rel=0.01)}
    names = {id(p): n for n, p in student.named_parameters()}
    of = lambda g: {names[id(p)] for p in groups[g]["params"]}  # noqa: E731
    act_steps = {n for n, _ in act_quantizers(student)}
    assert of("act_qparams@rel") == {f"{n}.scale" for n in act_steps}
    assert groups["act_qparams@rel"]["relative"] and groups["act_qparams@rel"]["lr"] == 0.01
    assert "conv_in.act_quantizer.zero_point" in of("act_qparams") and not groups["act_qparams"]["relative"]
    assert not any(g["relative"] for g in param_groups(student, lrs))  # None: no relative group
    assert "act_qparams@rel" not in {g["name"] for g in param_groups(student, lrs, act_step_rel=0)}  # 0: frozen


def test_param_groups_put_zero_points_in_a_group_of_their_own(teacher, calib):
    student = make_student(teacher, calib, weight_bits=8)  # weight rates scaled: zero-points are not
    lrs = {"weights": 1.0, "weight_qparams": 2.0, "act_qparams": 3.0}
    groups = {g["name"]: g for g in param_groups(student, lrs, lr_bits=4, zero_point_lr=0.05)}
    names = {id(p): n for n, p in student.named_parameters()}
    of = lambda g: {names[id(p)] for p in groups[g]["params"]}  # noqa: E731
    zero_points = {n for n in names.values() if n.endswith(".zero_point")}
    assert zero_points and of("zero_points") == zero_points and groups["zero_points"]["lr"] == 0.05
    assert not any(n.endswith(".zero_point") for g in groups if g != "zero_points" for n in of(g))
    assert sorted(n for g in groups.values() for n in of(g["name"])) == sorted(names.values())  # each once
    assert "zero_points" not in {g["name"] for g in param_groups(student, lrs, zero_point_lr=0)}  # 0: frozen
    assert "conv_in.act_quantizer.zero_point" in {
        names[id(p)] for g in param_groups(student, lrs) if g["name"] == "act_qparams" for p in g["params"]
    }  # None: with the step sizes, as before


@pytest.mark.parametrize("lr_zero_point", [None, 0.1])
def test_zero_points_change_their_rounded_value_only_at_a_rate_of_their_own(teacher, calib, lr_zero_point):
    """Adam moves a parameter by about lr per step: at the step sizes' 1e-4 a zero-point (grid steps; the forward
    pass uses round(z)) stays put over a block, at 0.1 some move by the half step that changes round(z)."""
    module = bkd(teacher, calib, iters=20, revert_worse=False, lr_zero_point=lr_zero_point)
    calibrate_student(module.student, calib, 8, progress=False)
    quantizers = [*act_quantizers(module.student), *weight_quantizers(module.student)]
    before = {n: q.zero_point.detach().clone() for n, q in quantizers}
    fit(module)
    drift = max((q.zero_point - before[n]).abs().max().item() for n, q in quantizers)
    changed = sum(int((q.zero_point.round() != before[n].round()).sum()) for n, q in quantizers)
    if lr_zero_point is None:
        assert 0 < drift < 20 * 1e-4 * 1.01 and changed == 0
    else:
        assert drift > 0.5 and changed > 0


def test_relative_adam_moves_each_element_by_its_own_fraction():
    """Against plain Adam on a copy: a relative element becomes old * exp(plain Adam's move); other groups are plain."""
    init = torch.tensor([1e-4, 3e-3, 0.1, 2.0])
    rel, ref = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    other, other_ref = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    no_grad = torch.nn.Parameter(init.clone())  # in the relative group, but without a gradient
    opt = RelativeAdam([{"params": [rel, no_grad], "lr": 0.01, "relative": True}, {"params": [other], "lr": 0.01}])
    plain, other_plain = torch.optim.Adam([ref], lr=0.01), torch.optim.Adam([other_ref], lr=0.01)
    for step in range(3):
        grad = torch.tensor([1.0, -2.0, 0.5, 3.0]) * (step + 1)
        old = rel.detach().clone()
        ref.data.copy_(old)  # plain Adam from the same point and with the same moments
        for p in (rel, other, ref, other_ref):
            p.grad = grad.clone()
        opt.step()
        plain.step()
        other_plain.step()
        torch.testing.assert_close(rel.detach(), old * torch.exp(ref.detach() - old), atol=0, rtol=0)
    torch.testing.assert_close(other.detach(), other_ref.detach(), atol=0, rtol=0)  # the plain group
    assert torch.equal(no_grad.detach(), init)
    assert (rel[0] - init[0]).abs() < 1e-5 and (other[0] - init[0]).abs() > 1e-2  # 1e-4 moved by ~3% of itself


def test_relative_adam_keeps_signs_at_large_rates():
    p = torch.nn.Parameter(torch.tensor([3e-3, 0.5]))
    opt = RelativeAdam([{"params": [p], "lr": 0.9, "relative": True}])
    for _ in range(20):
        p.grad = torch.ones(2)  # always push down: Adam's plain move is ~ -0.9 a step
        opt.step()
    assert torch.all(p > 0) and torch.all(p < torch.tensor([3e-3, 0.5]) * 1e-3)


def test_a_step_size_pushed_past_zero_stays_at_scale_min_and_can_grow_back():
    """Fake quantization clamps Δ at SCALE_MIN and passes no gradient below it: a Δ that one absolute Adam step took
    below zero never moved again (35 of a W4A8 efficientdm student's step sizes, at its act rate of 5e-4)."""
    delta, zero_point = torch.nn.Parameter(torch.tensor([4e-3, 0.5])), torch.nn.Parameter(torch.tensor([0.5, 0.5]))
    opt = RelativeAdam([{"params": [delta, zero_point], "lr": 5e-3}], step_sizes=[delta])
    delta.grad, zero_point.grad = torch.ones(2), torch.ones(2)  # push both down by ~lr
    opt.step()
    assert delta.detach().tolist() == pytest.approx([SCALE_MIN, 0.495], rel=1e-6)  # not -1e-3
    assert zero_point.detach().tolist() == pytest.approx([0.495, 0.495])  # zero-points may go below zero
    for _ in range(5):
        delta.grad, zero_point.grad = -torch.ones(2), torch.zeros(2)
        opt.step()
    assert delta[0] > 1e-3  # a gradient reaches it again and it grows back


def test_distillation_keeps_every_quantizer_step_size_in_the_floor(teacher, calib):
    module = bkd(teacher, calib)
    opt = module.make_adam()
    expected = {id(q.scale) for _, q in act_quantizers(module.student)}
    expected |= {id(q.scale) for _, q in weight_quantizers(module.student)}
    assert {id(p) for p in opt.step_sizes} == expected == {id(p) for p in step_sizes(module.student)}


@pytest.mark.parametrize(
    ("bad", "message"), [(-0.1, "must be >= 0"), (1.0, r"in \[0, 1\)"), (float("nan"), r"in \[0, 1\)")]
)
def test_lr_act_step_rel_out_of_range_is_refused(teacher, calib, bad: float, message: str):
    with pytest.raises(ValueError, match=f"distill.lr_act_step_rel=.*{message}"):
        bkd(teacher, calib, lr_act_step_rel=bad)


def test_all_rates_zero_is_refused_naming_every_rate(teacher, calib):
    zero = dict(lr_weight=0, lr_weight_qparams=0, lr_act_qparams=0)
    with pytest.raises(ValueError, match="lr_act_qparams=0: nothing would train"):
        bkd(teacher, calib, **zero)
    with pytest.raises(ValueError, match="lr_act_step_rel=0: nothing would train"):
        bkd(teacher, calib, **zero, lr_act_step_rel=0.0)
    bkd(teacher, calib, **zero, lr_act_step_rel=0.01)  # only the relative step sizes train: allowed
    with pytest.raises(ValueError, match="lr_zero_point=0: nothing would train"):
        bkd(teacher, calib, **zero, lr_zero_point=0.0)
    bkd(teacher, calib, **zero, lr_zero_point=0.05)  # only the zero-points train: allowed


@pytest.mark.parametrize(("bad", "message"), [(-0.1, "must be >= 0"), (float("inf"), "finite")])
def test_lr_zero_point_out_of_range_is_refused(teacher, calib, bad: float, message: str):
    with pytest.raises(ValueError, match=f"distill.lr_zero_point=.*{message}"):
        bkd(teacher, calib, lr_zero_point=bad)


@pytest.mark.parametrize("cls", ["bkd", "model_kd"])
def test_adam_eps_reaches_every_group_and_a_bad_one_is_refused(teacher, calib, cls: str):
    """A gradient of 1e-8 (an activation step size's, LSQ-scaled) moves a parameter half a rate at ε = 1e-8 and
    nearly a whole one at 1e-12."""

    def build(**kw):
        if cls == "bkd":
            return bkd(teacher, calib, **kw)
        return ModelDistillation(teacher, make_student(teacher, calib), calib, progress=False, **LRS, **kw)

    assert all(g["eps"] == 1e-8 for g in build().make_adam().param_groups)  # the default: torch's
    opt = build(adam_eps=1e-12).make_adam()
    assert all(g["eps"] == 1e-12 for g in opt.param_groups)
    moved = {}
    for eps in (1e-8, 1e-12):
        p = torch.nn.Parameter(torch.zeros(1))
        adam = torch.optim.Adam([p], lr=1.0, eps=eps)
        p.grad = torch.full((1,), 1e-8)
        adam.step()
        moved[eps] = -float(p)
    assert moved[1e-8] == pytest.approx(0.5, rel=1e-3) and moved[1e-12] == pytest.approx(1.0, rel=1e-3)
    for bad in (0.0, -1e-8, float("nan")):
        with pytest.raises(ValueError, match=r"distill.adam_eps=.* must be a finite number > 0"):
            build(adam_eps=bad)


def test_model_kd_takes_the_relative_rate(teacher, calib):
    kd = ModelDistillation(teacher, make_student(teacher, calib), calib, progress=False, **LRS, lr_act_step_rel=0.02)
    groups = {g["name"]: g for g in kd.make_adam().param_groups}
    assert groups["act_qparams@rel"]["relative"] and groups["act_qparams@rel"]["lr"] == 0.02


def test_bkd_with_relative_activation_step_sizes_trains(teacher, calib):
    module = bkd(teacher, calib, iters=3, lr_act_step_rel=0.01)
    calibrate_student(module.student, calib, 8, progress=False)  # the fit then keeps these starting step sizes
    before = {n: q.scale.detach().clone() for n, q in act_quantizers(module.student)}
    fit(module)
    moved = [n for n, q in act_quantizers(module.student) if not torch.equal(q.scale, before[n])]
    assert moved and all(bool((q.scale > 0).all()) for _, q in act_quantizers(module.student))
    ratio = [((q.scale - before[n]).abs() / before[n]).max().item() for n, q in act_quantizers(module.student)]
    assert max(ratio) < 0.05  # 3 steps at ~1% of itself each (cosine: less), whatever the step size's size


def test_qdrop_is_on_in_training_steps_only_and_changes_the_student(teacher, calib):
    class DropWatch(pl.Callback):
        seen: list[float] = []

        def on_before_backward(self, trainer, module, loss) -> None:
            self.seen.append(step_context(module.student).drop_prob)

    students = []
    for p in (0.0, 0.5):
        module, watch = bkd(teacher, calib, iters=2, act_drop_prob=p), DropWatch()
        watch.seen = []
        fit(module, [watch])
        assert watch.seen == [p] * module.max_steps  # every training step ran with it ...
        assert step_context(module.student).drop_prob == 0.0  # ... and it is off once distillation ends
        students.append(module.student.state_dict())
    assert any(not torch.equal(students[0][k], students[1][k]) for k in students[0])


class LrWatch(pl.Callback):
    """Records every group's (learning rate, base rate) after each training step."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[float, float]]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps.append([(g["lr"], g["base_lr"]) for g in module.optimizers().param_groups])


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
@pytest.mark.parametrize("method", ["bkd", "model_kd"])
def test_learning_rate_follows_the_schedule_within_each_block(teacher, calib, method: str, schedule: str):
    """cosine: base · (1 + cos(π i / n)) / 2 at step i of a block's n (BKD) or of the run's n (model_kd)."""
    iters = 4
    if method == "bkd":
        module = bkd(teacher, calib, iters=iters, lr_schedule=schedule)
        n_runs = len(module.blocks)
    else:
        module = ModelDistillation(teacher, make_student(teacher, calib), calib, iters=iters, batch_size=8,
                                   progress=False, lr_schedule=schedule, **LRS)  # fmt: skip
        n_runs = 1
    watch = LrWatch()
    fit(module, [watch])
    assert len(watch.steps) == n_runs * iters
    for step, groups in enumerate(watch.steps):
        i = step % iters
        factor = (1 + math.cos(math.pi * i / iters)) / 2 if schedule == "cosine" else 1.0
        assert all(base > 0 for _, base in groups)
        assert [lr for lr, _ in groups] == pytest.approx([base * factor for _, base in groups], rel=1e-6), step


def test_bkd_trains_each_block_and_only_that_block(teacher, calib):
    module = bkd(teacher, calib, iters=10)
    watch = ParamWatch()
    fit(module, [watch])
    assert len(module.history) == len(module.blocks) == 17
    for k, changed in watch.changed:
        assert changed and changed <= block_param_names(module, k), module.blocks[
            k
        ].name  # only block k moves while it trains
    # the blocks' MSE to the teacher on the whole calibration set goes down (10 Adam steps: not always for blocks
    # already near their quantization noise floor, e.g. the 8-bit conv_in)
    better = [h["mse_after"] < h["mse_before"] for h in module.history]
    assert sum(better) >= 0.8 * len(better), module.history
    assert sum(h["mse_after"] for h in module.history) < 0.95 * sum(h["mse_before"] for h in module.history)
    assert not any(p.requires_grad for p in module.student.parameters())


def test_log_every_n_steps_zero_logs_each_blocks_last_step_only(teacher, calib):
    """Lightning's "never log" (and what trainer.barebones sets) divided by zero in every training step."""
    module = bkd(teacher, calib, iters=3)
    logged: list[dict] = []
    module.log_block = lambda values, step: logged.append(values)
    fit(module, log_every_n_steps=0)
    assert len(module.history) == len(module.blocks)
    losses = [key for values in logged for key in values if key.startswith("block/") and key.endswith("/loss")]
    assert losses == [f"block/{k:02d}/loss" for k in range(len(module.blocks))]


ADAROUND = {"lr_rounding": 0.1, "lr_weight": 0, "lr_weight_qparams": 0}  # weights and their step sizes fixed


@pytest.mark.parametrize("options", [{}, {"act_drop_prob": 0.5}, ADAROUND])
def test_resume_after_a_crash_gives_the_same_student(teacher, calib, tmp_path, options: dict):
    def run(run_dir: Path, fail_at_block: int | None = None, logged: list | None = None) -> BlockwiseDistillation:
        module = bkd(teacher, calib, run_dir, iters=2, fingerprint="cfg", **options)
        if logged is not None:
            module.log_block = lambda values, step: logged.append((step, values))
        callbacks = [WeightDilation(), TemporalParallelQuantizer()]
        if fail_at_block is not None:
            callbacks.append(Crash(fail_at_block * module.iters_per_block))
        fit(module, callbacks)
        return module

    class Crash(pl.Callback):
        def __init__(self, step: int) -> None:
            self.step = step

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if int(batch[0]) == self.step:
                raise RuntimeError("killed")

    straight = run(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "resumed", fail_at_block=5)
    assert json.loads((tmp_path / "resumed" / "checkpoints" / "last.json").read_text())["finished_blocks"] == 5
    logged: list[tuple[int, dict]] = []
    resumed = run(tmp_path / "resumed", logged=logged)
    assert resumed.start_step == 5 * 2
    # the loss curve goes on at the run's own steps (Lightning's own step counter starts again at 0)
    assert [step for step, values in logged if "distill/loss" in values] == list(range(10, 34))
    a, b = straight.student.state_dict(), resumed.student.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(q.num_steps == 3 for _, q in act_quantizers(resumed.student))
    assert resumed.history == straight.history
    assert list(resumed.block_seconds) == list(straight.block_seconds) == resumed.block_names  # blocks 0-4 too
    assert step_context(resumed.student).drop_prob == 0.0  # QDrop is off once distillation ends

    other = bkd(teacher, calib, tmp_path / "resumed", iters=2, fingerprint="another config")
    with pytest.raises(CheckpointError, match="different configuration"):
        fit(other, [TemporalParallelQuantizer()])


def checkpointed_student(teacher, calib, module, root: Path) -> torch.nn.Module:
    """A fresh student loaded from the last checkpoint under `root` of a run stopped in block 3: three blocks kept."""
    fresh = make_student(teacher, calib)
    for _, q in act_quantizers(fresh):
        q.initialized = True  # shapes match; values come from the checkpoint
    assert load_block_checkpoint(root / "checkpoints", fresh, module.block_names, "")["finished_blocks"] == 3
    return fresh


def test_non_finite_loss_names_the_block_and_keeps_the_checkpoint(teacher, calib, tmp_path):
    module = bkd(teacher, calib, tmp_path, iters=1)

    class Poison(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if int(batch[0]) == 3 * module.iters_per_block:  # first step of block 3
                block = module.student.get_submodule(module.blocks[3].modules[0])
                weight = next(p for n, p in block.named_parameters() if n.endswith(".weight"))
                weight.data.view(-1)[0] = float("nan")

    with pytest.raises(NonFiniteLossError, match=r"block 3 \(") as err:
        fit(module, [Poison()])
    assert module.blocks[3].name in str(err.value) and "step 0/1" in str(err.value)
    assert "last good checkpoint" in str(err.value)
    fresh = checkpointed_student(teacher, calib, module, tmp_path)
    assert all(bool(torch.isfinite(p).all()) for p in fresh.parameters())


@pytest.mark.parametrize("poisoned", [3, 0])
def test_a_step_that_leaves_non_finite_parameters_stops_the_block_too(teacher, calib, tmp_path, poisoned):
    """A finite loss whose update overflows (NaN gradients, a huge rate) leaves NaN weights: named, with the advice;
    the last good checkpoint only where one was written (none before block 0 finishes; it named a missing file)."""
    module = bkd(teacher, calib, tmp_path, iters=1)

    class PoisonGrad(pl.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
            if module._block == poisoned:
                block = module.student.get_submodule(module.blocks[poisoned].modules[0])
                weight = next(p for n, p in block.named_parameters() if n.endswith(".weight"))
                weight.grad.fill_(float("nan"))

    match = rf"block {poisoned} \(.*\) left non-finite parameters .*lower learning rates"
    with pytest.raises(NonFiniteLossError, match=match) as err:
        fit(module, [PoisonGrad()])
    assert ("last good checkpoint" in str(err.value)) == (poisoned > 0) == module.checkpoint_path.is_file()
    if poisoned == 3:
        checkpointed_student(teacher, calib, module, tmp_path)


def test_model_kd_stops_when_its_last_step_leaves_non_finite_parameters(teacher, calib):
    """Each step's loss catches what the step before broke, but nothing checked after the last (a saved NaN student)."""
    kd = ModelDistillation(teacher, make_student(teacher, calib), calib, iters=2, batch_size=8, progress=False, **LRS)

    class PoisonLastGrad(pl.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
            if trainer.global_step == kd.iters - 1:
                module.student.conv_in.weight.grad.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"whole-model distillation's last step \(2/2\) left non-finite "
                                                 r"parameters \['conv_in.weight'\].*lower learning rates"):  # fmt: skip
        fit(kd, [PoisonLastGrad()])


def test_model_kd_and_no_distillation(teacher, calib):
    kd = ModelDistillation(teacher, make_student(teacher, calib), calib, iters=4, batch_size=8, progress=False, **LRS)
    before = {n: p.clone() for n, p in kd.student.named_parameters()}
    fit(kd)
    changed = [n for n, p in kd.student.named_parameters() if not torch.equal(p, before[n])]
    assert "conv_in.weight" in changed and "conv_out.act_quantizer.scale" in changed
    assert len(changed) > 0.9 * len(before)  # the whole model trains at once

    none = NoDistillation(teacher, make_student(teacher, calib), calib, calib_batch_size=8, progress=False)
    before = {n: p.clone() for n, p in none.student.named_parameters()}
    tpq = TemporalParallelQuantizer()
    fit(none, [tpq])
    assert tpq.stats is not None and all(q.initialized and q.num_steps == 3 for _, q in act_quantizers(none.student))
    acts = {id(p) for _, q in act_quantizers(none.student) for p in q.parameters()}
    assert all(torch.equal(p, before[n]) for n, p in none.student.named_parameters() if id(p) not in acts)


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (BlockwiseDistillation, {"iters_per_block": 0}, "iters_per_block"),
        (BlockwiseDistillation, {"batch_size": 0}, "batch_size"),
        (BlockwiseDistillation, {"lr_schedule": "linear"}, "lr_schedule"),
        (BlockwiseDistillation, {"act_drop_prob": 1.0}, "act_drop_prob"),
        (BlockwiseDistillation, {"act_drop_prob": -0.1}, "act_drop_prob"),
        (BlockwiseDistillation, {"act_drop_prob": float("nan")}, "act_drop_prob"),
        (BlockwiseDistillation, {"dampen": -1.0}, "dampen"),
        (BlockwiseDistillation, {"dampen": float("nan")}, "dampen"),
        (BlockwiseDistillation, {"dampen": float("inf")}, "dampen"),
        (BlockwiseDistillation, {"freeze": 1.0}, "freeze"),
        (BlockwiseDistillation, {"freeze": float("nan")}, "freeze"),
        (ModelDistillation, {"iters": 0}, "iters"),
        (ModelDistillation, {"batch_size": 0}, "batch_size"),
        (ModelDistillation, {"lr_schedule": "step"}, "lr_schedule"),
        (BlockwiseDistillation, {"lr_act_qparams": -1e-4}, "lr_act_qparams"),
        (BlockwiseDistillation, {"lr_weight": float("nan")}, "lr_weight"),  # would drop the group: weights frozen
        (ModelDistillation, {"lr_weight_qparams": float("inf")}, "lr_weight_qparams"),
        (BlockwiseDistillation, {"lr_weight": 0, "lr_weight_qparams": 0, "lr_act_qparams": 0}, "lr_weight"),
        (BlockwiseDistillation, {"lr_bits": 1}, "lr_bits"),
        (ModelDistillation, {"lr_bits": "4"}, "lr_bits"),
        (ModelDistillation, {"lr_bits": 4.0}, "lr_bits"),
    ],
)
def test_bad_training_settings_name_the_field(teacher, calib, cls, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"{field}="):
        cls(teacher, make_student(teacher, calib), calib, **kwargs)


class StartState(pl.Callback):
    """The student's parameters once fit has calibrated it, before any block trains."""

    def on_train_start(self, trainer, module) -> None:
        self.state = {n: p.detach().clone() for n, p in module.student.named_parameters()}


@pytest.mark.parametrize("revert_worse", [True, False])
def test_a_block_that_training_makes_worse_is_put_back(teacher, calib, revert_worse: bool, caplog):
    """Three constant-rate steps raise some blocks' MSE (11 of 17 here): each such block is exactly as before
    training when revert_worse is on, the others (and all of them with it off) have moved. The message says by how
    much (with 3 digits, 'from 0.214 to 0.214' had read as no rise)."""
    rates = dict(lr_weight=1e-3, lr_weight_qparams=1e-3, lr_act_qparams=1e-3, lr_schedule="constant")
    module = bkd(teacher, calib, iters=3, revert_worse=revert_worse, **rates)
    start = StartState()
    with caplog.at_level(logging.INFO, logger="dq.distill.bkd"):
        fit(module, [start])
    rises = [float(m) for m in re.findall(r"training raised its MSE from \S+ to \S+ \(\+(\S+)%\)", caplog.text)]
    expected = [100 * (h["mse_trained"] / h["mse_before"] - 1) for h in module.history if h["kept"] == "untrained"]
    assert rises == pytest.approx(expected, rel=0.05) and all(r > 0 for r in rises)
    params = dict(module.student.named_parameters())
    worse = [k for k, h in enumerate(module.history) if h["mse_trained"] > h["mse_before"]]
    assert 0 < len(worse) < len(module.blocks), module.history
    for k, h in enumerate(module.history):
        unchanged = all(torch.equal(params[n], start.state[n]) for n in block_param_names(module, k))
        reverted = revert_worse and k in worse
        assert unchanged == reverted, h["block"]
        assert h["kept"] == ("untrained" if reverted else "trained")
        assert h["mse_after"] == (h["mse_before"] if reverted else h["mse_trained"])
        if reverted:  # the block is back where it began: its MSE over the calibration set is the starting one
            module._cache, module._cache_steps = module.capture(module.blocks[k])
            assert module.block_mse(k) == pytest.approx(h["mse_before"], rel=1e-6)


@pytest.mark.parametrize("revert_worse", [False, True])
def test_adaround_chooses_each_weights_rounding_and_leaves_an_ordinary_student(teacher, calib, revert_worse: bool):
    """`lr_rounding`: weights and their step sizes frozen, each weight learns to round up or down; a block ends with
    its choice written into its latent weights as grid values, and the roundings gone."""
    rates = dict(lr_weight=0, lr_weight_qparams=0, lr_act_qparams=1e-4, lr_rounding=0.1)
    module = bkd(teacher, calib, iters=6, revert_worse=revert_worse, **rates)
    start = StartState()
    fit(module, [start])
    layers = [m for m in module.student.modules() if isinstance(getattr(m, "weight_quantizer", None), UniformQuantizer)]
    assert all(m.weight_quantizer.rounding is None for m in layers)
    assert set(module.student.state_dict()) == set(make_student(teacher, calib).state_dict())
    shares = [h["rounded_otherwise"] for h in module.history]
    assert len(shares) == len(module.blocks) and max(shares) > 0 and all(0 <= x < 0.5 for x in shares)
    params = dict(module.student.named_parameters())
    for k, h in enumerate(module.history):
        for name in module.blocks[k].modules:
            for n, m in module.student.get_submodule(name).named_modules(prefix=name):
                if m not in layers:
                    continue
                w, w0, wq = params[n + ".weight"], start.state[n + ".weight"], m.weight_quantizer
                if h["kept"] == "untrained":  # put back: the latent weights as they were, rounded to nearest again
                    assert torch.equal(w, w0), n
                else:  # each code the chosen one, at most a step from nearest; the latent weight on the grid
                    assert (wq.codes(w) - wq.codes(w0)).abs().max() <= 1, n
                    torch.testing.assert_close(m.quantized_weight(), w, atol=1e-6, rtol=0)
    kept = {h["kept"] for h in module.history}
    assert kept == ({"trained", "untrained"} if revert_worse else {"trained"})


def test_adaround_regulariser_joins_the_loss_after_warmup(teacher, calib):
    module = bkd(teacher, calib, iters=10, lr_rounding=0.1, rounding_reg=1e6, lr_weight=0, lr_weight_qparams=0)
    losses: list[tuple[int, float]] = []
    step = module.training_step

    def record(batch, batch_idx):
        loss = step(batch, batch_idx)
        k, i = divmod(int(batch[0]), module.iters_per_block)
        if k == 2:
            losses.append((i, float(loss)))
        return loss

    module.training_step = record
    fit(module)
    assert [i for i, _ in losses] == list(range(10))
    # BRECQ counts steps from 1 and starts the regulariser at step 0.2 n: here from the second step (i = 1) on
    warm, regularised = [v for i, v in losses if i < 1], [v for i, v in losses if i >= 1]
    assert max(warm) < 1 < min(regularised)  # λ = 1e6: the regulariser dominates once β is set
    with pytest.raises(ValueError, match="rounding_reg=-1"):
        bkd(teacher, calib, lr_rounding=0.1, rounding_reg=-1)
    with pytest.raises(ValueError, match="lr_rounding=nan"):
        bkd(teacher, calib, lr_rounding=float("nan"))
    for rates in ({"lr_weight": 1e-4, "lr_weight_qparams": 0}, {"lr_weight": 0, "lr_weight_qparams": 1e-4}):
        with pytest.raises(ValueError, match="AdaRound learns each weight's rounding with the weights and their step"):
            bkd(teacher, calib, lr_rounding=0.1, **rates)


def test_adaround_regulariser_weight_is_brecqs_lambda_over_the_output_channels(teacher, calib, monkeypatch):
    """BRECQ's reconstruction loss sums the squared error over dim 1 and averages the rest (`lp_loss`), C times dq's
    mean: its λ becomes λ / C, C the block output's size along dim 1."""
    module = bkd(teacher, calib, iters=10, rounding_reg=0.5, **ADAROUND)
    channels: list[int] = []  # C of the block at each step with the regulariser on

    def unit_regulariser(roundings, beta):
        channels.append(module._cache.output.shape[1])
        return sum(r.alpha.sum() * 0 for r in roundings) + 1.0

    monkeypatch.setattr("dq.distill.bkd.rounding_loss", unit_regulariser)
    mse = module.block_loss
    module.block_loss = lambda k, idx: mse(k, idx) * 0
    losses: list[tuple[int, float]] = []
    step = module.training_step

    def record(batch, batch_idx):
        loss = step(batch, batch_idx)
        losses.append((int(batch[0]) % module.iters_per_block, float(loss)))
        return loss

    module.training_step = record
    fit(module)
    assert all(loss == 0 for i, loss in losses if i == 0)  # warm-up: steps below 0.2 n, counted from 1
    regularised = [loss for i, loss in losses if i > 0]
    assert len(regularised) == len(channels) == 9 * len(module.blocks) and len(set(channels)) > 1
    assert regularised == pytest.approx([0.5 / c for c in channels])


def test_a_calibration_set_of_another_schedule_is_refused(teacher, calib):
    """Each pair's step index picks its per-step ranges: it must index the table the student was quantized for."""
    student = copy.deepcopy(teacher)
    quantize_model(student, QuantSpec(weight_bits=4, act_bits=8), calib.table.flip(0))
    with pytest.raises(ValueError, match=r"calibration set was drawn for the timesteps \[.*student was quantized"):
        BlockwiseDistillation(teacher, student, calib, iters_per_block=1, progress=False, **LRS)


def test_a_damaged_block_checkpoint_is_named_not_a_traceback(tmp_path):
    """A checkpoint whose header reads but whose contents do not fit (a count that is no count, another model's
    tensors) was a RuntimeError / ValueError from deep inside the resume."""
    from conftest import tiny_unet

    from dq.distill.checkpoint import save_block_checkpoint

    model, blocks = tiny_unet(), ["a", "b"]
    save_block_checkpoint(tmp_path, model, "abc", blocks, "f")  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match=r"finished_blocks='abc' is not a count of its 2 blocks"):
        load_block_checkpoint(tmp_path, model, blocks, "f")
    save_block_checkpoint(tmp_path, tiny_unet(block_out_channels=(16, 32)), 1, blocks, "f")
    with pytest.raises(CheckpointError, match=r"does not fit the student \(Error\(s\) in loading state_dict"):
        load_block_checkpoint(tmp_path, model, blocks, "f")
    save_block_checkpoint(tmp_path, model, 2, blocks, "f")
    assert load_block_checkpoint(tmp_path, model, blocks, "f")["finished_blocks"] == 2
