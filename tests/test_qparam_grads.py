"""experiments/qparam_grads.py: the gradients of a trained student's step sizes, against autograd by hand."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, load_script
from omegaconf import OmegaConf
from test_train import fast

from dq.models import load_teacher
from dq.quant import act_quantizers, load_quantized
from dq.student import calibration_set
from dq.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_printed_statistics_are_those_of_the_step_size_gradients(tiny_teacher_dir: Path, tmp_path: Path,
                                                                     monkeypatch, capsys) -> None:  # fmt: skip
    run = tmp_path / "run"
    cfg = compose_cfg("train", fast(tiny_teacher_dir), run)
    train(cfg)
    (run / ".hydra").mkdir()  # what the Hydra app writes beside its run
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    monkeypatch.setattr(sys, "argv", ["qparam_grads.py", str(run), "--pairs", "6"])
    load_script("qparam_grads").main()
    out = capsys.readouterr().out
    act = re.search(r"activation step sizes: (\d+) gradients, median (\S+), quartiles (\S+) / (\S+), (\d+)% below", out)
    assert act and re.search(r"weight step sizes: \d+ gradients", out) and re.search(r"loss \S+ on 6 calibration", out)

    teacher, scheduler = load_teacher(cfg.model.path)  # by hand: the same six pairs, loss and gradients
    calib = calibration_set(cfg, teacher, scheduler)
    student = load_quantized(run / "student").eval()
    idx = [round(i * (len(calib) - 1) / 5) for i in range(6)]
    x, t = calib.x_t[idx], calib.timesteps[idx]
    scales = [q.scale for _, q in act_quantizers(student)]
    with torch.no_grad():
        target = teacher.eval()(x, t).sample
    grads = torch.autograd.grad(((student(x, t).sample - target) ** 2).mean(), scales, allow_unused=True)
    g = torch.cat([gr.flatten() for gr in grads if gr is not None]).abs().double()
    g = g[g > 0]
    assert int(act[1]) == g.numel() > 0
    s, n = g.sort().values, g.numel()
    median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    assert float(act[2]) == pytest.approx(float(median), rel=2e-3)
    assert float(act[3]) == pytest.approx(float(g.quantile(0.25)), rel=2e-3)
    assert int(act[5]) == round(100 * float((g < 1e-8).double().mean()))
