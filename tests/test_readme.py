"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from dq.quant import load_quantized

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readmes_python_example_quantizes_saves_and_samples_with_a_stock_pipeline(tmp_path, monkeypatch):
    code = re.search(r"\n## From Python\n.*?```python\n(.*?)```", README.read_text(), re.S)
    assert code, "README.md has no Python example under '## From Python'"
    monkeypatch.chdir(tmp_path)  # it saves to ./my_student
    scope: dict = {}
    exec(compile(code.group(1), str(README), "exec"), scope)
    images = scope["images"]
    assert images.shape == (4, 28, 28, 1) and np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1
    saved = load_quantized(tmp_path / "my_student").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in scope["student"].state_dict().items())
