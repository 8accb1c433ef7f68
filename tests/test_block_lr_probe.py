"""experiments/block_lr_probe.py: one block of a saved run retrained, against a hand-written Adam loop on hooks."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg, load_script, run_script_main
from omegaconf import OmegaConf

from dq.distill.bkd import block_seed
from dq.models import load_teacher
from dq.quant import act_quantizers, expand_act_quantizers, load_quantized, save_quantized
from dq.quant.layers import QuantLayerMixin
from dq.quant.quantizer import SCALE_MIN, TemporalQuantizer, UniformQuantizer
from dq.student import build_student, calibration_set

pytestmark = pytest.mark.usefixtures("one_thread")

probe = load_script("block_lr_probe")

BLOCK = "up_blocks.0.attentions.0"
K = 10  # its place among the tiny UNet's 17 BKD blocks (time_embedding, conv_in, down 0 resnet, ...)
N_ITERS = 11  # the loss curve then holds steps 0 and 10


def make_run(tmp_path: Path, tiny: Path, *extra: str) -> Path:
    """A finished-looking dq-train run: config, a calibrated TPQ student with spread per-step steps, a history."""
    run = tmp_path / "run"
    overrides = [
        f"model.path={tiny}", "model.sample_shape=[1,8,8]", "model.num_inference_steps=3", "calib.n_calib=12",
        "calib.batch_size=12", f"distill.iters_per_block={N_ITERS}", "distill.batch_size=4", "eval.progress=false",
        *extra,
    ]  # fmt: skip
    cfg = compose_cfg("train", overrides, run)
    teacher, scheduler = load_teacher(tiny)
    student, _ = build_student(cfg, teacher, scheduler)
    expand_act_quantizers(student)  # what the TPQ callback leaves: one (Δ, z) per step
    with torch.no_grad():
        for _, q in act_quantizers(student):
            q.scale.mul_(torch.tensor([1.0, 0.5, 2.0]))  # the first step neither the least nor the most
    save_quantized(student, run / "student")
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    (run / "checkpoints").mkdir()
    history = [{"block": "conv_in", "kept": "trained"}, {"block": BLOCK, "kept": "untrained"}]
    (run / "checkpoints" / "last.json").write_text(json.dumps({"finished_blocks": 17, "history": history}))
    return run


class _Stop(Exception):
    pass


def block_io(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> tuple[tuple, dict, torch.Tensor | None]:
    """(args, kwargs) the model passes to BLOCK and its output, by hooks on a whole forward cut short after it."""
    box: dict = {}

    def pre(_m, args, kwargs):
        box["args"], box["kwargs"] = args, kwargs

    def post(_m, _args, out):
        box["out"] = out
        raise _Stop

    block = model.get_submodule(BLOCK)
    hooks = [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(x, t)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return box["args"], box["kwargs"], box["out"]


def reference(run: Path, lrs: tuple[float, float, float], factor: float, rel: float | None, cosine: bool,
              frozen: str | None = None) -> tuple[float, float, list[float]]:  # fmt: skip
    """(MSE before, MSE after, losses of steps 0 and 10): plain Adam on BLOCK's parameters, block inputs re-captured
    from the student for every minibatch, the teacher's block output as target; `factor` scales the rates of
    quantized layers' weights, biases and weight steps; `rel`: activation steps move by Adam on log Δ."""
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    teacher, scheduler = load_teacher(cfg.model.path)
    calib = calibration_set(cfg, teacher, scheduler)
    student = load_quantized(run / "student").requires_grad_(False)
    x, t = calib.x_t, calib.timesteps
    target = block_io(teacher, x, t)[2]
    block = student.get_submodule(BLOCK)

    def block_mse() -> float:
        return F.mse_loss(block_io(student, x, t)[2], target).item()

    lr_w, lr_wq, lr_a = lrs
    rate: dict[int, float] = {}
    relative: set[int] = set()
    steps: list[torch.Tensor] = []  # every step size: kept at SCALE_MIN or above, as fake quantization clamps them
    for m in block.modules():
        if isinstance(m, QuantLayerMixin):
            rate[id(m.weight)] = rate[id(m.bias)] = lr_w * factor
            rate[id(m.weight_quantizer.scale)] = lr_wq * factor
        if isinstance(m, UniformQuantizer | TemporalQuantizer):
            steps.append(m.scale)
        if isinstance(m, UniformQuantizer):
            rate.setdefault(id(m.scale), lr_wq)
            rate[id(m.zero_point)] = lr_wq
        if isinstance(m, TemporalQuantizer):
            rate[id(m.zero_point)] = lr_a
            rate[id(m.scale)] = lr_a if rel is None else rel
            if rel is not None:
                relative.add(id(m.scale))
    params = [p for n, p in block.named_parameters() if not (frozen and frozen in n)]
    for p in params:
        p.requires_grad_(True)
    groups = [{"params": [p], "lr": rate.get(id(p), lr_w)} for p in params]
    opt = torch.optim.Adam(groups)
    for g in opt.param_groups:
        g["base"] = g["lr"]
    before = block_mse()
    batches = torch.randint(len(t), (N_ITERS, 4), generator=torch.Generator().manual_seed(block_seed(0, K)))
    losses = []
    for i, idx in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = g["base"] * (0.5 * (1 + math.cos(math.pi * i / N_ITERS)) if cosine else 1.0)
        args, kwargs, _ = block_io(student, x[idx], t[idx])  # also sets the step index of this minibatch
        loss = F.mse_loss(block(*args, **kwargs), target[idx])
        opt.zero_grad()
        loss.backward()
        old = {id(p): p.detach().clone() for p in params if id(p) in relative}
        opt.step()
        with torch.no_grad():
            for p in params:
                if id(p) in relative:
                    p.copy_(old[id(p)] * torch.exp(p - old[id(p)]))
            for p in steps:
                p.clamp_(min=SCALE_MIN)
        losses.append(loss.item())
    return before, block_mse(), losses[::10]


def parse(text: str, setting: str) -> tuple[float, float, list[float]]:
    m = re.search(rf"^{re.escape(setting)}: mse (\S+) -> (\S+); loss every 10 steps (.+)$", text, flags=re.M)
    assert m, text
    return float(m[1]), float(m[2]), [float(v) for v in m[3].split()]


def check(got: tuple[float, float, list[float]], want: tuple[float, float, list[float]]) -> None:
    assert got[0] == pytest.approx(want[0], rel=6e-4)  # printed to 4 significant digits
    assert got[1] == pytest.approx(want[1], rel=6e-4)
    assert got[2] == pytest.approx(want[2], rel=6e-3)  # 3 digits


def test_retrains_the_block_like_a_hand_written_adam_loop(tiny_teacher_dir, tmp_path, monkeypatch, capsys) -> None:
    """Reference: a hand Adam loop on hooks under a hand cosine; step sizes read off the saved student."""
    run = make_run(tmp_path, tiny_teacher_dir)
    settings = ["1e-3,1e-3,1e-4", "3e-3,0,2e-3"]
    text = run_script_main(probe, monkeypatch, capsys, run, BLOCK, *settings)
    saved = load_quantized(run / "student")
    for name, q in act_quantizers(saved.get_submodule(BLOCK)):
        lo, hi = sorted(q.scale.detach().tolist())[::2]  # three per-step values
        assert f"{name}: 8-bit, step size {lo:.3g} .. {hi:.3g} over 3 steps" in text
    assert "the run's schedule: cosine; activation step sizes: at lr_act_qparams" in text
    results = {s: parse(text, s) for s in settings}
    for setting, lrs in zip(settings, [(1e-3, 1e-3, 1e-4), (3e-3, 0.0, 2e-3)], strict=True):
        want = reference(run, lrs, factor=1.0, rel=None, cosine=True)
        check(results[setting], want)
        assert want[1] != pytest.approx(want[0], rel=1e-2)  # the training moved the block
    assert results[settings[0]][1] != pytest.approx(results[settings[1]][1], rel=1e-2)


def test_bit_scaled_rates_relative_steps_constant_schedule_and_freeze(
    tiny_teacher_dir, tmp_path, monkeypatch, capsys
) -> None:
    """Reference: the hand loop with rates x 15/255 (8-bit), Δ_a moved on log Δ, constant rates, to_v frozen."""
    run = make_run(
        tmp_path, tiny_teacher_dir, "bits=w8a8", "distill.lr_act_step_rel=0.02", "distill.lr_schedule=constant"
    )
    setting = "5e-2,1e-2,1e-3"
    text = run_script_main(probe, monkeypatch, capsys, run, BLOCK, setting, "--freeze", "to_v")
    assert "the run's schedule: constant; activation step sizes: relative rate 0.02" in text
    want = reference(run, (5e-2, 1e-2, 1e-3), factor=15 / 255, rel=0.02, cosine=False, frozen="to_v")
    check(parse(text, setting), want)
    unfrozen = reference(run, (5e-2, 1e-2, 1e-3), factor=15 / 255, rel=0.02, cosine=False)
    assert unfrozen[1] != pytest.approx(want[1], rel=1e-2)  # the freeze is visible at the printed precision


def test_a_block_the_run_kept_trained_is_refused(tiny_teacher_dir, tmp_path, monkeypatch) -> None:
    """Reference: the hand-written history says conv_in was kept trained and does not list mid_block.attentions.0."""
    run = make_run(tmp_path, tiny_teacher_dir)
    monkeypatch.setattr(sys, "argv", ["block_lr_probe.py", str(run), "conv_in", "1e-3,1e-3,1e-4"])
    with pytest.raises(SystemExit, match="conv_in: its history .* says 'trained', not 'untrained'"):
        probe.main()
    monkeypatch.setattr(sys, "argv", ["block_lr_probe.py", str(run), "mid_block.attentions.0", "1e-3,1e-3,1e-4"])
    with pytest.raises(SystemExit, match="says None, not 'untrained'"):
        probe.main()


@pytest.mark.parametrize("setting", ["distill.dampen=1.0", "distill.lr_zero_point=0.05", "distill.act_drop_prob=0.5"])
def test_a_run_trained_with_a_setting_the_probe_leaves_out_is_refused(tiny_teacher_dir, tmp_path, monkeypatch,
                                                                       setting: str) -> None:  # fmt: skip
    """The probe would retrain the block without the run's dampening / zero-point rate / QDrop: refused, named."""
    run = make_run(tmp_path, tiny_teacher_dir, setting)
    monkeypatch.setattr(sys, "argv", ["block_lr_probe.py", str(run), BLOCK, "1e-3,1e-3,1e-4"])
    with pytest.raises(SystemExit, match=f"trained with {re.escape(setting)}: this probe retrains a block without"):
        probe.main()
