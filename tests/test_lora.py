"""QALoRA adapters (`dq.quant.lora`, the `lora` callback) and the `efficientdm` baseline built on them."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import conftest
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg
from diffusers import DDIMScheduler
from test_train import fast
from torch import nn
from torch.testing import assert_close

from dq.callbacks import QALoRA, TemporalParallelQuantizer
from dq.distill.base import param_groups
from dq.distill.calibration import build_calibration_set
from dq.errors import ConfigError
from dq.models import load_teacher
from dq.quant import (
    LowRankDelta,
    QuantConv2d,
    QuantizerSpec,
    QuantLinear,
    QuantSpec,
    act_quantizers,
    add_lora,
    load_quantized,
    lora_layers,
    merge_lora,
    quantize_model,
    save_quantized,
    set_quant_state,
    stored_weight,
)
from dq.quant.dilation import dilate_
from dq.train import train

TIMESTEPS = torch.tensor([666, 333, 0])


def conv_layer(seed: int = 0) -> QuantConv2d:
    torch.manual_seed(seed)
    layer = QuantConv2d.from_float(nn.Conv2d(6, 5, 3, padding=1), QuantizerSpec(4, granularity="channel"),
                                   QuantizerSpec(8))  # fmt: skip
    layer.act_quantizer.enabled = False
    return layer


def test_conv_adapter_is_efficientdms_two_convs_folded_into_one_kernel():
    """EfficientDM adds `conv1x1(conv_kxk(x, A), B)` to the conv; the folded `W + B A` kernel gives the same."""
    layer = conv_layer()
    w = layer.weight.detach().clone()
    add_lora(layer, rank=4)
    delta = layer.parametrizations.weight[0]
    with torch.no_grad():
        delta.B.normal_()
    x = torch.randn(2, 6, 7, 7)
    a_kernel = delta.A.detach().view(4, 6, 3, 3)  # r output channels of a 3x3 conv
    b_kernel = delta.B.detach().view(5, 4, 1, 1)  # then a 1x1 conv from r to C_out
    reference = F.conv2d(x, w, padding=1) + F.conv2d(F.conv2d(x, a_kernel, padding=1), b_kernel)
    assert_close(F.conv2d(x, layer.weight.detach(), padding=1), reference, atol=1e-4, rtol=1e-4)


def test_adapters_start_at_zero_train_through_the_quantizer_and_merge_exactly():
    layer = QuantLinear.from_float(nn.Linear(8, 6), QuantizerSpec(4, granularity="channel"), QuantizerSpec(8))
    layer.act_quantizer.enabled = False
    x = torch.randn(3, 8)
    before = layer(x).detach()
    weight = layer.weight
    assert add_lora(layer, rank=32) == 6 * 6 + 6 * 8  # the rank is cut to min(C_out, C_in) = 6
    assert stored_weight(layer) is weight
    assert torch.equal(layer(x), before)  # B = 0: the layer is unchanged, bit for bit
    layer(x).square().sum().backward()  # through Q(W + B A): the STE passes the gradient on to B
    delta = layer.parametrizations.weight[0]
    assert delta.B.grad is not None and delta.B.grad.abs().sum() > 0
    with torch.no_grad():
        delta.B.normal_(std=0.1)
        adapted = layer(x)
        quantized = layer.weight_quantizer(weight + delta.B @ delta.A)  # the plain reference: Q(W + B A)
        assert_close(adapted, F.linear(x, quantized, layer.bias), atol=0, rtol=0)
        assert not torch.equal(adapted, before)
    assert merge_lora(layer) == 1
    assert layer.weight is weight and not hasattr(layer, "parametrizations")  # the same Parameter, now W + B A
    with torch.no_grad():
        assert torch.equal(layer(x), adapted)


def test_an_adapted_weight_is_never_served_from_the_sampling_cache():
    layer = conv_layer()
    add_lora(layer, rank=2)
    layer.eval()
    x = torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        first = layer(x)
        assert layer._wq_cache is None  # a new tensor each access may reuse a freed one's id: no cache at all
        layer.parametrizations.weight[0].B.add_(0.2)
        assert not torch.equal(layer(x), first)


def test_adapters_have_their_own_optimizer_group_and_the_adapted_weight_can_be_frozen():
    model = copy.deepcopy(conftest.tiny_unet())
    quantize_model(model, QuantSpec(weight_bits=8, act_bits=8), timesteps=TIMESTEPS)
    add_lora(model, rank=2)
    adapters = {id(p) for m in model.modules() if isinstance(m, LowRankDelta) for p in m.parameters()}
    groups = param_groups(model, {"weights": 0.0, "lora": 1e-5, "weight_qparams": 1e-6, "act_qparams": 5e-4}, 4)
    by_name = {g["name"]: g for g in groups}
    # 8-bit weights with rates for 4 bits: the adapters of quantized layers scale with the step size, as weights do
    assert {id(p) for p in by_name["lora@w8"]["params"]} == adapters
    assert by_name["lora@w8"]["lr"] == pytest.approx(1e-5 * 15 / 255)
    trained = {id(p) for g in groups for p in g["params"]}
    stored = {id(stored_weight(m)) for _, m in lora_layers(model)}
    assert not trained & stored  # lr_weight 0: W stays frozen
    groups = param_groups(model, {"weights": 1e-3, "lora": 1e-5, "weight_qparams": 1e-6, "act_qparams": 5e-4}, 4)
    scaled = {id(p) for g in groups if g["name"] == "weights@w8" for p in g["params"]}
    assert stored <= scaled  # a trained adapted W takes the 8-bit rate like any latent weight


def test_weight_dilation_dilates_the_adapted_weight():
    layer = conv_layer()
    add_lora(layer, rank=2)
    set_quant_state(layer, weights=False, acts=False)
    with torch.no_grad():
        layer.parametrizations.weight[0].B.normal_(std=0.1)  # a trained adapter: W + B A is what must dilate
    x = torch.randn(2, 6, 5, 5)
    before, adapted = layer(x).detach(), layer.weight.detach().clone()
    s = dilate_([layer], s_max=1e4)
    assert (s > 1).any()
    assert_close(layer.weight.detach(), adapted * s.view(1, -1, 1, 1))  # (W + B A) s
    assert_close(layer(x).detach(), before, atol=1e-5, rtol=1e-5)  # float model: unchanged by dilation


def test_an_unmerged_model_is_not_saved(tmp_path):
    model = copy.deepcopy(conftest.tiny_unet())
    quantize_model(model, QuantSpec(weight_bits=4, act_bits=8), timesteps=TIMESTEPS)
    add_lora(model, rank=2)
    with pytest.raises(ValueError, match="still hold low-rank adapters: merge them"):
        save_quantized(model, tmp_path / "student")
    assert not (tmp_path / "student").exists()
    merge_lora(model)
    save_quantized(model, tmp_path / "student")
    assert_close(load_quantized(tmp_path / "student").state_dict(), model.state_dict(), atol=0, rtol=0)


def test_tpq_shared_init_starts_every_step_from_one_range(teacher):
    calib = build_calibration_set(teacher, DDIMScheduler(num_train_timesteps=1000), 12, 3, (1, 8, 8), 0, progress=False)
    student = copy.deepcopy(teacher)
    quantize_model(student, QuantSpec(weight_bits=4, act_bits=8), timesteps=calib.table)
    module = SimpleNamespace(student=student, calib=calib, calib_batch_size=8, progress=False)
    tpq = TemporalParallelQuantizer(init="shared")
    tpq.setup(None, module, "fit")
    tpq.on_fit_start(SimpleNamespace(loggers=[]), module)
    quantizers = [q for _, q in act_quantizers(student) if q.enabled]
    assert quantizers and all(q.num_steps == 3 for q in quantizers)
    assert all(torch.equal(q.scale, q.scale[:1].expand(3)) for q in quantizers)  # one range for every step
    TemporalParallelQuantizer().on_fit_start(SimpleNamespace(loggers=[]), module)  # per_step: the steps differ
    assert any(not torch.equal(q.scale, q.scale[:1].expand(3)) for q in quantizers)


def test_the_lora_callback_refuses_what_would_leave_the_adapters_untrained():
    with pytest.raises(ConfigError, match=r"callbacks.lora.rank=0"):
        QALoRA(rank=0)

    class Module:  # what setup reads of the LightningModule
        lrs = {"weights": 1e-3, "lora": 0.0}
        student = conv_layer()

    with pytest.raises(ConfigError, match=r"distill.lr_lora=0"):
        QALoRA().setup(None, Module(), "fit")


def test_efficientdm_trains_adapters_and_step_sizes_and_saves_an_ordinary_student(
    tiny_teacher_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr("dq.train.evaluate_models", lambda *args, **kwargs: {})  # training only
    run = tmp_path / "run"
    over = ["experiment=efficientdm", "logger=none", "distill.iters=3", "distill.lr_lora=1e-2"]
    base = [o for o in fast(tiny_teacher_dir) if not o.startswith("distill.iters_per_block")]  # BKD's; this is KD
    train(compose_cfg("train", base + over, run))
    teacher, _ = load_teacher(tiny_teacher_dir)
    student = load_quantized(run / "student")  # merged: loads as a plain quantized model
    assert not any("parametrizations" in n or n.endswith((".A", ".B")) for n, _ in student.named_parameters())
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    weights = [n for n in t_params if n.endswith(".weight") and n.rsplit(".", 1)[0] in dict(lora_layers(student))]
    assert weights and all(not torch.equal(t_params[n], s_params[n]) for n in weights)  # W + B A merged in
    others = [n for n in t_params if n not in weights]  # biases, norm affines, float layers: frozen
    assert others and all(torch.equal(t_params[n], s_params[n]) for n in others)
    steps = [q for _, q in act_quantizers(student) if q.enabled]
    assert all(q.num_steps == 3 for q in steps)
    assert any(len(set(q.scale.tolist())) > 1 for q in steps)  # one shared start, moved per step by training
