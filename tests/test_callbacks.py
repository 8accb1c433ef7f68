"""Weight Dilation and TPQ callbacks on a quantized tiny UNet, called as the Trainer calls them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from pytorch_lightning.loggers import CSVLogger
from torch.testing import assert_close

from dq.callbacks import TemporalParallelQuantizer, WeightDilation
from dq.distill.calibration import build_calibration_set
from dq.quant import QuantSpec, act_quantizers, quantize_model, set_quant_state, weight_quantizers

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calib(teacher):
    return build_calibration_set(teacher, DDIMScheduler(num_train_timesteps=1000), 24, 4, (1, 8, 8), 0, progress=False)


def quantized(teacher: UNet2DModel, table: torch.Tensor, act_init: str = "minmax") -> UNet2DModel:
    student = copy.deepcopy(teacher)
    quantize_model(student, QuantSpec(weight_bits=4, act_bits=8, act_init=act_init), table)
    return student


def fake_trainer(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(
        loggers=[CSVLogger(tmp_path, name="csv", version="")], default_root_dir=str(tmp_path), is_global_zero=True
    )


def test_weight_dilation_keeps_function_and_reports(teacher, calib, tmp_path):
    student = quantized(teacher, calib.table)
    scales = {n: q.scale.clone() for n, q in weight_quantizers(student)}
    x, t = calib.x_t[:6], calib.timesteps[:6]
    ref = teacher(x, t).sample
    trainer = fake_trainer(tmp_path)
    cb = WeightDilation()
    cb.on_fit_start(trainer, SimpleNamespace(student=student))

    set_quant_state(student, weights=False, acts=False)
    assert_close(student(x, t).sample, ref, atol=1e-5, rtol=1e-4)  # (X / s) * (s W) == X W
    for n, q in weight_quantizers(student):
        assert_close(q.scale, scales[n], atol=0, rtol=1e-6)  # row ranges (Δ_w) unchanged
    report = json.loads((tmp_path / "dilation.json").read_text())
    assert report == json.loads(json.dumps(cb.report))
    assert report["summary"]["dilated_share"] > 0 and report["summary"]["s_max"] > 1
    layer = report["layers"]["down_blocks.1.attentions.0.to_q"]
    assert layer["group"] == [f"down_blocks.1.attentions.0.to_{p}" for p in "qkv"]  # shared s
    assert layer["fold"].startswith("foldable into down_blocks.1.attentions.0.group_norm")
    assert report["layers"]["down_blocks.0.resnets.0.conv2"]["fold"].startswith("not foldable")
    dilated = [m.in_scale for _, m in student.named_modules() if hasattr(m, "in_scale")]
    assert any(bool((s < 1).any()) for s in dilated) and all(bool((s <= 1).all()) for s in dilated)
    trainer.loggers[0].save()
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "wd/s_mean" in header and "wd/down_blocks.0.resnets.0.conv1/dilated_share" in header


def test_tpq_makes_every_act_quantizer_per_step(teacher, calib, tmp_path):
    student = quantized(teacher, calib.table, act_init="mse")
    module = SimpleNamespace(student=student, calib=calib, calib_batch_size=8, progress=False)
    cb = TemporalParallelQuantizer()
    trainer = fake_trainer(tmp_path)
    cb.setup(trainer, module, "fit")
    quantizers = dict(act_quantizers(student))
    assert quantizers and all(q.num_steps == 4 and not q.initialized for q in quantizers.values())
    cb.on_fit_start(trainer, module)
    assert all(q.initialized for q in quantizers.values())
    varying = [n for n, q in quantizers.items() if len(set(q.scale.tolist())) > 1]
    assert len(varying) > 0.8 * len(quantizers)  # each step initialised from its own activations
    assert "down_blocks.1.attentions.0.processor.prob_quantizer" in quantizers  # attention matmuls too
    assert cb.stats["steps"] == 4 and cb.stats["scale_spread_mean"] > 1
    # a sample at step i uses step i's range: quantizing step-0 inputs with step-3 ranges gives other outputs
    x, t = calib.x_t[:2], calib.timesteps[:2]
    out = student(x, t).sample
    for q in quantizers.values():
        q.scale.data[:] = q.scale.data[-1].clone()
        q.zero_point.data[:] = q.zero_point.data[-1].clone()
    assert not torch.allclose(student(x, t).sample, out)
