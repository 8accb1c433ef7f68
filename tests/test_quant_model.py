"""Quantized layers, attention processor, `quantize_model` on tiny diffusers UNets, and save/load."""

from __future__ import annotations

import copy
import json
import pickle
import re
import shutil
from pathlib import Path

import conftest
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.testing import assert_close

from dq.errors import CheckpointError, MissingFileError
from dq.models import ddim_sample, make_noise
from dq.quant import (
    NonFiniteActivationError,
    QuantAttnProcessor,
    QuantConv2d,
    QuantizerSpec,
    QuantLinear,
    QuantSpec,
    StepContext,
    act_quantizers,
    calibrate_activations,
    expand_act_quantizers,
    is_quantized,
    load_quantized,
    quant_modules,
    quant_report,
    quantize_model,
    save_quantized,
    set_quant_state,
    set_timesteps,
    step_context,
    weight_quantizers,
)
from dq.quant.io import weights_file
from dq.quant.model import TIMESTEPS_BUFFER

TIMESTEPS = torch.tensor([666, 333, 0])  # DDIM-3 of a 1000-step schedule


def tiny_unet() -> UNet2DModel:
    return conftest.tiny_unet(attention_head_dim=4)


def tiny_cond_unet() -> UNet2DConditionModel:
    return conftest.tiny_cond_unet(in_channels=1, out_channels=1, cross_attention_dim=8, attention_head_dim=2)


def inputs(model: nn.Module, batch: int = 3, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = model.config.sample_size
    kw = {"sample": torch.randn(batch, 1, size, size, generator=g), "timestep": TIMESTEPS[0]}
    if isinstance(model, UNet2DConditionModel):
        kw["encoder_hidden_states"] = torch.randn(batch, 5, 8, generator=g)
    return kw


def shipped_teacher() -> UNet2DModel:
    from conftest import TEACHER

    from dq.models import load_teacher

    return load_teacher(TEACHER)[0]


def calibrated(model: nn.Module, spec: QuantSpec, temporal: bool = True) -> nn.Module:
    """Quantize, (expand to per-step quantizers), and calibrate on one batch per step."""
    quantize_model(model, spec, timesteps=TIMESTEPS)
    if temporal:
        expand_act_quantizers(model)
    kw = inputs(model, batch=len(TIMESTEPS), seed=7)
    with torch.no_grad(), calibrate_activations(model) as names:
        model(**{**kw, "timestep": TIMESTEPS})  # one sample per step
    assert len(names) == len(list(act_quantizers(model)))
    return model


# ---- layers ------------------------------------------------------------------------------------------------------
def _init_act(layer: QuantConv2d | QuantLinear, x: torch.Tensor) -> None:
    layer.act_quantizer.start_observation()
    layer(x)
    layer.act_quantizer.finish_observation()


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_quant_layer_forward_matches_reference(kind):
    torch.manual_seed(0)
    if kind == "conv":
        float_layer, x = nn.Conv2d(6, 4, 3, padding=1), torch.randn(2, 6, 5, 5)
        cls, op, cdim = QuantConv2d, lambda x, w, b: F.conv2d(x, w, b, padding=1), 1
    else:
        float_layer, x = nn.Linear(6, 4), torch.randn(2, 7, 6)
        cls, op, cdim = QuantLinear, F.linear, -1
    weight = float_layer.weight
    layer = cls.from_float(float_layer, QuantizerSpec(4, granularity="channel"), QuantizerSpec(6))
    assert layer.weight is weight and layer.bias is float_layer.bias  # the float weight is the trainable latent
    assert layer.in_scale.shape == (6,) and (layer.in_scale == 1).all()
    with torch.no_grad():
        layer.in_scale.copy_(torch.linspace(0.5, 1.0, 6))
    _init_act(layer, x)

    wq, aq = layer.weight_quantizer, layer.act_quantizer
    ws, wz = (p.detach().view(4, *[1] * (weight.ndim - 1)) for p in (wq.scale, wq.zero_point))  # [C_out, 1, ...]
    w_ref = ws * (torch.clamp(torch.round(weight / ws) + wz.round(), 0, 15) - wz.round())
    shape = [1] * x.ndim
    shape[cdim] = 6
    xs = x * layer.in_scale.view(shape)
    x_ref = aq.scale * (torch.clamp(torch.round(xs / aq.scale) + aq.zero_point.round(), 0, 63) - aq.zero_point.round())
    assert_close(layer(x), op(x_ref, w_ref, float_layer.bias), atol=0, rtol=0)
    before = x.clone()
    with torch.no_grad():  # the sampling path: cached weight, in-place quantization of the scaled input
        assert_close(layer(x), op(x_ref, w_ref, float_layer.bias), atol=0, rtol=0)
    assert torch.equal(x, before)  # the caller's input is never overwritten

    set_quant_state(layer, weights=False, acts=False)
    assert_close(layer(x), op(xs, weight, float_layer.bias), atol=0, rtol=0)


def test_weight_cache_is_reused_and_invalidated():
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(5, 3), QuantizerSpec(4, granularity="channel"), QuantizerSpec(8)).eval()
    layer.act_quantizer.enabled = False
    x = torch.randn(2, 5)
    with torch.no_grad():
        layer(x)
        cached = layer._wq_cache[1]
        layer(x)
        assert layer._wq_cache[1] is cached  # reused
        layer.weight.mul_(2.0)  # in-place edit
        out = layer(x)
        assert layer._wq_cache[1] is not cached
        assert_close(out, F.linear(x, layer.weight_quantizer(layer.weight), layer.bias), atol=0, rtol=0)
        cached = layer._wq_cache[1]
        layer.load_state_dict({**layer.state_dict(), "weight_quantizer.scale": layer.weight_quantizer.scale * 2})
        layer(x)
        assert layer._wq_cache[1] is not cached
        cached = layer._wq_cache[1]
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).sum().backward()  # grad enabled: no caching
    opt.step()
    with torch.no_grad():
        out = layer(x)
    assert layer._wq_cache[1] is not cached
    assert_close(out, F.linear(x, layer.weight_quantizer(layer.weight), layer.bias), atol=0, rtol=0)
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer._wq_cache is None  # training mode never caches


# ---- quantize_model ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_unet, tiny_cond_unet, shipped_teacher])
def test_report_covers_every_layer_and_attention_matmul(make):
    model = make()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    attns = [n for n, m in model.named_modules() if isinstance(m, Attention)]
    assert attns and "time_embedding.linear_1" in linears and "conv_in" in convs
    report = quantize_model(model, QuantSpec(weight_bits=4, act_bits=6), timesteps=TIMESTEPS)

    assert isinstance(model, type(make()))
    assert report.summary() == {
        "total": len(convs) + len(linears) + 2 * len(attns),
        "conv": len(convs),
        "linear": len(linears),
        "attn-matmul": 2 * len(attns),
        "shared": len(convs) + len(linears) + 2 * len(attns),
    }
    by_name = {r.name: r for r in report}
    assert {n for n, r in by_name.items() if r.kind == "conv"} == set(convs)
    assert {n for n, r in by_name.items() if r.kind == "linear"} == set(linears)
    assert {f"{a}.processor[q@k]" for a in attns} | {f"{a}.processor[p@v]" for a in attns} == {
        n for n, r in by_name.items() if r.kind == "attn-matmul"
    }
    for name in convs:
        assert isinstance(model.get_submodule(name), QuantConv2d)
    for name in linears:
        assert isinstance(model.get_submodule(name), QuantLinear)
    for name in attns:
        assert isinstance(model.get_submodule(name).processor, QuantAttnProcessor)
    # bits: 8-bit first and last layer, 8-bit probabilities, the configured bits elsewhere
    assert (by_name["conv_in"].weight_bits, by_name["conv_in"].act_bits) == (8, 8)
    assert (by_name["conv_out"].weight_bits, by_name["conv_out"].act_bits) == (8, 8)
    assert (by_name["time_embedding.linear_1"].weight_bits, by_name["time_embedding.linear_1"].act_bits) == (4, 6)
    assert (by_name[f"{attns[0]}.processor[p@v]"].weight_bits, by_name[f"{attns[0]}.processor[p@v]"].act_bits) == (6, 8)
    n_act = len(convs) + len(linears) + 4 * len(attns)
    assert len(list(act_quantizers(model))) == n_act
    assert len(list(weight_quantizers(model))) == len(convs) + len(linears)
    assert all(q.initialized for _, q in weight_quantizers(model))
    text = str(report)
    assert text.splitlines()[0].split() == ["layer", "kind", "W", "bits", "A", "bits", "act", "quantizer"]
    assert "conv_in" in text and f"total: {report.summary()['total']}" in text

    expand_act_quantizers(model)
    assert quant_report(model).summary()["temporal(3)"] == report.summary()["total"]
    with pytest.raises(ValueError, match="model is already quantized"):
        quantize_model(model, QuantSpec())


@pytest.mark.parametrize("make", [tiny_unet, tiny_cond_unet])
def test_disabled_quantization_matches_float_model(make):
    float_model = make()
    kw = inputs(float_model)
    with torch.no_grad():
        expected = float_model(**kw).sample
        model = copy.deepcopy(float_model)
        quantize_model(model, QuantSpec(weight_bits=4, act_bits=4), timesteps=TIMESTEPS)
        set_quant_state(model, weights=False, acts=False)
        # explicit baddbmm attention vs diffusers' SDPA: equal to float tolerance
        assert_close(model(**kw).sample, expected)

        exact = copy.deepcopy(float_model)
        quantize_model(exact, QuantSpec(quantize_attention=False))
        set_quant_state(exact, weights=False, acts=False)
        assert_close(exact(**kw).sample, expected, atol=0, rtol=0)


def test_quant_attention_processor_with_cross_attention_mask():
    float_model = tiny_cond_unet()
    kw = inputs(float_model)
    kw["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    model = copy.deepcopy(float_model)
    quantize_model(model, QuantSpec(), timesteps=TIMESTEPS)
    set_quant_state(model, weights=False, acts=False)
    with torch.no_grad():
        expected = float_model(**kw).sample
        assert_close(model(**kw).sample, expected)
        unmasked = float_model(**{k: v for k, v in kw.items() if k != "encoder_attention_mask"}).sample
    assert not torch.allclose(unmasked, expected)  # the mask mattered


def test_timesteps_map_to_per_sample_step_indices():
    model = tiny_unet()
    quantize_model(model, QuantSpec(), timesteps=TIMESTEPS)
    expand_act_quantizers(model)  # per-step quantizers read the index (shared ones set none: any schedule works)
    set_quant_state(model, weights=False, acts=False)
    ctx = step_context(model)
    assert isinstance(ctx, StepContext)
    assert all(q.step_context is ctx for _, q in act_quantizers(model))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        model(x, torch.tensor([0, 666, 333, 0]))
        assert ctx.index.tolist() == [2, 0, 1, 2]
        model(x, 333)  # a scalar
        assert ctx.index.tolist() == [1, 1, 1, 1]
        model(sample=x, timestep=torch.tensor(666.0))  # float, keyword arguments
        assert ctx.index.tolist() == [0, 0, 0, 0]
        with pytest.raises(ValueError) as e:
            model(x, torch.tensor([0, 5, 333, 0]))
    assert str(e.value).startswith(
        "timestep 5 is not in the timestep table this quantized model was built for: [666, 333, 0]. Its per-step "
        "quantizers hold one range per step of that table: sample with num_inference_steps=3"
    )

    no_table = tiny_unet()
    quantize_model(no_table, QuantSpec())
    set_quant_state(no_table, weights=False, acts=False)
    with torch.no_grad():
        no_table(x, 5)
    assert step_context(no_table).index is None


def _quant_ref(x: torch.Tensor, q: nn.Module, index: list[int]) -> torch.Tensor:
    """Plain reference of a per-step quantizer: sample b on step index[b]'s (Δ, z)."""
    out = []
    for b, i in enumerate(index):
        zp = q.zero_point[i].round()
        out.append(q.scale[i] * (torch.clamp(torch.round(x[b] / q.scale[i]) + zp, q.qmin, q.qmax) - zp))
    return torch.stack(out)


def test_temporal_model_uses_each_samples_own_step():
    model = calibrated(tiny_unet(), QuantSpec(weight_bits=4, act_bits=8))
    q = model.get_submodule("down_blocks.0.resnets.0.conv1").act_quantizer
    assert q.num_steps == 3 and len(set(q.scale.tolist())) == 3  # one calibrated Δ per step
    records, inputs_seen = [], {}
    for _, aq in act_quantizers(model):  # a copy of the input: when sampling, a quantizer overwrites it
        aq.register_forward_pre_hook(lambda m, a: inputs_seen.__setitem__(m, a[0].clone()))
        aq.register_forward_hook(lambda m, a, o: records.append((m, inputs_seen[m], o)))
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(x, torch.tensor([0, 666, 333]))
    assert len(records) == len(list(act_quantizers(model)))
    assert any(not torch.equal(inp, out) for _, inp, out in records)
    for m, inp, out in records:  # every quantizer of the network: sample b used step index[b]
        assert_close(out, _quant_ref(inp, m, [2, 0, 1]), atol=0, rtol=0)


@pytest.mark.parametrize("make", [tiny_unet, tiny_cond_unet])
def test_quantized_attention_matches_a_plain_reference(make):
    """Each attention matmul runs on its quantizer's output: q, k, v from the projections, probabilities
    softmax(q kᵀ · scale) over the quantized q and k, the output from the quantized probabilities and v. Checked stage
    by stage on the quantizers' own inputs, so float rounding in the reference never crosses a rounding boundary."""
    model = calibrated(make(), QuantSpec(weight_bits=4, act_bits=4))
    kw, index = {**inputs(model), "timestep": torch.tensor([0, 666, 333])}, [2, 0, 1]
    seen: dict = {}

    def keep_input(m, args, kwargs):  # clones: when sampling, layers and quantizers overwrite what they own
        hs = args[0] if args else kwargs["hidden_states"]
        enc = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        seen[m] = {"x": hs.clone(), "enc": None if enc is None else enc.clone()}

    owner: dict = {}  # quantizer -> (its attention module, "q" / "k" / "v" / "prob")

    def keep_before(m, a):  # the input before the quantizer overwrites it
        attn, key = owner[m]
        seen[attn][key] = [a[0].clone()]

    def keep_after(m, a, o):
        attn, key = owner[m]
        seen[attn][key].append(o.clone())

    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert attns and all(isinstance(a.processor, QuantAttnProcessor) for a in attns)
    for attn in attns:
        attn.register_forward_pre_hook(keep_input, with_kwargs=True)
        attn.register_forward_hook(lambda m, a, o: seen[m].update(out=o.clone()))
        for key in ("q", "k", "v", "prob"):
            quantizer = getattr(attn.processor, f"{key}_quantizer")
            owner[quantizer] = (attn, key)
            quantizer.register_forward_pre_hook(keep_before)
            quantizer.register_forward_hook(keep_after)
    with torch.no_grad():
        model(**kw)
        for attn in attns:
            r, proc, heads = seen[attn], attn.processor, attn.heads
            x = r["x"]
            if x.ndim == 4:  # [B, C, H, W] -> [B, HW, C]
                x = x.flatten(2).transpose(1, 2)
            if attn.group_norm is not None:
                x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
            context = x if r["enc"] is None else r["enc"]
            for key, proj, src in (("q", attn.to_q, x), ("k", attn.to_k, context), ("v", attn.to_v, context)):
                assert_close(r[key][0], proj(src.clone()))  # the projection's output goes into the quantizer
            for key in ("q", "k", "v", "prob"):  # and each quantizer's output is on its grid, per sample's step
                assert_close(r[key][1], _quant_ref(r[key][0], getattr(proc, f"{key}_quantizer"), index), atol=0, rtol=0)
            # [B, L, C] -> [B, heads, L, C / heads]
            q, k, v = (r[key][1].unflatten(2, (heads, -1)).transpose(1, 2) for key in ("q", "k", "v"))
            assert_close(r["prob"][0], torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1))
            out = attn.to_out[0]((r["prob"][1] @ v).transpose(1, 2).flatten(2))  # [B, Lq, C]
            if r["x"].ndim == 4:
                out = out.transpose(1, 2).reshape(r["x"].shape)
            if attn.residual_connection:
                out = out + r["x"]
            assert_close(r["out"], out / attn.rescale_output_factor)


@pytest.mark.parametrize("make", [tiny_unet, tiny_cond_unet])
def test_sampling_path_equals_the_autograd_path_bit_for_bit(make):
    """Without autograd the quantizers overwrite tensors they own (scaled inputs, q / k / v, probabilities) and split
    layers skip the concatenation; the model's output must be exactly that of the training (autograd) path."""
    model = calibrated(make(), QuantSpec(weight_bits=4, act_bits=4, split_concat=True))
    assert any(getattr(m, "split", 0) for m in model.modules())
    kw = {**inputs(model), "timestep": torch.tensor([0, 666, 333])}
    before = {k: v.clone() for k, v in kw.items()}
    with_grad = model(**kw).sample
    assert with_grad.requires_grad
    with torch.no_grad():
        sampled = model(**kw).sample
    assert torch.equal(sampled, with_grad.detach())
    assert all(torch.equal(kw[k], v) for k, v in before.items())  # the inputs are left as they were


def test_calibration_and_uninitialised_errors():
    model = tiny_unet()
    quantize_model(model, QuantSpec(), timesteps=TIMESTEPS)
    kw = inputs(model)
    with pytest.raises(RuntimeError, match="activation quantizer is not initialised"), torch.no_grad():
        model(**kw)
    with pytest.raises(KeyError), calibrate_activations(model):
        raise KeyError("boom")
    assert not any(q.observing or q.initialized for _, q in act_quantizers(model))
    with torch.no_grad(), calibrate_activations(model) as names:
        model(**kw)
    assert len(names) == len(list(act_quantizers(model)))
    assert all(q.initialized and not q.observing for _, q in act_quantizers(model))
    expand_act_quantizers(model)
    with pytest.raises(RuntimeError, match="has 3 steps but no step index is set"), torch.no_grad():
        step_context(model).index = None
        model.get_submodule("conv_in")(kw["sample"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_calibrating_on_non_finite_activations_names_the_quantizer_and_step(bad: float):
    model = tiny_unet()
    quantize_model(model, QuantSpec(), timesteps=TIMESTEPS)
    expand_act_quantizers(model)
    kw = inputs(model)
    kw["sample"][1, 0, 2, 3] = bad
    kw["timestep"] = TIMESTEPS[[0, 2, 1]]  # sample 1 (the bad one) at step 2
    message = r"activation quantizer conv_in\.act_quantizer: its input holds NaN or inf at step\(s\) \[2\]"
    with pytest.raises(NonFiniteActivationError, match=message), torch.no_grad(), calibrate_activations(model):
        model(**kw)
    assert not any(q.observing or q.initialized for _, q in act_quantizers(model))


def test_filter_fn_leaves_layers_float():
    model = tiny_unet()
    report = quantize_model(model, QuantSpec(), filter_fn=lambda module, name: not name.startswith("mid_block"))
    assert not any(r.name.startswith("mid_block") for r in report)
    assert type(model.mid_block.resnets[0].conv1) is nn.Conv2d
    assert not isinstance(model.mid_block.attentions[0].processor, QuantAttnProcessor)


def assert_same_as_ddim_sample(images, model: nn.Module, seed: int) -> None:
    """The stock pipeline's images [N, H, W, C] in [0, 1] are dq's own DDIM loop's from the pipeline's noise."""
    n, size, channels = len(images), model.config.sample_size, model.config.in_channels
    noise = make_noise(n, (channels, size, size), seed=seed)  # DDIMPipeline draws it from one seeded CPU generator
    ours = ddim_sample(model, DDIMScheduler(num_train_timesteps=1000), noise, len(TIMESTEPS), progress=False)
    assert_close(torch.from_numpy(images).permute(0, 3, 1, 2), ours / 2 + 0.5, atol=1e-6, rtol=0)


def test_ddim_pipeline_runs_quantized_unet():
    model = calibrated(tiny_unet(), QuantSpec(weight_bits=4, act_bits=8))
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(3)
    assert scheduler.timesteps.tolist() == TIMESTEPS.tolist()
    seen = []
    model.register_forward_hook(lambda m, a, o: seen.append(step_context(m).index.tolist()))
    pipe = DDIMPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert seen == [[0, 0], [1, 1], [2, 2]]
    assert_same_as_ddim_sample(images.images, model, seed=0)


def test_ddim_pipeline_runs_quantized_shipped_teacher():
    model = calibrated(shipped_teacher(), QuantSpec(weight_bits=4, act_bits=8))
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    pipe = DDIMPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert_same_as_ddim_sample(out.images, model, seed=0)
    with pytest.raises(ValueError, match="not in the timestep table"):
        pipe(batch_size=1, num_inference_steps=4, output_type="np")  # a TPQ model is tied to its schedule


def test_a_model_with_shared_ranges_samples_with_any_schedule():
    """Only per-step quantizers tie a model to its timestep table: one with shared ranges (qat_lsq, ptq_recon) keeps
    the table it was built with and still samples at another step count, with no step index set."""
    model = calibrated(tiny_unet(), QuantSpec(weight_bits=4, act_bits=8), temporal=False)
    seen = []
    model.register_forward_hook(lambda m, a, o: seen.append(step_context(m).index))
    pipe = DDIMPipeline(unet=model, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 8, 8, 1) and seen == [None] * 4
    assert getattr(model, TIMESTEPS_BUFFER).tolist() == TIMESTEPS.tolist()  # three steps


def test_saving_the_pipeline_refuses_instead_of_dropping_the_quantizers(tmp_path):
    """diffusers' save_pretrained would write plain weights that load back as a float UNet without a word; the
    quantized model (and so a pipeline holding it) refuses and names save_quantized / load_quantized."""
    model = calibrated(tiny_unet(), QuantSpec(weight_bits=4, act_bits=8))
    pipe = DDIMPipeline(unet=model, scheduler=DDIMScheduler(num_train_timesteps=1000))
    with pytest.raises(TypeError, match=r"save it with dq.quant.save_quantized\(unet, directory\)"):
        pipe.save_pretrained(tmp_path / "pipe")
    assert not (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    copy.deepcopy(model)  # still copies (sampling caches, sweeps) and pickles
    pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("make", [tiny_unet, tiny_cond_unet])
def test_save_load_round_trip_is_bit_exact(make, tmp_path):
    model = calibrated(make(), QuantSpec(weight_bits=4, act_bits=6, weight_init="mse"))
    model.get_submodule("conv_in").in_scale.fill_(0.5)
    kw = inputs(model, batch=3)
    kw["timestep"] = torch.tensor([333, 0, 666])
    with torch.no_grad():
        expected = model(**kw).sample
    save_quantized(model, tmp_path)
    meta = json.loads((tmp_path / "quant_spec.json").read_text())
    weights = f"model-{meta['save_id']}.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", weights, "quant_spec.json"]
    assert weights_file(tmp_path) == tmp_path / weights
    assert meta["timesteps"] == [666, 333, 0] and set(meta["num_steps"].values()) == {3}

    loaded = load_quantized(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert [(r.name, r.weight_bits, r.act_bits, r.quantizer) for r in quant_report(loaded)] == [
        (r.name, r.weight_bits, r.act_bits, r.quantizer) for r in quant_report(model)
    ]
    assert all(q.initialized for _, q in act_quantizers(loaded))
    with torch.no_grad():
        assert_close(loaded(**kw).sample, expected, atol=0, rtol=0)


@pytest.mark.parametrize("killed_in", ["weights", "spec", "config"])
def test_a_save_killed_part_way_leaves_one_whole_student(killed_in, tmp_path, monkeypatch):
    """A save over an earlier one (a re-run into a finished run directory) killed while writing its weights or its
    quant_spec.json leaves the earlier save loadable; killed after quant_spec.json, the new one. Never a mix, a
    truncated file or a temporary."""
    first = calibrated(tiny_unet(), QuantSpec(weight_bits=4, act_bits=8))
    second = calibrated(conftest.tiny_unet(seed=1, block_out_channels=(8, 24)), QuantSpec(weight_bits=8, act_bits=8))
    save_quantized(first, tmp_path / "student")
    first.save_config(tmp_path / "diffusers")  # save_quantized's config.json is diffusers' own
    assert (tmp_path / "student" / "config.json").read_text() == (tmp_path / "diffusers" / "config.json").read_text()
    before = sorted(p.name for p in (tmp_path / "student").iterdir())

    def killed_before_writing(*args, **kwargs):
        raise KeyboardInterrupt

    def killed_mid_write(tmp):  # atomic_write's temporary, half written when the kill comes
        Path(tmp).write_bytes(b"half a file")
        raise KeyboardInterrupt

    if killed_in == "weights":
        monkeypatch.setattr("dq.quant.io.save_file", lambda state, tmp, metadata=None: killed_mid_write(tmp))
    elif killed_in == "spec":
        monkeypatch.setattr("dq.quant.io.atomic_write_text", killed_before_writing)
    else:
        monkeypatch.setattr(type(second), "to_json_file", lambda self, tmp: killed_mid_write(tmp))
    with pytest.raises(KeyboardInterrupt):
        save_quantized(second, tmp_path / "student")
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "student").iterdir())
    assert not [n for n in names if n.startswith(".")]  # no temporary left behind
    loaded = load_quantized(tmp_path / "student")
    expected = second if killed_in == "config" else first
    assert_close(loaded.state_dict(), expected.state_dict(), atol=0, rtol=0)
    if killed_in != "config":  # the earlier save's files as they were, and the new weights beside them at most
        assert set(before) <= set(names) and len(names) <= len(before) + 1
    save_quantized(second, tmp_path / "student")  # the next save leaves only its own weights file
    assert len([n for n in (tmp_path / "student").iterdir() if n.suffix == ".safetensors"]) == 1


def test_files_of_two_saves_are_refused_not_paired(tmp_path):
    """Weights of one save put in place of another's (a copy by hand): with the same tensor shapes strict loading
    would pair them silently."""
    save_quantized(calibrated(tiny_unet(), QuantSpec(weight_bits=4, act_bits=8)), tmp_path / "a")
    save_quantized(calibrated(tiny_unet(), QuantSpec(weight_bits=6, act_bits=8)), tmp_path / "b")
    shutil.copyfile(weights_file(tmp_path / "b"), weights_file(tmp_path / "a"))
    with pytest.raises(CheckpointError, match=r"model-.*\.safetensors and .*quant_spec.json come from two different"):
        load_quantized(tmp_path / "a")


def test_a_save_from_before_format_2_still_loads(tmp_path):
    """Saves before the weights file was named per save: `model.safetensors`, the config in config.json only."""
    model = calibrated(tiny_unet(), QuantSpec(weight_bits=4, act_bits=8))
    save_quantized(model, tmp_path)
    meta = json.loads((tmp_path / "quant_spec.json").read_text())
    weights_file(tmp_path).rename(tmp_path / "model.safetensors")
    del meta["weights"], meta["config"]
    (tmp_path / "quant_spec.json").write_text(json.dumps(meta))
    assert_close(load_quantized(tmp_path).state_dict(), model.state_dict(), atol=0, rtol=0)
    for bad in ["../model.safetensors", "config.json", 3]:  # a spec naming anything else is refused
        (tmp_path / "quant_spec.json").write_text(json.dumps({**meta, "weights": bad}))
        with pytest.raises(CheckpointError, match=rf"weights={re.escape(repr(bad))} is not a weights file"):
            load_quantized(tmp_path)


def test_load_errors_name_the_file(tmp_path):
    model = tiny_unet()
    quantize_model(model, QuantSpec())
    save_quantized(model, tmp_path)
    spec_file, weights = tmp_path / "quant_spec.json", weights_file(tmp_path)
    meta, state = json.loads(spec_file.read_text()), safetensors.torch.load_file(weights)
    broken = [
        ({**meta, "spec": {**meta["spec"], "keep_8bit": ["nowhere"]}}, state, r"keep_8bit entries \['nowhere'\]"),
        ({**meta, "quantized_layers": 5}, state, r"TypeError"),
        (meta, {k: v for k, v in state.items() if k != "conv_in.weight"}, r'Missing key\(s\) in state_dict: "conv_in'),
    ]
    for m, st, message in broken:  # files that read but do not fit together: one error that names the directory
        spec_file.write_text(json.dumps(m))
        safetensors.torch.save_file(st, weights)
        with pytest.raises(CheckpointError, match=rf"(?s){tmp_path} does not hold a loadable student .*{message}"):
            load_quantized(tmp_path)
    spec_file.write_text(json.dumps(meta))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"model-.*\.safetensors is corrupt"):
        load_quantized(tmp_path)
    (tmp_path / "quant_spec.json").write_text("{oops")
    with pytest.raises(ValueError, match="quant_spec.json is corrupt: not valid JSON"):
        load_quantized(tmp_path)
    (tmp_path / "quant_spec.json").unlink()
    with pytest.raises(FileNotFoundError, match="quant_spec.json not found in"):
        load_quantized(tmp_path)


def test_quant_modules_lists_layers_and_processors():
    model = tiny_unet()
    quantize_model(model, QuantSpec())
    kinds = {type(m) for _, m in quant_modules(model)}
    assert kinds == {QuantConv2d, QuantLinear, QuantAttnProcessor}


# ---- shortcut splitting -----------------------------------------------------------------------------------------
def _reference_splits(model: nn.Module) -> dict[str, int]:
    """Hidden-state channels of each up-block ResNet's concatenated input, read off the forward itself: resnet 0
    gets the up block's input hidden state, resnet i > 0 the output of resnet i - 1."""
    seen: dict[str, int] = {}

    def record(name: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            seen[name] = (args[0] if args else kwargs["hidden_states"]).shape[1]

        return hook

    hooks = [
        b.register_forward_pre_hook(record(f"up_blocks.{i}"), with_kwargs=True) for i, b in enumerate(model.up_blocks)
    ]
    with torch.no_grad():
        model(**inputs(model, batch=1))
    for h in hooks:
        h.remove()
    out = {}
    for i, block in enumerate(model.up_blocks):
        for j in range(len(block.resnets)):
            out[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = (
                seen[f"up_blocks.{i}"] if j == 0 else block.resnets[j - 1].out_channels
            )
    return out


@pytest.mark.parametrize("make", [tiny_unet, tiny_cond_unet, shipped_teacher])
def test_concat_splits_find_where_the_skip_starts(make):
    from dq.quant.split import concat_splits

    model = make()
    assert concat_splits(model) == _reference_splits(model)


def test_split_layer_quantizes_each_part_with_its_own_range():
    torch.manual_seed(0)
    float_layer = nn.Conv2d(6, 3, 1)
    x = torch.cat([10 * torch.randn(2, 4, 5, 5), 0.1 * torch.randn(2, 2, 5, 5)], dim=1)  # hidden 4 | skip 2
    layer = QuantConv2d.from_float(float_layer, QuantizerSpec(4, granularity="channel"), QuantizerSpec(4), split=4)
    for q in (layer.act_quantizer, layer.act_quantizer_skip):
        q.start_observation()
    layer(x)
    for q in (layer.act_quantizer, layer.act_quantizer_skip):
        q.finish_observation()
    layer.weight_quantizer.enabled = False

    def minmax_fake_quant(v: torch.Tensor) -> torch.Tensor:  # 4-bit asymmetric min-max, by hand
        scale = (v.max() - v.min()) / 15
        zp = torch.round(-v.min() / scale)
        return scale * (torch.clamp(torch.round(v / scale) + zp, 0, 15) - zp)

    x_ref = torch.cat([minmax_fake_quant(x[:, :4]), minmax_fake_quant(x[:, 4:])], dim=1)
    assert_close(layer(x), F.conv2d(x_ref, float_layer.weight, float_layer.bias), atol=1e-5, rtol=1e-5)
    assert layer.act_quantizer_skip.scale.item() < layer.act_quantizer.scale.item() / 10  # each part its own range
    before, with_grad = x.clone(), layer(x.clone().requires_grad_()).detach()  # the autograd path: fake_quant, cat
    with torch.no_grad():  # sampling: each part quantized in place in one scaled copy, no concatenation
        assert torch.equal(layer(x), with_grad)
    assert torch.equal(x, before)


def test_split_concat_model_reports_and_round_trips(tmp_path):
    model = calibrated(tiny_unet(), QuantSpec(weight_bits=4, act_bits=4, split_concat=True))
    rows = [r for r in quant_report(model) if r.split]
    assert {r.name: r.split for r in rows} == _reference_splits(tiny_unet())
    assert quant_report(model).summary()["split"] == len(rows) > 0
    assert all(model.get_submodule(r.name).act_quantizer_skip.num_steps == len(TIMESTEPS) for r in rows)
    kw = inputs(model)
    with torch.no_grad():
        expected = model(**kw).sample
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert [(r.name, r.split) for r in quant_report(loaded)] == [(r.name, r.split) for r in quant_report(model)]
    with torch.no_grad():
        assert_close(loaded(**kw).sample, expected, atol=0, rtol=0)
        set_quant_state(loaded, weights=False, acts=False)
        assert_close(loaded(**kw).sample, tiny_unet()(**kw).sample)


def test_keep_8bit_glob_keeps_every_shortcut_and_its_skip_half_at_8_bits(tmp_path):
    spec = QuantSpec(weight_bits=4, act_bits=4, split_concat=True, keep_8bit=["conv_in", "conv_out", "*.conv_shortcut"])
    model = calibrated(tiny_unet(), spec)
    shortcuts = [n for n, _ in tiny_unet().named_modules() if n.endswith(".conv_shortcut")]
    assert len(shortcuts) >= 2 and any(model.get_submodule(n).split for n in shortcuts)
    save_quantized(model, tmp_path)
    for loaded in (model, load_quantized(tmp_path)):  # the spec's glob survives save / load
        bits = {r.name: (r.weight_bits, r.act_bits) for r in quant_report(loaded) if r.kind != "attn-matmul"}
        assert {n for n, b in bits.items() if b == (8, 8)} == {"conv_in", "conv_out", *shortcuts}
        assert {b for n, b in bits.items() if n not in {"conv_in", "conv_out", *shortcuts}} == {(4, 4)}
        split = [loaded.get_submodule(n) for n in shortcuts if loaded.get_submodule(n).split]
        assert all(m.act_quantizer_skip.bits == 8 for m in split)


def test_keep_8bit_entry_that_names_no_layer_is_refused_before_anything_changes(tmp_path):
    model = tiny_unet()
    bad = ["conv_in", "*.conv_shortcutt", "mid", "time_proj"]  # a typo, half a name, a module that holds no layer
    msg = r"keep_8bit entries \['\*.conv_shortcutt', 'mid', 'time_proj'\] name no quantizable layer"
    with pytest.raises(ValueError, match=msg + r" of this model \(QuantSpec.keep_8bit\)"):
        quantize_model(model, QuantSpec(keep_8bit=bad), timesteps=TIMESTEPS)
    assert not is_quantized(model)  # untouched: quantizing it properly still works
    spec = QuantSpec(weight_bits=4, keep_8bit=["conv_in", "mid_block", "*.resnets.0"])
    quantize_model(model, spec, timesteps=TIMESTEPS)
    bits = {n: m.weight_quantizer.bits for n, m in quant_modules(model) if not isinstance(m, QuantAttnProcessor)}
    assert bits["mid_block.resnets.1.conv1"] == bits["down_blocks.0.resnets.0.conv2"] == 8  # prefix; glob + prefix
    assert bits["time_embedding.linear_1"] == bits["conv_out"] == 4
    save_quantized(model, tmp_path)  # a saved spec naming no layer (hand-edited, older code) names its file
    meta = json.loads((tmp_path / "quant_spec.json").read_text())
    meta["spec"]["keep_8bit"] = ["conv_inn"]
    (tmp_path / "quant_spec.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"\['conv_inn'\] .* \(.*quant_spec.json, spec.keep_8bit\)"):
        load_quantized(tmp_path)


@pytest.mark.parametrize(("flag", "layer"), [("fp_network_input", "conv_in"), ("fp_output_layer_input", "conv_out")])
def test_an_fp_input_flag_leaves_only_that_input_unquantized_and_round_trips(tmp_path, flag, layer):
    """Against the same model quantized normally with that layer's input quantizer switched off by hand."""
    name = f"{layer}.act_quantizer"
    model = calibrated(tiny_unet(), QuantSpec(weight_bits=4, act_bits=4, **{flag: True}))
    assert [n for n, q in act_quantizers(model) if not q.enabled] == [name]
    assert {r.name: r.act_bits for r in quant_report(model) if r.kind != "attn-matmul"}[layer] is None  # shown as "-"
    reference = calibrated(tiny_unet(), QuantSpec(weight_bits=4, act_bits=4))
    reference.get_submodule(name).enabled = False
    kw = inputs(model)
    with torch.no_grad():
        expected = reference(**kw).sample
        assert_close(model(**kw).sample, expected, atol=0, rtol=0)
        reference.get_submodule(name).enabled = True
        assert not torch.equal(reference(**kw).sample, expected)  # the switch matters on this input
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert [n for n, q in act_quantizers(loaded) if not q.enabled] == [name]
    set_quant_state(loaded, weights=True, acts=True)  # switching all on keeps that input off
    assert not loaded.get_submodule(name).enabled
    with torch.no_grad():
        assert_close(loaded(**kw).sample, expected, atol=0, rtol=0)


def test_both_fp_input_flags_together():
    model = calibrated(
        tiny_unet(), QuantSpec(weight_bits=4, act_bits=4, fp_network_input=True, fp_output_layer_input=True)
    )
    assert [n for n, q in act_quantizers(model) if not q.enabled] == ["conv_in.act_quantizer", "conv_out.act_quantizer"]


@pytest.mark.parametrize(("flag", "layer"), [("fp_network_input", "conv_in"), ("fp_output_layer_input", "conv_out")])
def test_an_fp_input_flag_is_validated(flag, layer):
    with pytest.raises(ValueError, match=flag):
        QuantSpec(**{flag: "yes"})
    model = tiny_unet()
    with pytest.raises(ValueError, match=f"{flag}=true needs a quantized `{layer}`"):
        quantize_model(model, QuantSpec(**{flag: True}), TIMESTEPS, filter_fn=lambda m, n: n != layer)
    assert not is_quantized(model) and not list(quant_modules(model))  # refused before anything changed
    quantize_model(model, QuantSpec(), TIMESTEPS)  # so the same model can still be quantized


def test_a_quantizer_switched_off_stays_off_through_save_and_load(tmp_path):
    model = calibrated(tiny_unet(), QuantSpec(weight_bits=4, act_bits=4))
    name = "down_blocks.0.resnets.0.conv1.act_quantizer"
    model.get_submodule(name).enabled = False
    model.get_submodule("conv_out.weight_quantizer").enabled = False
    kw = inputs(model)
    with torch.no_grad():
        expected = model(**kw).sample
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert [n for n, q in act_quantizers(loaded) if not q.enabled] == [name]
    assert [n for n, q in weight_quantizers(loaded) if not q.enabled] == ["conv_out.weight_quantizer"]
    with torch.no_grad():
        assert_close(loaded(**kw).sample, expected, atol=0, rtol=0)
    q = loaded.get_submodule(name)
    q.set_extra_state(torch.tensor([1], dtype=torch.uint8))  # a state saved before `enabled` was kept
    assert q.enabled and q.initialized


# ---- what a library user can do to a quantized model -----------------------------------------------------------
def test_a_timestep_table_other_than_the_calibrated_one_is_refused():
    """Reordered or other timesteps would silently give each step another step's ranges (3.5 dB instead of 17)."""
    model = calibrated(tiny_unet(), QuantSpec(weight_bits=4, act_bits=8))
    with pytest.raises(ValueError, match=r"calibrated for the timesteps \[666, 333, 0\]"):
        set_timesteps(model, TIMESTEPS.flip(0))
    with pytest.raises(ValueError, match=r"hold 3 steps and the table has 2 timesteps"):
        set_timesteps(model, [500, 0])
    set_timesteps(model, TIMESTEPS.clone())  # the same table is fine
    with pytest.raises(ValueError, match=r"calibrated for its timestep table: clearing it"):
        set_timesteps(model, None)  # and then any table of 3 could be set
    with pytest.raises(ValueError, match=r"calibrated for the timesteps \[666, 333, 0\]"):
        set_timesteps(model, TIMESTEPS + 1)
    fresh = tiny_unet()
    quantize_model(fresh, QuantSpec(), timesteps=torch.arange(10))
    with pytest.raises(ValueError, match=r"num_steps=4, and the model's timestep table has 10 entries"):
        expand_act_quantizers(fresh, num_steps=4)
    expand_act_quantizers(fresh)
    set_timesteps(fresh, torch.arange(10, 20))  # not yet calibrated: a new table of the same length may be set


def test_a_timestep_table_that_repeats_a_timestep_is_refused():
    """The step index is found by timestep (its first match): PNDM's table [.., 800, 800, ..] would give the later
    800 the earlier one's ranges."""
    from diffusers import PNDMScheduler

    pndm = PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True)
    pndm.set_timesteps(10)
    assert len(set(pndm.timesteps.tolist())) < len(pndm.timesteps)  # diffusers' PLMS table repeats one
    with pytest.raises(ValueError, match=r"the timestep table repeats \[\d+\]"):
        quantize_model(tiny_unet(), QuantSpec(), timesteps=pndm.timesteps)
    model = tiny_unet()
    quantize_model(model, QuantSpec(), timesteps=torch.arange(3))
    with pytest.raises(ValueError, match=r"repeats \[5, 7\]"):
        set_timesteps(model, [7, 5, 7, 5])


@pytest.mark.parametrize("swap", ["slice", "processor"])
def test_a_float_attention_processor_swapped_in_by_diffusers_is_refused(swap, tmp_path):
    """enable_attention_slicing / set_attention_slice / fuse_qkv_projections / set_attn_processor replace dq's
    QuantAttnProcessor with a float one: attention would run unquantized without a word, and be saved so."""
    from diffusers.models.attention_processor import AttnProcessor

    model = calibrated(tiny_cond_unet(), QuantSpec(weight_bits=4, act_bits=8))
    if swap == "slice":
        model.set_attention_slice("auto")
    else:
        model.set_attn_processor(AttnProcessor())
    with torch.no_grad(), pytest.raises(TypeError, match=r"runs (Sliced)?AttnProcessor, not dq's QuantAttnProcessor"):
        model(**inputs(model))
    with pytest.raises(TypeError, match=r"would run unquantized"):
        save_quantized(model, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_calling_without_a_timestep_and_a_cast_fractional_table_are_named():
    model = calibrated(tiny_unet(), QuantSpec(weight_bits=4, act_bits=8))
    with torch.no_grad(), pytest.raises(TypeError, match=r"called as unet\(sample, timestep, ...\)"):
        model(sample=inputs(model)["sample"])
    euler = tiny_unet()
    quantize_model(euler, QuantSpec(), timesteps=torch.tensor([999.0, 874.125, 0.0]))
    expand_act_quantizers(euler)
    euler.to(torch.bfloat16)
    with torch.no_grad(), pytest.raises(TypeError, match=r"timestep table was cast to torch.bfloat16"):
        euler(torch.zeros(1, 1, 8, 8, dtype=torch.bfloat16), 874.125)


def test_a_model_saved_in_float64_loads_back_in_float64_bit_for_bit(tmp_path):
    model = calibrated(tiny_unet(), QuantSpec(weight_bits=4, act_bits=8)).to(torch.float64)
    kw = {k: v.double() if v.is_floating_point() else v for k, v in inputs(model).items()}
    with torch.no_grad():
        expected = model(**kw).sample
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert next(loaded.parameters()).dtype == torch.float64
    with torch.no_grad():
        assert torch.equal(loaded(**kw).sample, expected)


def test_saving_a_float_model_is_refused_before_the_directory_is_made(tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(tiny_unet(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _codes(layer: QuantConv2d | QuantLinear, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The integer grid codes `clamp(round(W / Δ) + z, qmin, qmax)` of a layer's weight, computed in float32 (from W
    and Δ first cast to `dtype`, when given)."""
    q = layer.weight_quantizer
    w, scale = (layer.weight.detach(), q.scale) if dtype is None else (layer.weight.to(dtype), q.scale.to(dtype))
    w = w.float()
    z = q._view(q.zero_point.float(), w).round()
    return torch.clamp(torch.round(w / q._view(scale.float(), w)) + z, q.qmin, q.qmax)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_cast_to_half_precision_keeps_every_weights_grid_code(dtype):
    """Trained latent weights sit at rounding edges; a cast that rounds them to half precision must not move any across
    (it did: trained W4A8 students lost 1.5-3.6 dB of PSNR to the teacher in float16). A cast snaps W onto its grid
    with the step as the cast holds it: every code stays, 8-bit ones in bfloat16 included (they did not when W was
    snapped with the float32 step: 0.6 % moved)."""
    model = calibrated(tiny_unet(), QuantSpec(weight_bits=4, act_bits=8))
    layers = [m for m in model.modules() if isinstance(m, QuantConv2d | QuantLinear)]
    with torch.no_grad():
        for m in layers:  # every latent weight just below the edge between two codes, as training leaves many
            scale = m.weight_quantizer._view(m.weight_quantizer.scale, m.weight)
            m.weight.copy_(scale * (torch.floor(m.weight / scale) + 0.4999))
    codes = [_codes(m) for m in layers]
    kw = inputs(model)
    with torch.no_grad():
        out = model(**kw).sample
        before = [m.weight.clone() for m in layers]
        model.to(torch.float64).to(torch.float32)  # not half precision: the latent weights stay as they were
        assert all(torch.equal(m.weight, w) for m, w in zip(layers, before, strict=True))
        assert torch.equal(model(**kw).sample, out)
    assert {m.weight_quantizer.bits for m in layers} == {4, 8}
    assert sum(int((_codes(m, dtype) != c).sum()) for m, c in zip(layers, codes, strict=True)) > 0  # a plain cast
    names = [n for n, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)]
    held = model.state_dict()
    model.to(dtype)
    assert all(torch.equal(_codes(m), c) for m, c in zip(layers, codes, strict=True))
    assert all(torch.equal(held[f"{n}.weight"], w) for n, w in zip(names, before, strict=True))  # taken before: kept


def test_loading_a_run_directory_or_a_missing_one_says_what_to_pass(tmp_path):
    """`load_quantized(<run>)` is an easy slip for `load_quantized(<run>/student)`: the message names the folder."""
    model = tiny_unet()
    quantize_model(model, QuantSpec(weight_bits=4, act_bits=8))
    save_quantized(model, tmp_path / "run" / "student")
    with pytest.raises(MissingFileError, match=re.escape(f"pass {tmp_path / 'run' / 'student'}, where this dq-train")):
        load_quantized(tmp_path / "run")
    with pytest.raises(MissingFileError, match=re.escape(f"{tmp_path / 'nowhere'} is not a directory")):
        load_quantized(tmp_path / "nowhere")
