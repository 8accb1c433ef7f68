"""experiments/release_eval.py: a finished run's student re-scored with chosen quantizers switched off."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import compose_cfg, load_script
from omegaconf import OmegaConf
from test_train import fast

from dq.quant import act_quantizers, load_quantized, weight_quantizers
from dq.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def release_eval(monkeypatch: pytest.MonkeyPatch, *argv: str | Path) -> None:
    monkeypatch.setattr(sys, "argv", ["release_eval.py", *map(str, argv)])
    load_script("release_eval").main()


@pytest.fixture
def run(tiny_teacher_dir: Path, tmp_path: Path) -> Path:
    """A finished W4A4 run that trains quantizer parameters only, without Weight Dilation: with every quantizer off,
    its student is the teacher."""
    run, overrides = tmp_path / "run", fast(tiny_teacher_dir) + ["bits=w4a4", "distill.lr_weight=0", "callbacks=tpq"]
    cfg = compose_cfg("train", overrides, run)
    train(cfg)
    (run / ".hydra").mkdir()  # what the Hydra app writes beside its run
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    return run


def test_release_selects_by_glob_and_keep_inverts(run: Path, tmp_path: Path, monkeypatch) -> None:
    student = load_quantized(run / "student")
    names = [n for n, _ in [*weight_quantizers(student), *act_quantizers(student)]]
    trained = json.loads((run / "results.json").read_text())

    release_eval(monkeypatch, run, "*", "--out", tmp_path / "all_off")
    off = json.loads((tmp_path / "all_off" / "results.json").read_text())
    assert sorted(off["method"]["released"]) == sorted(names) and off["method"]["selected"] == ["*"]
    # every quantizer off: the student samples what the teacher does, from the run's own noise
    assert off["teacher"]["fid"] == pytest.approx(trained["teacher"]["fid"])
    assert off["student"]["fid"] == pytest.approx(off["teacher"]["fid"], rel=1e-3)
    assert off["student"]["psnr_to_teacher"] > 60 > trained["student"]["psnr_to_teacher"]
    assert (tmp_path / "all_off" / ".hydra" / "overrides.yaml").exists()  # collect.py reads the run's overrides

    release_eval(monkeypatch, run, "*", "--seed", 1, "--out", tmp_path / "other_noise")
    other = json.loads((tmp_path / "other_noise" / "results.json").read_text())
    assert other["metric"]["seed"] == 1 != trained["metric"]["seed"]  # teacher and student re-sampled from seed 1
    assert other["teacher"]["fid"] != pytest.approx(trained["teacher"]["fid"])
    assert other["student"]["fid"] == pytest.approx(other["teacher"]["fid"], rel=1e-3)

    release_eval(monkeypatch, run, "conv_in.act_quantizer", "--keep", "--out", tmp_path / "only_input")
    kept = json.loads((tmp_path / "only_input" / "results.json").read_text())["method"]
    assert kept["kept"] == ["conv_in.act_quantizer"]
    assert sorted(kept["released"]) == sorted(n for n in names if n != "conv_in.act_quantizer")

    release_eval(monkeypatch, run, "*.conv_shortcut", "--out", tmp_path / "shortcuts")
    released = json.loads((tmp_path / "shortcuts" / "results.json").read_text())["method"]["released"]
    assert released and all(".conv_shortcut." in n for n in released)
    assert released == [n for n in names if ".conv_shortcut." in n]  # weights and both halves of split inputs


def test_release_refuses_unmatched_names_and_writing_into_the_run(run: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(SystemExit, match=r"matches \['conv_inn'\]"):
        release_eval(monkeypatch, run, "conv_in", "conv_inn", "--out", tmp_path / "typo")
    assert not (tmp_path / "typo").exists()
    with pytest.raises(SystemExit, match="would be overwritten"):
        release_eval(monkeypatch, run, "conv_in", "--out", run)
