"""Property tests of Weight Dilation (METHOD.md section 1) on random weights, tiny diffusers UNets and the teacher."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import Tensor, nn

from dq.paths import asset
from dq.quant.dilation import dilate_, dilation_factors, fold_report, layer_names, shared_input_groups
from dq.quant.model import quantize_model, set_quant_state, weight_quantizers
from dq.quant.spec import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# Random weights of every shape class: square, wide, tall, conv 3x3 / 1x1, sparse, an all-zero column.


def _sparse(w: Tensor, p: float = 0.4) -> Tensor:
    return w * (torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > p)


def _zero_column(w: Tensor, k: int = 2) -> Tensor:
    w = w.clone()
    w[:, k] = 0
    return w


def _one_signed(w: Tensor) -> Tensor:
    w = w.clone()
    w[0] = w[0].abs()  # row 0 has no negative entry
    w[1] = -w[1].abs()  # row 1 has no positive entry
    return w


WEIGHTS: dict[str, Callable[[torch.Generator], Tensor]] = {
    "linear_square": lambda g: torch.randn(32, 32, generator=g),
    "linear_wide": lambda g: torch.randn(8, 96, generator=g),
    "linear_tall": lambda g: torch.randn(96, 8, generator=g),
    "conv3x3": lambda g: torch.randn(16, 24, 3, 3, generator=g),
    "conv3x3_square": lambda g: torch.randn(16, 16, 3, 3, generator=g),
    "conv1x1_wide": lambda g: torch.randn(4, 32, 1, 1, generator=g),
    "linear_sparse": lambda g: _sparse(torch.randn(24, 40, generator=g)),
    "conv_sparse": lambda g: _sparse(torch.randn(8, 12, 3, 3, generator=g), 0.7),
    "linear_zero_column": lambda g: _zero_column(torch.randn(12, 20, generator=g)),
    "conv_zero_column": lambda g: _zero_column(torch.randn(6, 10, 3, 3, generator=g)),
    "linear_one_signed_rows": lambda g: _one_signed(torch.randn(10, 30, generator=g)),
}


@pytest.fixture(params=sorted(WEIGHTS), ids=str)
def weight(request: pytest.FixtureRequest) -> Tensor:
    return WEIGHTS[request.param](torch.Generator().manual_seed(0))


def _rows(w: Tensor) -> Tensor:
    return w.flatten(1)  # [C_out, C_in * K]


def _dilate(w: Tensor, s: Tensor) -> Tensor:
    return w * s.view(1, -1, *([1] * (w.dim() - 2)))


def reference_factors(weights: list[Tensor], s_max: float = 1e4) -> Tensor:
    """METHOD.md's formula with explicit loops (Python floats are float64), plus the documented ulp guard."""
    ws = [w.reshape(w.shape[0], w.shape[1], -1) for w in weights]  # [C_out, C_in, K]
    c_in = ws[0].shape[1]
    raw = []
    for k in range(c_in):
        bound = math.inf
        for w in ws:
            for j in range(w.shape[0]):
                row = w[j].flatten().tolist()
                hi, lo = max(row), min(row)
                for e in w[j, k].tolist():
                    if e != 0 and e in (hi, lo):  # holds its row's max or min: saturated
                        bound = min(bound, 1.0)
                    elif e > 0:
                        bound = min(bound, hi / e)
                    elif e < 0:
                        bound = min(bound, lo / e)
        raw.append(1.0 if bound == math.inf else min(max(bound, 1.0), s_max))
    s = torch.tensor(raw, dtype=torch.float64).to(ws[0].dtype)
    for k in range(c_in):  # lower s_k by ulps until s_k * W[j, k, p] (weight dtype) stays inside every row range
        while any(
            bool(w[j, k, p] * s[k] > w[j].max() or w[j, k, p] * s[k] < w[j].min())
            for w in ws
            for j in range(w.shape[0])
            for p in range(w.shape[2])
        ):
            s[k] = torch.nextafter(s[k], torch.zeros(()))
    return s


# ---------------------------------------------------------------------------------------------------------------
# Properties of dilation_factors on single weights.


def test_row_ranges_unchanged_bit_exact(weight: Tensor) -> None:
    s = dilation_factors(weight)
    d = _dilate(weight, s)
    assert torch.equal(_rows(d).amax(1), _rows(weight).amax(1))
    assert torch.equal(_rows(d).amin(1), _rows(weight).amin(1))


def test_factors_bounded(weight: Tensor) -> None:
    s = dilation_factors(weight, s_max=50.0)
    assert s.shape == (weight.shape[1],) and s.dtype == weight.dtype
    assert (s >= 1).all() and (s <= 50.0).all()


def test_dilated_columns_touch_a_row_bound(weight: Tensor) -> None:
    s_max = 1e4
    s = dilation_factors(weight, s_max)
    d = _dilate(weight, s).flatten(2) if weight.dim() > 2 else _dilate(weight, s).unsqueeze(2)  # [C_out, C_in, K]
    hi = d.amax(dim=(1, 2), keepdim=True)
    lo = d.amin(dim=(1, 2), keepdim=True)
    gap = torch.where(d > 0, (hi - d) / hi, torch.where(d < 0, (lo - d) / lo, torch.ones_like(d)))  # relative
    dilated = (s > 1) & (s < s_max)
    assert (gap.amin(dim=(0, 2))[dilated] < 4 * torch.finfo(weight.dtype).eps).all()


def test_saturated_columns_get_exactly_one(weight: Tensor) -> None:
    s = dilation_factors(weight)
    w = weight.flatten(2) if weight.dim() > 2 else weight.unsqueeze(2)  # [C_out, C_in, K]
    hi, lo = w.amax(dim=(1, 2), keepdim=True), w.amin(dim=(1, 2), keepdim=True)
    holds_bound = (((w == hi) & (w != 0)) | ((w == lo) & (w != 0))).any(dim=2).any(dim=0)  # [C_in]
    assert holds_bound.any()
    assert (s[holds_bound] == 1).all()
    nonzero = (w != 0).any(dim=2).any(dim=0)  # [C_in]
    assert (s[~nonzero] == 1).all()
    assert (s[~holds_bound & nonzero] > 1).all(), "a non-zero column holding no bound can always grow a little"


def test_all_zero_column_gets_one() -> None:
    w = _zero_column(torch.randn(5, 7, generator=torch.Generator().manual_seed(3)), k=4)
    w[:, 5] = 1e-9  # tiny column → would grow past s_max
    s = dilation_factors(w, s_max=100.0)
    assert s[4] == 1
    assert s[5] == 100.0


def test_matches_loop_reference_exactly(weight: Tensor) -> None:
    small = weight[:6, :9]
    assert torch.equal(dilation_factors(small, s_max=30.0), reference_factors([small], s_max=30.0))


def test_rounding_guard_is_needed_and_works() -> None:
    """Casting the float64 bound to float32 alone pushes some s_k·W one ulp past its row bound; ours never does."""
    g = torch.Generator().manual_seed(0)
    naive_over = 0
    for _ in range(20):
        w = torch.randn(8, 64, generator=g)
        hi, lo = w.amax(1, keepdim=True), w.amin(1, keepdim=True)
        w64 = w.double()
        naive = torch.where(w64 > 0, hi.double() / w64, lo.double() / w64).amin(0).clamp(1, 1e4).float()
        naive_over += int(((w * naive > hi) | (w * naive < lo)).any())
        s = dilation_factors(w)
        assert ((w * s <= hi) & (w * s >= lo)).all()
        assert (s <= naive).all()
        torch.testing.assert_close(s, naive, rtol=2 * torch.finfo(torch.float32).eps, atol=0)
    assert naive_over > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_keep_row_ranges(dtype: torch.dtype) -> None:
    w = torch.randn(16, 48, 3, 3, generator=torch.Generator().manual_seed(2)).to(dtype)
    s = dilation_factors(w)
    assert s.dtype == dtype
    assert torch.equal(_rows(_dilate(w, s)).amax(1), _rows(w).amax(1))
    assert torch.equal(_rows(_dilate(w, s)).amin(1), _rows(w).amin(1))


def test_linear_equivalence() -> None:
    g = torch.Generator().manual_seed(4)
    w, b, x = torch.randn(24, 64, generator=g), torch.randn(24, generator=g), torch.randn(10, 64, generator=g)
    s = dilation_factors(w)
    assert (s > 1).sum() > 5
    torch.testing.assert_close(F.linear(x / s, w * s, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_conv_equivalence() -> None:
    g = torch.Generator().manual_seed(5)
    w, b, x = torch.randn(8, 32, 3, 3, generator=g), torch.randn(8, generator=g), torch.randn(2, 32, 9, 9, generator=g)
    s = dilation_factors(w)
    assert (s > 1).sum() > 3
    y = F.conv2d(x / s.view(1, -1, 1, 1), _dilate(w, s), b, padding=1)
    torch.testing.assert_close(y, F.conv2d(x, w, b, padding=1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Shared input (q/k/v): one s for all.


def test_shared_group_one_s_keeps_every_row_range() -> None:
    g = torch.Generator().manual_seed(6)
    qkv = [torch.randn(8, 48, generator=g) for _ in range(3)]
    s = dilation_factors(qkv)
    alone = torch.stack([dilation_factors(w) for w in qkv])
    torch.testing.assert_close(s, alone.amin(0), rtol=2 * torch.finfo(torch.float32).eps, atol=0)
    assert (s <= alone.amin(0)).all()
    assert (s > 1).any() and (s < alone.amax(0)).any()
    for w in qkv:
        assert torch.equal(_dilate(w, s).amax(1), w.amax(1))
        assert torch.equal(_dilate(w, s).amin(1), w.amin(1))
    assert torch.equal(dilation_factors([w[:5, :12] for w in qkv]), reference_factors([w[:5, :12] for w in qkv]))


def test_shared_group_zero_column_in_one_member_only() -> None:
    g = torch.Generator().manual_seed(7)
    a, b = _zero_column(torch.randn(6, 10, generator=g), k=3), torch.randn(6, 10, generator=g)
    s = dilation_factors([a, b])
    assert s[3] == dilation_factors(b)[3], "the zero column of `a` imposes no bound; `b` alone bounds it"
    assert dilation_factors([a, _zero_column(b, 3)])[3] == 1


@pytest.mark.parametrize(
    ("weights", "s_max", "message"),
    [
        ([torch.randn(4, 5), torch.randn(4, 6)], 1e4, "C_in"),
        ([torch.randn(4, 5)], 0.5, "s_max"),
        ([torch.tensor([[1.0, float("nan")]])], 1e4, "NaN"),
        ([torch.randn(5)], 1e4, "shape"),
        ([torch.randn(4, 5), torch.randn(4, 5).double()], 1e4, "dtype"),
        ([], 1e4, "at least one"),
    ],
)
def test_bad_input_raises(weights: list[Tensor], s_max: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dilation_factors(weights, s_max)


# ---------------------------------------------------------------------------------------------------------------
# dilate_ on duck-typed quantized layers (in_scale + weight_quantizer.init_from).


class _MinMaxQuantizer(nn.Module):
    """Stand-in for the per-out-channel min-max weight quantizer: records its range at init_from."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None

    def init_from(self, weight: Tensor) -> None:
        self.calls += 1
        self.lo, self.hi = weight.flatten(1).amin(1).clone(), weight.flatten(1).amax(1).clone()


class _FakeQuantLayer(nn.Module):
    """Stand-in for QuantConv2d/QuantLinear: `weight`, `weight_quantizer`, `in_scale` before an identity act quantizer.

    It keeps the float module as a child sharing the weight, so layer discovery must not count it twice.
    """

    def __init__(self, fp: nn.Conv2d | nn.Linear) -> None:
        super().__init__()
        self.fp = fp
        self.weight = fp.weight
        self.weight_quantizer = _MinMaxQuantizer()
        self.weight_quantizer.init_from(fp.weight.detach())
        self.register_buffer("in_scale", torch.ones(fp.weight.shape[1], dtype=fp.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.in_scale.view(-1, 1, 1) if isinstance(self.fp, nn.Conv2d) else self.in_scale
        return self.fp(x * scale)


def test_dilate_installs_inverse_and_reinits_quantizer() -> None:
    torch.manual_seed(8)
    layers = [_FakeQuantLayer(nn.Linear(40, 8)) for _ in range(3)]
    before = [layer.weight.detach().clone() for layer in layers]
    ranges = [(layer.weight_quantizer.lo, layer.weight_quantizer.hi) for layer in layers]
    x = torch.randn(5, 40)
    y = [layer(x) for layer in layers]
    s = dilate_(layers)
    assert (s > 1).any()
    for layer, w0, (lo, hi), y0 in zip(layers, before, ranges, y, strict=True):
        assert torch.equal(layer.weight, w0 * s)
        torch.testing.assert_close(layer.in_scale, 1 / s, rtol=1e-7, atol=0)
        assert layer.weight_quantizer.calls == 2
        assert torch.equal(layer.weight_quantizer.lo, lo) and torch.equal(layer.weight_quantizer.hi, hi)
        torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-6)


def test_dilate_plain_conv_and_is_idempotent() -> None:
    torch.manual_seed(9)
    conv = nn.Conv2d(24, 8, 3)
    w0, version = conv.weight.detach().clone(), conv.weight._version
    s = dilate_([conv])
    assert conv.weight._version > version  # an edit through .data kept it: it keys the quantized weight's cache
    assert torch.equal(conv.weight, _dilate(w0, s))
    again = dilate_([conv])
    assert (s > 1).any()
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(again, torch.ones_like(again), rtol=2 * eps, atol=0, msg="no room left after dilation")


def test_dilate_rejects_grouped_conv_and_bad_in_scale() -> None:
    with pytest.raises(ValueError, match="groups"):
        dilate_([nn.Conv2d(8, 8, 3, groups=2)])
    layer = _FakeQuantLayer(nn.Linear(6, 4))
    layer.in_scale = torch.ones(5)
    with pytest.raises(ValueError, match="in_scale"):
        dilate_([layer])
    with pytest.raises(ValueError, match="at least one"):
        dilate_([])


# ---------------------------------------------------------------------------------------------------------------
# Whole UNets: groups, fold report, and function preserved when every group is dilated.


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(10)
    return UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def _tiny_cond_unet() -> UNet2DConditionModel:
    torch.manual_seed(11)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=12,
        attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).eval()


TEACHER_DIR = Path(asset("ddpm_mnist")) / "unet"


def _teacher() -> UNet2DModel:
    assert TEACHER_DIR.is_dir(), f"the shipped teacher is missing at {TEACHER_DIR} (dq-pretrain builds it)"
    return UNet2DModel.from_pretrained(TEACHER_DIR, local_files_only=True).eval()


MODELS: dict[str, Callable[[], nn.Module]] = {"unet2d": _tiny_unet, "unet2d_cond": _tiny_cond_unet}


def _run(model: nn.Module) -> Tensor:
    g = torch.Generator().manual_seed(12)
    cfg = model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    dtype = next(model.parameters()).dtype
    x = torch.randn(2, cfg.in_channels, size, size, generator=g).to(dtype)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        if isinstance(model, UNet2DConditionModel):
            ctx = torch.randn(2, 5, cfg.cross_attention_dim, generator=g).to(dtype)
            return model(x, t, encoder_hidden_states=ctx).sample
        return model(x, t).sample


def _input_divider(s: Tensor) -> Callable[[nn.Module, tuple[Tensor, ...]], tuple[Tensor, ...]]:
    """Forward pre-hook emulating `in_scale` on a plain layer: divide input channel k by s_k."""

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x = args[0]
        inv = (1 / s).view(-1, 1, 1) if x.dim() == 4 else 1 / s
        return (x * inv.to(x.dtype), *args[1:])

    return hook


def _fold(producer: nn.Module, s: Tensor) -> None:
    """Export-style fold of 1/s into an affine producer: a norm's affine or a linear layer's output rows."""
    with torch.no_grad():
        inv = (1 / s).to(producer.weight.dtype)
        producer.weight.mul_(inv.view(-1, *([1] * (producer.weight.dim() - 1))))
        if producer.bias is not None:
            producer.bias.mul_(inv)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_groups_partition_every_layer(name: str) -> None:
    model = MODELS[name]()
    groups = shared_input_groups(model)
    flat = [n for group in groups for n in group]
    expected = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert sorted(flat) == sorted(expected) and len(flat) == len(set(flat))
    attentions = [n for n, m in model.named_modules() if type(m).__name__ == "Attention"]
    assert attentions
    for attn in attentions:
        qkv = [f"{attn}.to_q", f"{attn}.to_k", f"{attn}.to_v"]
        if model.get_submodule(attn).is_cross_attention:
            assert [qkv[0]] in groups and qkv[1:] in groups
        else:
            assert qkv in groups
    assert all(len(g) == 1 for g in groups if not g[0].endswith((".to_q", ".to_k")))


def test_cond_unet_has_both_attention_kinds() -> None:
    groups = shared_input_groups(_tiny_cond_unet())
    base = "down_blocks.1.attentions.0.transformer_blocks.0"
    assert [f"{base}.attn1.to_q", f"{base}.attn1.to_k", f"{base}.attn1.to_v"] in groups
    assert [f"{base}.attn2.to_q"] in groups and [f"{base}.attn2.to_k", f"{base}.attn2.to_v"] in groups


@pytest.mark.parametrize("name", sorted(MODELS))
def test_groups_survive_quantization_swap(name: str) -> None:
    model = MODELS[name]()
    groups, report = shared_input_groups(model), fold_report(model)
    _swap_to_fake_quant(model)
    assert shared_input_groups(model) == groups
    assert fold_report(model) == report


def _swap_to_fake_quant(model: nn.Module) -> None:
    for name in layer_names(model):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _FakeQuantLayer(getattr(owner, child)))


def test_factors_that_would_move_a_row_range_are_an_error_not_returned(monkeypatch) -> None:
    """Without the one-ulp reductions the cast factors push some weight past its row's range (a changed Δ_w): an
    error naming the channels, where before the function returned them."""
    import dq.quant.dilation as dilation

    w = torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(0))
    d = w * dilation_factors(w).view(1, -1, 1, 1)
    assert torch.equal(d.amin((1, 2, 3)), w.amin((1, 2, 3))) and torch.equal(d.amax((1, 2, 3)), w.amax((1, 2, 3)))
    monkeypatch.setattr(dilation, "_MAX_NUDGES", 0)
    with pytest.raises(ArithmeticError, match=r"input channels \[\d+.*after 0 one-ulp reductions"):
        dilation_factors(w)


def test_fold_report_unet2d() -> None:
    report = fold_report(_tiny_unet())
    assert set(report) == set(layer_names(_tiny_unet()))
    a = "down_blocks.1.attentions.0"
    for proj in ("to_q", "to_k", "to_v"):
        assert report[f"{a}.{proj}"].startswith(f"foldable into {a}.group_norm")
    assert report[f"{a}.to_out.0"].startswith(f"foldable into {a}.to_v")
    for layer, why in [
        ("conv_in", "model input"),
        ("conv_out", "SiLU"),
        ("time_embedding.linear_1", "sinusoidal"),
        ("time_embedding.linear_2", "SiLU"),
        ("down_blocks.0.resnets.0.conv1", "SiLU"),
        ("down_blocks.0.resnets.0.conv2", "SiLU"),
        ("down_blocks.0.resnets.0.time_emb_proj", "SiLU"),
        ("down_blocks.1.resnets.0.conv_shortcut", "block input"),
        ("down_blocks.0.downsamplers.0.conv", "residual"),
        ("up_blocks.0.upsamplers.0.conv", "residual"),
    ]:
        assert report[layer].startswith("not foldable") and why in report[layer], (layer, report[layer])
    assert not any("no fold rule" in v for v in report.values())


def test_fold_report_of_a_quantized_unet_does_not_fold_into_a_quantized_v() -> None:
    """dq's attention quantizes V before probs @ V: 1/s folded into to_v's rows would reach V's quantizer."""
    from dq.quant import QuantSpec, quantize_model

    model = _tiny_unet()
    quantize_model(model, QuantSpec())
    report, a = fold_report(model), "down_blocks.1.attentions.0"
    assert report[f"{a}.to_out.0"].startswith("not foldable") and "V is quantized" in report[f"{a}.to_out.0"]
    assert report[f"{a}.to_q"].startswith(f"foldable into {a}.group_norm")


def test_fold_report_cond_unet() -> None:
    report = fold_report(_tiny_cond_unet())
    t = "mid_block.attentions.0"
    b = f"{t}.transformer_blocks.0"
    assert report[f"{t}.proj_in"].startswith(f"foldable into {t}.norm ")
    for proj in ("to_q", "to_k", "to_v"):
        assert report[f"{b}.attn1.{proj}"].startswith(f"foldable into {b}.norm1")
    assert report[f"{b}.attn2.to_q"].startswith(f"foldable into {b}.norm2")
    for proj in ("to_k", "to_v"):
        assert (
            report[f"{b}.attn2.{proj}"].startswith("not foldable")
            and "encoder_hidden_states" in report[f"{b}.attn2.{proj}"]
        )
    assert report[f"{b}.attn2.to_out.0"].startswith(f"foldable into {b}.attn2.to_v")
    assert report[f"{b}.ff.net.0.proj"].startswith(f"foldable into {b}.norm3")
    assert report[f"{b}.ff.net.2"].startswith("not foldable") and "GEGLU" in report[f"{b}.ff.net.2"]
    assert report[f"{t}.proj_out"].startswith("not foldable")
    assert not any("no fold rule" in v for v in report.values())


def _dilate_model_with_hooks(model: nn.Module, fold: bool) -> dict[str, Tensor]:
    """Dilate every shared-input group; 1/s folded into its producer where fold_report says so, else a pre-hook."""
    report = fold_report(model) if fold else {}
    factors: dict[str, Tensor] = {}
    for group in shared_input_groups(model):
        s = dilate_([model.get_submodule(n) for n in group])
        verdicts = {report.get(n, "not foldable") for n in group}
        assert len(verdicts) == 1, f"one group, one producer: {verdicts}"
        verdict = verdicts.pop()
        if verdict.startswith("foldable into "):
            _fold(model.get_submodule(verdict.split()[2]), s)
        else:
            for n in group:
                model.get_submodule(n).register_forward_pre_hook(_input_divider(s))
        factors.update(dict.fromkeys(group, s))
    return factors


@pytest.mark.parametrize("fold", [False, True], ids=["prehook", "fold"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_dilated_model_output_unchanged(name: str, fold: bool) -> None:
    model = MODELS[name]().double()
    y0 = _run(model)
    factors = _dilate_model_with_hooks(model, fold)
    assert sum(int((s > 1).sum()) for s in factors.values()) > 10
    torch.testing.assert_close(_run(model), y0, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dilated_quantized_layers_output_unchanged(name: str) -> None:
    """After the swap to (identity-quantizer) layers with `in_scale`, dilate_ alone keeps the function."""
    model = MODELS[name]().double()
    y0 = _run(model)
    _swap_to_fake_quant(model)
    for group in shared_input_groups(model):
        dilate_([model.get_submodule(n) for n in group])
    torch.testing.assert_close(_run(model), y0, rtol=1e-9, atol=1e-10)


def test_forgetting_inverse_changes_output() -> None:
    """Negative control: dilating weights without dividing the input must change the output."""
    model = _tiny_unet()
    y0 = _run(model)
    for group in shared_input_groups(model):
        dilate_([model.get_submodule(n) for n in group])
    assert (_run(model) - y0).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# The shipped teacher.


def test_teacher_dilation_statistics() -> None:
    model = _teacher()
    y0 = _run(model)
    groups = shared_input_groups(model)
    factors = {tuple(g): dilation_factors([model.get_submodule(n).weight for n in g]) for g in groups}
    s_all = torch.cat(list(factors.values()))
    share = (s_all > 1).float().mean().item()
    report = fold_report(model)
    n_fold = sum(v.startswith("foldable") for v in report.values())
    print(
        f"\nteacher WD: {len(groups)} groups, {s_all.numel()} input channels, mean s {s_all.mean():.4f}, "
        f"max s {s_all.max():.3f}, dilated {share:.1%} (s > 1.01: {(s_all > 1.01).float().mean():.1%}); "
        f"1/s foldable for {n_fold}/{len(report)} layers"
    )
    for g, s in factors.items():
        label = g[0] if len(g) == 1 else f"{g[0]} (+{len(g) - 1} sharing its input)"
        print(f"  {label:58s} C_in {s.numel():4d}  mean {s.mean():.4f}  max {s.max():.3f}  dilated {(s > 1).sum()}")
    assert (s_all >= 1).all() and (s_all <= 1e4).all()
    assert 0 < share < 1 and s_all.mean() > 1
    for g, s in factors.items():
        for n in g:
            w = model.get_submodule(n).weight
            assert torch.equal(_rows(_dilate(w, s)).amax(1), _rows(w).amax(1))
            assert torch.equal(_rows(_dilate(w, s)).amin(1), _rows(w).amin(1))
    _dilate_model_with_hooks(model, fold=True)
    torch.testing.assert_close(_run(model), y0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dilate_after_quantize_model(name: str) -> None:
    """With dq's own QuantConv2d/QuantLinear: same groups and fold report, Δ_w and z_w bit-identical, function kept."""
    model = MODELS[name]()
    y0 = _run(model)
    groups, report = shared_input_groups(model), fold_report(model)
    quantize_model(model, QuantSpec(weight_bits=4, act_bits=8))
    assert shared_input_groups(model) == groups
    v_quantized = {n for n in report if n.endswith(".to_out.0")}  # no longer folds into to_v: V is quantized now
    assert {n: v for n, v in fold_report(model).items() if n not in v_quantized} == {
        n: v for n, v in report.items() if n not in v_quantized
    }
    assert all(fold_report(model)[n].startswith("not foldable: V is quantized") for n in v_quantized)
    params0 = {n: (q.scale.detach().clone(), q.zero_point.detach().clone()) for n, q in weight_quantizers(model)}
    n_dilated = sum(int((dilate_([model.get_submodule(n) for n in g]) > 1).sum()) for g in groups)
    assert n_dilated > 10
    for n, q in weight_quantizers(model):
        assert torch.equal(q.scale, params0[n][0]) and torch.equal(q.zero_point, params0[n][1]), n
    set_quant_state(model, weights=False, acts=False)
    torch.testing.assert_close(_run(model), y0, rtol=1e-4, atol=1e-5)
