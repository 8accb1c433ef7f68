"""experiments/stuck_step_sizes.py: the count of step sizes at or below SCALE_MIN that BENCHMARKS quotes."""

import subprocess
import sys

import torch
from conftest import REPO, load_script
from safetensors.torch import save_file

from dq.quant.quantizer import SCALE_MIN

SCRIPT = REPO / "experiments" / "stuck_step_sizes.py"


def test_counts_the_step_sizes_at_or_below_scale_min_by_quantizer(tmp_path):
    student = tmp_path / "run_a" / "student"
    student.mkdir(parents=True)
    state = {
        "conv.act_quantizer.scale": torch.tensor([0.1, SCALE_MIN, -3e-4, 0.2]),  # two stuck
        "conv.weight_quantizer.scale": torch.tensor([[0.03], [0.02]]),
        "attn.processor.prob_quantizer.scale": torch.tensor([-1e-3]),
        "conv.act_quantizer.zero_point": torch.tensor([-5.0]),  # a zero-point below zero is no step size
        "conv.weight": torch.zeros(2, 2),
    }
    save_file(state, str(student / "model.safetensors"))
    (student / "quant_spec.json").write_text("{}")
    expected = (7, 3, ["attn.processor.prob_quantizer: 1", "conv.act_quantizer: 2"])  # sorted
    assert load_script("stuck_step_sizes").stuck(student) == expected
    out = tmp_path / "table.md"
    printed = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--out", str(out)], capture_output=True, text=True, check=True
    ).stdout
    label = f"{tmp_path.name}/run_a"  # the run below its root, so that two roots' runs of one name stay apart
    assert f"| {label} | 7 | 3 | attn.processor.prob_quantizer: 1; conv.act_quantizer: 2 |" in printed
    assert out.read_text() == printed
