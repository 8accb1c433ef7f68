"""experiments/sensitivity.py: its quantizer groups, medians and scores against hand-built references."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, load_script, psnr_by_hand, run_script_main, tiny_unet
from torch import nn

from dq.metrics.fid_is import PSNR_CAP_DB
from dq.models import ddim_sample, load_teacher, make_noise
from dq.quant import (
    QuantSpec,
    TemporalQuantizer,
    UniformQuantizer,
    act_quantizers,
    quantize_model,
    save_quantized,
    weight_quantizers,
)
from dq.quant.spec import QuantizerSpec
from dq.student import build_student, calibration_set

pytestmark = pytest.mark.usefixtures("one_thread")

sens = load_script("sensitivity")


def quantized_tiny(split: bool = False) -> tuple[nn.Module, nn.Module]:
    """(tiny student at W4A4 with three sampling steps, its float teacher)."""
    teacher, student = tiny_unet(), tiny_unet()
    quantize_model(student, QuantSpec(weight_bits=4, act_bits=4, split_concat=split), torch.tensor([900, 500, 100]))
    return student, teacher


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("conv_in.act_quantizer", "conv_in: the network input x_t"),
        ("conv_out.act_quantizer", "conv_out input"),
        ("time_embedding.linear_2.act_quantizer", "time embedding MLP"),
        ("up_blocks.0.resnets.1.time_emb_proj.act_quantizer", "time_emb_proj"),
        ("mid_block.attentions.0.processor.prob_quantizer", "attention probabilities"),
        ("mid_block.attentions.0.processor.k_quantizer", "attention q / k / v matmul inputs"),
        ("down_blocks.1.attentions.0.to_v.act_quantizer", "attention to_q / to_k / to_v inputs"),
        ("down_blocks.1.attentions.0.to_out.0.act_quantizer", "attention to_out input"),
        ("mid_block.resnets.1.conv1.act_quantizer", "resnet conv1"),
        ("down_blocks.0.resnets.0.conv2.act_quantizer", "resnet conv2"),
        ("up_blocks.1.resnets.0.conv_shortcut.act_quantizer_skip", "resnet conv_shortcut (skip concat)"),
        ("up_blocks.0.upsamplers.0.conv.act_quantizer", "down / up samplers"),
        ("down_blocks.0.downsamplers.0.conv.act_quantizer", "down / up samplers"),
        ("mid_block.resnets.0.norm1", "other"),
        ("xconv_in.act_quantizer", "other"),  # anchored: conv_in only at the start of the path
    ],
)
def test_role_of(name: str, role: str) -> None:
    """The role of a module path, from a table written by hand for paths of a diffusers UNet."""
    assert sens.role_of(name) == role


def test_released_switches_off_and_restores_each_flag() -> None:
    """Reference: each quantizer's own flag before the block (one already off stays off), also after an error."""
    qs = [UniformQuantizer(QuantizerSpec(4)) for _ in range(3)]
    qs[1].enabled = False
    with sens.released(qs[:2]):
        assert [q.enabled for q in qs] == [False, False, True]
    assert [q.enabled for q in qs] == [True, False, True]
    with pytest.raises(KeyError), sens.released(qs):
        assert not any(q.enabled for q in qs)
        raise KeyError
    assert [q.enabled for q in qs] == [True, False, True]


def test_median_step_of_absolute_step_sizes() -> None:
    """Reference: the lower middle of all |Δ| sorted by hand (torch's median of an even count)."""
    a = UniformQuantizer(QuantizerSpec(4, granularity="channel"), num_channels=3)
    b = TemporalQuantizer(QuantizerSpec(4), num_steps=4)
    with torch.no_grad():
        a.scale.copy_(torch.tensor([0.5, -7.0, 0.1]))
        b.scale.copy_(torch.tensor([-0.3, 0.2, 9.0, 0.05]))
    values = sorted(abs(v) for v in [0.5, -7.0, 0.1, -0.3, 0.2, 9.0, 0.05])  # 0.05 0.1 0.2 0.3 0.5 7 9
    assert sens.median_step([a, b]) == pytest.approx(values[3])
    assert sens.median_step([b]) == pytest.approx(0.2)  # 0.05 0.2 0.3 9: the lower of the two middles


def test_groups_by_role_and_by_layer_partition_the_activation_quantizers() -> None:
    """Reference: the quantizers held by hand-picked modules; every activation quantizer in exactly one group."""
    student, _ = quantized_tiny(split=True)
    by_role, by_layer = sens.groups_by_role(student), sens.groups_by_layer(student)
    n_act = len(list(act_quantizers(student)))
    for groups in (by_role, by_layer):
        ids = [id(q) for qs in groups.values() for q in qs]
        assert len(ids) == len(set(ids)) == n_act
    get = student.get_submodule
    assert by_role["conv_in: the network input x_t"] == [get("conv_in.act_quantizer")]
    assert len(by_role["attention probabilities"]) == 4  # down, two up, mid attention
    assert len(by_role["resnet conv_shortcut (skip concat)"]) == 1 + 2 * 4  # one plain, four split convs
    assert "other" not in by_role
    shortcut = "up_blocks.1.resnets.0.conv_shortcut"
    assert by_layer[shortcut] == [get(f"{shortcut}.act_quantizer"), get(f"{shortcut}.act_quantizer_skip")]
    proc = "mid_block.attentions.0.processor"
    assert by_layer[proc] == [get(f"{proc}.{k}_quantizer") for k in ("q", "k", "v", "prob")]
    assert by_layer["time_embedding.linear_1"] == [get("time_embedding.linear_1.act_quantizer")]


def test_groups_by_block_hold_weights_and_activations_of_the_block() -> None:
    """Reference: the weight and activation quantizers found below each block's module by hand."""
    student, teacher = quantized_tiny()
    groups = sens.groups_by_block(student, teacher)
    every = [q for _, q in [*weight_quantizers(student), *act_quantizers(student)]]
    assert sorted(id(q) for qs in groups.values() for q in qs) == sorted(map(id, every))
    ids = lambda *names: {id(student.get_submodule(n)) for n in names}
    assert {id(q) for q in groups["conv_in"]} == ids("conv_in.weight_quantizer", "conv_in.act_quantizer")
    attn = "down_blocks.1.attentions.0"
    layers = [f"{attn}.{p}.{k}_quantizer" for p in ("to_q", "to_k", "to_v", "to_out.0") for k in ("weight", "act")]
    processor = [f"{attn}.processor.{k}_quantizer" for k in ("q", "k", "v", "prob")]
    assert {id(q) for q in groups[attn]} == ids(*layers, *processor)
    assert {id(q) for q in groups["conv_out"]} == ids("conv_out.weight_quantizer", "conv_out.act_quantizer")


def table_rows(text: str) -> dict[str, tuple[int, float, float]]:
    """{group: (quantizers, dB, gain dB)} of the printed markdown table."""
    rows = re.findall(r"^\| (.+?) \| (\d+) \| (-?[\d.]+) \| ([+-][\d.]+) \|$", text, flags=re.M)
    return {name: (int(k), float(v), float(g)) for name, k, v, g in rows}


def ptq_overrides(tiny: Path) -> list[str]:
    return [
        f"model.path={tiny}", "model.sample_shape=[1,8,8]", "model.num_inference_steps=3", "quantizer=ptq_minmax",
        "bits=w4a4", "calib.n_calib=12", "calib.batch_size=12",
    ]  # fmt: skip


def sqnr_by_hand(out: torch.Tensor, ref: torch.Tensor) -> float:
    return 10 * math.log10(ref.double().pow(2).sum().item() / (out - ref).double().pow(2).sum().item())


def test_main_sqnr_by_layer(tiny_teacher_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Each row's SQNR against 10 log10(Σ ref² / Σ err²) on held-out pairs (calib.seed 100) of a PTQ student built
    here, with the row's quantizers switched off by hand; the gains, counts and the median step line too."""
    overrides, n = ptq_overrides(tiny_teacher_dir), 16
    out_file = tmp_path / "table.md"
    argv = ["--ptq", *overrides, "--n", n, "--by", "layer", "--out", out_file]  # the teacher from model.path alone
    text = run_script_main(sens, monkeypatch, capsys, *argv)
    assert out_file.read_text() == text[text.index("Sensitivity of") :]  # the table, without the progress lines

    cfg = compose_cfg("eval", [*overrides, "eval.progress=false"], tmp_path / "ref")
    teacher, scheduler = load_teacher(tiny_teacher_dir)
    student, _ = build_student(cfg, teacher, scheduler)
    cfg.calib.seed, cfg.calib.n_calib = 100, n  # held out: not the pairs (calib.seed 1) the ranges were fitted on
    pairs = calibration_set(cfg, teacher, scheduler)
    assert len(pairs.x_t) == n
    with torch.no_grad():
        ref = teacher(pairs.x_t, pairs.timesteps).sample

    def score(*off: nn.Module) -> float:
        for q in off:
            q.enabled = False
        with torch.no_grad():
            db = sqnr_by_hand(student(pairs.x_t, pairs.timesteps).sample, ref)
        for q in off:
            q.enabled = True
        return db

    acts = [q for _, q in act_quantizers(student)]
    weights = [q for _, q in weight_quantizers(student)]
    expected = {
        "all quantized": (0, score()),
        "weights only (all activations FP)": (len(acts), score(*acts)),
        "activations only (all weights FP)": (len(weights), score(*weights)),
    }
    for name, module in student.named_modules():  # a layer: a module holding activation quantizers directly
        held = [c for c in module.children() if isinstance(c, TemporalQuantizer)]
        if held:
            expected[f"{name} released"] = (len(held), score(*held))
    rows = table_rows(text)
    assert rows.keys() == expected.keys()
    base = expected["all quantized"][1]
    for name, (k, db) in expected.items():
        assert rows[name][0] == k, name
        assert rows[name][1] == pytest.approx(db, abs=0.006), name
        assert rows[name][2] == pytest.approx(db - base, abs=0.011), name
    assert rows["weights only (all activations FP)"][1] > base + 3  # the 4-bit activations cost something

    steps_w = sorted(float(v) for w in weights for v in w.scale.detach().abs().flatten())
    steps_a = sorted(float(v) for a in acts for v in a.scale.detach().abs().flatten())
    w_med, a_med = steps_w[(len(steps_w) - 1) // 2], steps_a[(len(steps_a) - 1) // 2]
    assert f"Median step size: weights {w_med:.2e}, activations {a_med:.2e}." in text


def test_main_psnr_with_weights_fp(tiny_teacher_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """The one row of `--weights-fp --by none --metric psnr` against the mean over images of 10 log10(2² / MSE) of
    DDIM samples from seeded noise, the student's weight quantizers switched off by hand."""
    overrides, n, seed = ptq_overrides(tiny_teacher_dir), 6, 3
    argv = ["--ptq", *overrides, "--teacher", tiny_teacher_dir, "--n", n, "--seed", seed, "--metric", "psnr"]
    text = run_script_main(sens, monkeypatch, capsys, *argv, "--weights-fp", "--by", "none")
    rows = table_rows(text)
    assert list(rows) == ["all quantized"] and "weights FP" in text

    cfg = compose_cfg("eval", [*overrides, "eval.progress=false"], tmp_path / "ref")
    teacher, scheduler = load_teacher(tiny_teacher_dir)
    student, _ = build_student(cfg, teacher, scheduler)
    for _, q in weight_quantizers(student):
        q.enabled = False
    noise = make_noise(n, (1, 8, 8), seed)
    ref = ddim_sample(teacher, scheduler, noise, 3, progress=False).double()
    out = ddim_sample(student, scheduler, noise, 3, progress=False).double()
    assert PSNR_CAP_DB == 100.0  # psnr_by_hand's cap
    assert rows["all quantized"][1] == pytest.approx(psnr_by_hand(out, ref), abs=0.006)
    for _, q in weight_quantizers(student):
        q.enabled = True
    quantized = ddim_sample(student, scheduler, noise, 3, progress=False).double()
    assert not torch.allclose(quantized, out)  # the weights-FP row is not the fully quantized student's


def test_main_scores_a_saved_student_on_pairs_of_its_teachers_shape(tiny_teacher_dir: Path, tmp_path, monkeypatch,
                                                                    capsys) -> None:  # fmt: skip
    """`--student DIR --teacher DIR`: the held-out pairs take the teacher's shape (8x8 here, not the default
    config's 28x28); the whole-model SQNR against the hand formula on those pairs."""
    overrides, n = ptq_overrides(tiny_teacher_dir), 8
    cfg = compose_cfg("eval", [*overrides, "eval.progress=false"], tmp_path / "ref")
    teacher, scheduler = load_teacher(tiny_teacher_dir)
    student, _ = build_student(cfg, teacher, scheduler)
    save_quantized(student, tmp_path / "student")
    argv = ["--student", tmp_path / "student", "--teacher", tiny_teacher_dir, "--n", n, "--by", "none"]
    text = run_script_main(sens, monkeypatch, capsys, *argv)
    cfg.calib.seed, cfg.calib.n_calib = 100, n
    pairs = calibration_set(cfg, teacher, scheduler)
    assert pairs.x_t.shape == (n, 1, 8, 8)
    with torch.no_grad():
        expected = sqnr_by_hand(student(pairs.x_t, pairs.timesteps).sample, teacher(pairs.x_t, pairs.timesteps).sample)
    assert table_rows(text)["all quantized"][1] == pytest.approx(expected, abs=0.006)


def test_two_different_teachers_are_refused(tiny_teacher_dir: Path, tmp_path, monkeypatch, capsys) -> None:
    """`--teacher A` with `model.path=B`: which one the student came from would be a guess."""
    with pytest.raises(SystemExit):
        run_script_main(
            sens, monkeypatch, capsys, "--ptq", *ptq_overrides(tiny_teacher_dir), "--teacher", tmp_path / "other"
        )
    assert "name two teachers" in capsys.readouterr().err
