"""experiments/zero_point_drift.py: how far trained zero-points sit from the whole numbers they start on."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO, load_script
from safetensors.torch import save_file

SCRIPT = REPO / "experiments" / "zero_point_drift.py"


def test_reports_the_farthest_zero_point_from_a_whole_number_by_kind(tmp_path):
    student = tmp_path / "run_a" / "student"
    student.mkdir(parents=True)
    state = {
        "conv.act_quantizer.zero_point": torch.tensor([3.0, -4.06, 7.02]),
        "attn.processor.prob_quantizer.zero_point": torch.tensor([0.0]),
        "conv.weight_quantizer.zero_point": torch.tensor([[7.001], [8.3]]),
        "conv.act_quantizer.scale": torch.tensor([0.4]),  # a step size is no zero-point
    }
    save_file(state, str(student / "model.safetensors"))
    (student / "quant_spec.json").write_text("{}")
    got = load_script("zero_point_drift").drift(student)
    assert got.keys() == {"weight", "activation"}
    assert got["weight"][0] == 2 and got["weight"][1] == pytest.approx(0.3, abs=1e-5)
    assert got["activation"][0] == 4 and got["activation"][1] == pytest.approx(0.06, abs=1e-5)
    out = tmp_path / "table.md"
    printed = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--out", str(out)], capture_output=True, text=True, check=True
    ).stdout
    assert f"| {tmp_path.name}/run_a | 2 | 0.3000 | 4 | 0.0600 |" in printed
    assert out.read_text() == printed
