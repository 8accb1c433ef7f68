"""experiments/half_precision.py: edge shares, the plain cast and the PSNR table against hand-made references."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, load_script, psnr_by_hand, run_script_main
from omegaconf import OmegaConf
from torch import nn

from dq.models import ddim_sample, load_teacher
from dq.quant import expand_act_quantizers, load_quantized, save_quantized
from dq.quant.layers import QuantLayerMixin, QuantLinear
from dq.quant.quantizer import SCALE_MIN
from dq.quant.spec import QuantizerSpec
from dq.student import build_student

pytestmark = pytest.mark.usefixtures("one_thread")

hp = load_script("half_precision")


def linear(weight: list[list[float]], steps: list[float], zero_points: list[float]) -> QuantLinear:
    """A 4-bit per-channel QuantLinear holding `weight`, with step sizes and zero-points set by hand."""
    w = torch.tensor(weight)
    layer = QuantLinear.from_float(
        nn.Linear(w.shape[1], w.shape[0]), QuantizerSpec(4, granularity="channel"), QuantizerSpec(8)
    )
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.weight_quantizer._assign(torch.tensor(steps), torch.tensor(zero_points))
    return layer.eval()


def test_edge_shares_of_hand_placed_codes(capsys) -> None:
    """Reference: shares counted by hand for hand-placed codes W / Δ (edge distance, reach |code| 2^-11, even)."""
    layer = linear([[0.5, 0.505, 1.2, 4096.25], [-0.25, 0.1, 3.0, -2048.1]], [1.0, 0.5], [8.0, 8.0])
    # codes 0.5 0.505 1.2 4096.25 | -0.5 0.2 6 -4096.2; distance to an edge 0 .005 .3 .25 | 0 .3 .5 .3
    hp.edge_shares(nn.Sequential(layer))
    out = capsys.readouterr().out
    near = 3 / 8  # 0.5, 0.505, -0.5
    cast = 4 / 8  # 0.5, -0.5 (distance 0 < reach), 4096.25 and -4096.2 (reach 2)
    even = (2 + 2**-10 * (0.5 + 0.505 + 1.2 + 0.5 + 0.2 + 6)) / 8  # the two large codes count 1 each
    assert out.strip() == (
        f"latent weights within 0.01 of a step of a rounding edge: {100 * near:.2f} % (evenly spread: 2 %); "
        f"within a float16 cast's reach: {100 * cast:.2f} % (evenly spread: {100 * even:.2f} %)"
    )
    assert f"{100 * even:.2f}" == "25.11"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_plain_cast_takes_codes_of_the_rounded_weights(dtype: torch.dtype) -> None:
    """Reference: codes worked out by hand (3.4995 -> 3.5 -> 4 plain, 3 snapped; -2.5004 -> -2 / -3; 5.4999: 6 / 5)."""
    codes = [3.4995, -2.5004, 0.7, 5.4999]
    layer = linear([[0.5 * c for c in codes]], [0.5], [8.0])
    before = layer.weight.detach().clone()
    plain = hp.plain_cast(nn.Sequential(layer), dtype)[0]
    assert plain.weight.dtype == dtype
    with torch.no_grad():
        assert plain.quantized_weight().float().tolist() == [[0.5 * c for c in (4, -2, 1, 6)]]
    torch.testing.assert_close(layer.weight.detach(), before, rtol=0, atol=0)  # the student is left as it was
    assert layer.weight.dtype == torch.float32
    snapped = copy.deepcopy(layer).to(dtype)
    with torch.no_grad():
        assert snapped.quantized_weight().float().tolist() == [[0.5 * c for c in (3, -3, 1, 5)]]


def make_run(tmp_path: Path, tiny: Path) -> Path:
    """A finished-looking W4A8 run (config + TPQ student); every third latent weight moved just inside a rounding
    edge, as trained weights gather there."""
    run = tmp_path / "run"
    overrides = [
        f"model.path={tiny}", "model.sample_shape=[1,8,8]", "model.num_inference_steps=3", "calib.n_calib=12",
        "calib.batch_size=12", "eval.progress=false",
    ]  # fmt: skip
    cfg = compose_cfg("train", overrides, run)
    teacher, scheduler = load_teacher(tiny)
    student, _ = build_student(cfg, teacher, scheduler)
    expand_act_quantizers(student)
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, QuantLayerMixin):
                step = m.weight_quantizer.scale.reshape(-1, *[1] * (m.weight.ndim - 1))
                edge = step * ((m.weight / step).floor() + 0.5) * (1 - 2**-14)
                m.weight.view(-1)[::3] = edge.reshape(-1)[::3]
    save_quantized(student, run / "student")
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run


def plain_by_hand(student: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The student in `dtype` with each quantized weight set to Δ' (clamp(round(W' / Δ) + round z) - round z): W' the
    latent weight rounded to `dtype`, Δ' the step in `dtype`."""
    model = copy.deepcopy(student).to(dtype)
    for m, cast in zip(student.modules(), model.modules(), strict=True):
        if isinstance(m, QuantLayerMixin):
            q = m.weight_quantizer
            shape = (-1, *[1] * (m.weight.ndim - 1))
            step, z = q.scale.detach().reshape(shape), q.zero_point.detach().reshape(shape).round()
            codes = ((m.weight.detach().to(dtype).float() / step).round() + z).clamp(q.qmin, q.qmax)
            cast.weight.data = ((codes - z) * step.to(dtype).float().clamp_min(SCALE_MIN)).to(dtype)
    return model


def test_main_table_against_samples_and_psnr_by_hand(tiny_teacher_dir, tmp_path, monkeypatch, capsys) -> None:
    """Reference: DDIM samples from seed-0 noise, a plain cast built by formula, PSNR and edge shares by hand."""
    run = make_run(tmp_path, tiny_teacher_dir)
    n = 6
    text = run_script_main(hp, monkeypatch, capsys, run, "--n", n, "--batch-size", 4)

    student = load_quantized(run / "student")
    codes = torch.cat([
        (m.weight / m.weight_quantizer.scale.reshape(-1, *[1] * (m.weight.ndim - 1))).detach().flatten()
        for m in student.modules() if isinstance(m, QuantLayerMixin)
    ])  # fmt: skip
    to_edge = (torch.remainder(codes, 1.0) - 0.5).abs()
    near = float((to_edge < 0.01).double().mean())
    cast = float((to_edge < codes.abs() / 2048).double().mean())
    assert near > 0.3  # the planted third
    assert text.splitlines()[0].startswith(
        f"latent weights within 0.01 of a step of a rounding edge: {100 * near:.2f} % (evenly spread: 2 %); "
        f"within a float16 cast's reach: {100 * cast:.2f} % "
    )

    teacher, scheduler = load_teacher(tiny_teacher_dir)
    noise = torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(0))

    def sample(model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        return ddim_sample(model.eval(), scheduler, noise.to(dtype), 3, 4, progress=False).float()

    t32, s32 = sample(teacher, torch.float32), sample(student, torch.float32)
    rows = {
        m[1]: m.groups()[1:]
        for m in re.finditer(r"^(\w+) +(\S+) +(\S+) +(\S+) +(\S+)$", text, flags=re.M)
        if m[1] in ("float32", "float16", "bfloat16")
    }
    assert f"{n} samples, DDIM-3; PSNR dB to the float32 teacher" in text
    assert rows["float32"] == ("-", f"{psnr_by_hand(s32, t32):.2f}", "-", "-")
    gaps = {}
    for dtype in (torch.float16, torch.bfloat16):
        t = sample(copy.deepcopy(teacher).to(dtype), dtype)
        s = sample(copy.deepcopy(student).to(dtype), dtype)
        plain = sample(plain_by_hand(student, dtype), dtype)
        want = [psnr_by_hand(t, t32), psnr_by_hand(s, t32), psnr_by_hand(plain, t32), psnr_by_hand(s, s32)]
        got = [float(v) for v in rows[str(dtype).removeprefix("torch.")]]
        assert got == pytest.approx(want, abs=0.006), dtype
        gaps[dtype] = abs(want[2] - want[1])
    assert gaps[torch.float16] > 0.5  # the planted edges tell the plain cast from the snapped one


def test_edges_only_stops_before_sampling(tiny_teacher_dir, tmp_path, monkeypatch, capsys) -> None:
    """Reference: only the edge line, no sampling (the teacher path points nowhere, so loading it would fail)."""
    run = make_run(tmp_path, tiny_teacher_dir)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg.model.path = str(tmp_path / "no_teacher")
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    text = run_script_main(hp, monkeypatch, capsys, run, "--edges-only")
    assert len(text.splitlines()) == 1 and text.startswith("latent weights within 0.01 of a step")
