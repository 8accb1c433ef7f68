"""experiments/block_history.py: per-block MSE ratios and oscillating shares of BKD runs (BENCHMARKS quotes them)."""

import json
import math
from pathlib import Path

import pytest
from conftest import load_script


def _script():
    return load_script("block_history")


def _run(path: Path, entries: list[dict]) -> Path:
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "last.json").write_text(json.dumps({"finished_blocks": len(entries), "history": entries}))
    return path


def _entry(block: str, mse: float, **kw) -> dict:
    return {"block": block, "mse_before": 1.0, "mse_trained": mse, "mse_after": mse, "kept": "trained", **kw}


def test_summary_is_the_geometric_mean_ratio_and_the_4bit_mean_share(tmp_path, monkeypatch, capsys):
    base = _run(
        tmp_path / "base", [_entry("conv_in", 1.0), _entry("a", 1.0), _entry("b", 2.0), _entry("conv_out", 1.0)]
    )
    run = _run(
        tmp_path / "run",
        [_entry("conv_in", 5.0, oscillated=0.9), _entry("a", 2.0, oscillated=0.2, frozen=0.1),
         _entry("b", 1.0, oscillated=0.4, frozen=0.3, kept="untrained"), _entry("conv_out", 4.0, oscillated=0.8)],
    )  # fmt: skip
    monkeypatch.setattr("sys.argv", ["block_history.py", str(run), "--against", str(base)])
    _script().main()
    out = capsys.readouterr().out
    geo = math.exp((math.log(2.0) + math.log(0.5) + math.log(4.0)) / 3)  # a, b, conv_out; conv_in is left out
    assert f"block MSE x{geo:.3f} (geometric mean of 3, 0.50-4.00)" in out
    assert "oscillated 30% (20-40%)" in out  # a and b only: conv_in / conv_out are the 8-bit ends
    assert "frozen 20%" in out
    assert "(0.50x) 40% f30% R" in out  # block b: ratio, share, frozen, put back


def test_a_run_without_a_history_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["block_history.py", str(tmp_path)])
    with pytest.raises(SystemExit, match="last.json not found"):
        _script().main()
