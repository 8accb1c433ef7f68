"""experiments/weight_quant_bias.py: the per-noise-level error of min-max weight quantization, against a teacher whose
weights are rounded by hand and a hand loop over the timestep ranges."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_script
from omegaconf import DictConfig
from torch import nn

from dq.data import load_mnist_split

pytestmark = pytest.mark.usefixtures("one_thread")


def minmax_weights(teacher: nn.Module, bits: int, keep_8bit: tuple[str, ...]) -> nn.Module:
    """A copy of `teacher` with every conv / linear weight rounded to its own row's asymmetric min-max grid (range
    widened to hold 0; 8 bits for `keep_8bit`): w -> Δ (clamp(round(w / Δ) + z, 0, 2^b - 1) - z)."""
    model = copy.deepcopy(teacher)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            qmax = 2 ** (8 if name in keep_8bit else bits) - 1
            w = m.weight.data.reshape(len(m.weight), -1)
            lo, hi = w.amin(1).clamp(max=0)[:, None], w.amax(1).clamp(min=0)[:, None]
            step = (hi - lo) / qmax
            zero = torch.round(-lo / step)
            m.weight.data = (step * (torch.clamp(torch.round(w / step) + zero, 0, qmax) - zero)).reshape(m.weight.shape)
    return model


def test_report_against_hand_rounded_weights_and_a_hand_loop(tiny_teacher_dir: Path, monkeypatch, capsys) -> None:
    """The student's outputs are the teacher's with min-max 4-bit weights (8-bit conv_in / conv_out) and float
    activations; its inputs are the first N training images noised to DDIM-25 timesteps; each range's relative MSE
    and mean shift by a plain loop over the samples in it."""
    wqb = load_script("weight_quant_bias")
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {"teacher": [], "student": []}
    models: dict[str, nn.Module] = {}
    quantize_student = wqb.quantize_student

    def capturing(cfg: DictConfig, teacher: nn.Module, scheduler: Any) -> nn.Module:
        student = quantize_student(cfg, teacher, scheduler)
        for key, model in (("teacher", teacher), ("student", student)):
            models[key] = model
            model.register_forward_hook(lambda m, args, out, key=key: calls[key].append((*args, out.sample)))
        models["scheduler"] = scheduler
        return student

    monkeypatch.setattr(wqb, "quantize_student", capturing)
    n = 40
    monkeypatch.setattr(
        sys, "argv", ["weight_quant_bias.py", "--bits", "w4a8", "--n", str(n), "--teacher", str(tiny_teacher_dir)]
    )
    wqb.main()
    report = json.loads(capsys.readouterr().out)

    ((x_t, t, ref),) = calls["teacher"]
    ((x_s, t_s, out),) = calls["student"]
    assert torch.equal(x_s, x_t) and torch.equal(t_s, t) and len(t) == n
    assert set(t.tolist()) <= set(range(0, 1000, 40))  # DDIM-25's timesteps ("leading" spacing)
    abar = models["scheduler"].alphas_cumprod[t][:, None, None, None]
    x0 = load_mnist_split(0)["train"][0][:n]
    eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()  # the noise added to the first n training images
    assert abs(eps.mean().item()) < 0.05 and eps.std().item() == pytest.approx(1.0, abs=0.05)

    hand = minmax_weights(models["teacher"], 4, ("conv_in", "conv_out"))
    with torch.no_grad():
        torch.testing.assert_close(out, hand(x_t, t).sample, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(out, ref, atol=1e-3)  # 4-bit weights do change the output

    assert report["bits"] == "w4a8" and report["n"] == n
    expected = {}
    for lo in range(0, 1000, 200):
        idx = [i for i in range(n) if lo <= int(t[i]) <= lo + 199]
        err = [out[i] - ref[i] for i in idx]
        rel = sum(e.pow(2).sum() for e in err) / sum(ref[i].pow(2).sum() for i in idx)
        shift = sum(e.sum() for e in err) / (len(idx) * ref[0].numel())
        expected[f"{lo}-{lo + 199}"] = (rel.item(), shift.item())
    assert report["per_t"].keys() == expected.keys()
    for key, (rel, shift) in expected.items():
        assert report["per_t"][key]["rel_mse"] == pytest.approx(rel, abs=1e-5), key
        assert report["per_t"][key]["mean_shift"] == pytest.approx(shift, abs=1e-5), key
