"""experiments/layer_share.py: the share of a teacher's MACs and weights in chosen layers, against torch's FLOP
counter and parameter shapes."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TEACHER, load_script
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dq.models import load_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def layer_share(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple:
    """(chosen, layers, MAC %, weight %) as the script prints them."""
    monkeypatch.setattr(sys, "argv", ["layer_share.py", *map(str, argv)])
    load_script("layer_share").main()
    printed = capsys.readouterr().out
    m = re.fullmatch(r"(\d+) of (\d+) layers: ([\d.]+)% of the MACs, ([\d.]+)% of the weights\n", printed)
    assert m, printed
    return int(m[1]), int(m[2]), float(m[3]), float(m[4])


def counts(model_dir: Path) -> tuple[dict[str, int], dict[str, int]]:
    """({layer: MACs}, {layer: weights}) of every conv and linear, from the weights' shapes (4-d: a conv, 2-d: a linear)
    and from FlopCounterMode's per-module FLOPs (2 per multiply-accumulate) on one sample at the model's size."""
    teacher, _ = load_teacher(model_dir)
    weights = {n.removesuffix(".weight"): p.numel() for n, p in teacher.named_parameters() if p.ndim in (2, 4)}
    size = teacher.config.sample_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        teacher(torch.randn(1, teacher.config.in_channels, size, size), torch.tensor([500]))
    flops = counter.get_flop_counts()
    macs = {n: sum(flops[f"{type(teacher).__name__}.{n}"].values()) // 2 for n in weights}
    return macs, weights


def reference(model_dir: Path, chosen: Callable[[str], bool]) -> tuple[int, int, float, float]:
    """(chosen, layers, MAC %, weight %) from `counts`."""
    macs, weights = counts(model_dir)
    picked = [n for n in weights if chosen(n)]
    share = lambda d: 100 * sum(d[n] for n in picked) / sum(d.values())
    return len(picked), len(weights), share(macs), share(weights)


def test_conv_shortcut_share_of_the_shipped_teacher(monkeypatch, capsys) -> None:
    """The figure BENCHMARKS quotes for `*.conv_shortcut`, against the FLOP counter and the weight shapes."""
    got = layer_share(monkeypatch, capsys, "*.conv_shortcut")  # the shipped teacher by default
    n, total, macs, weights = reference(TEACHER, lambda name: name.endswith(".conv_shortcut"))
    assert got[:2] == (n, total) and n > 0
    assert got[2] == pytest.approx(macs, abs=0.051) and got[3] == pytest.approx(weights, abs=0.051)


def test_a_name_a_prefix_and_overlapping_globs_count_each_layer_once(tiny_teacher_dir, monkeypatch, capsys) -> None:
    """`conv_in` and `conv_*` both select conv_in, `up_blocks.0.attentions.1` selects its linears: each layer once."""
    argv = ["conv_in", "conv_*", "up_blocks.0.attentions.1", "--model-path", tiny_teacher_dir]
    got = layer_share(monkeypatch, capsys, *argv)
    expected = reference(
        tiny_teacher_dir, lambda n: n in ("conv_in", "conv_out") or n.startswith("up_blocks.0.attentions.1.")
    )
    assert expected[0] == 2 + 4  # conv_in, conv_out; to_q, to_k, to_v, to_out.0
    assert got[:2] == expected[:2]
    assert got[2] == pytest.approx(expected[2], abs=0.051) and got[3] == pytest.approx(expected[3], abs=0.051)


def test_conv_in_by_hand(tiny_teacher_dir, monkeypatch, capsys) -> None:
    """conv_in of the tiny teacher by hand: 8 channels x 8 x 8 positions x (1 x 3 x 3) MACs, 8 x 9 weights; over the
    totals of the FLOP counter and the weight shapes."""
    got = layer_share(monkeypatch, capsys, "conv_in", "--model-path", tiny_teacher_dir)
    macs, weights = counts(tiny_teacher_dir)
    assert got[:2] == (1, len(weights))
    assert got[2] == pytest.approx(100 * 8 * 64 * 9 / sum(macs.values()), abs=0.051)
    assert got[3] == pytest.approx(100 * 8 * 9 / sum(weights.values()), abs=0.051)


class Depthwise(nn.Module):
    """A grouped 3x3 conv (two groups: each output sees one input channel) and a 1x1 conv, on 2 x 6 x 6 inputs."""

    config = SimpleNamespace(sample_size=6, in_channels=2)

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.pw = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


def test_a_grouped_conv_counts_its_inputs_per_group(monkeypatch, capsys) -> None:
    """By hand: dw 4 outputs x 36 positions x (2 / 2 channels x 9) = 1,296 MACs, pw 2 x 36 x 4 = 288; weights 36, 8."""
    script = load_script("layer_share")
    monkeypatch.setattr(script, "load_teacher", lambda path: (Depthwise(), None))
    monkeypatch.setattr(sys, "argv", ["layer_share.py", "dw"])
    script.main()
    assert capsys.readouterr().out == f"1 of 2 layers: {1296 / 1584:.1%} of the MACs, {36 / 44:.1%} of the weights\n"
