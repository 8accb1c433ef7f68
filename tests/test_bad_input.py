"""Bad input and interruptions that a robustness review met as tracebacks, silent overwrites or late failures: each
is now one line naming the field or file and what to do, before anything computed is lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLASSIFIER, compose_cfg, tiny_unet
from test_train import fast

import dq.distill.checkpoint
import dq.train
from dq.config import _unusable_run_dir, cli_errors
from dq.distill.checkpoint import CHECKPOINT_NAME, load_block_checkpoint, save_block_checkpoint
from dq.errors import CheckpointError, ConfigError, MissingFileError
from dq.eval import load_student
from dq.models import load_teacher
from dq.paths import cache_dir
from dq.train import train
from dq.validation import validate


def test_dq_train_into_a_dq_eval_run_is_refused_and_changes_nothing(tiny_teacher_dir, tmp_path):
    """dq-eval refused a dq-train run's directory, but dq-train replaced a dq-eval run's results.json and grid."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"method": {"quantizer": "ptq_minmax"}}))
    with pytest.raises(ConfigError, match=rf"run_dir={run} holds a dq-eval run \(results.json, and no checkpoints/"):
        train(compose_cfg("train", [*fast(tiny_teacher_dir), "logger=none"], run))
    assert sorted(p.name for p in run.iterdir()) == ["results.json"]


def test_a_block_checkpoint_that_cannot_be_written_is_one_line_and_the_one_before_stays(tmp_path, monkeypatch):
    """A full disk while writing a checkpoint was safetensors' traceback; the earlier checkpoint stays whole."""
    model = tiny_unet()
    blocks = ["a", "b"]
    save_block_checkpoint(tmp_path, model, 1, blocks, "fp")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dq.distill.checkpoint, "save_file", full)
    with pytest.raises(CheckpointError, match=r"could not write the block checkpoint .* after 2 blocks \(OSError: "
                       rf".*No space left on device\); .* hydra.run.dir={tmp_path.parent} to resume"):  # fmt: skip
        save_block_checkpoint(tmp_path, model, 2, blocks, "fp")
    assert load_block_checkpoint(tmp_path, model, blocks, "fp")["finished_blocks"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", CHECKPOINT_NAME]  # no temporary file left


def test_a_checkpoint_directory_that_takes_no_file_is_refused_before_calibration(
    tiny_teacher_dir, tmp_path, monkeypatch
):
    """A read-only checkpoints/ of a resumed run failed after a block of training, with a traceback."""

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(dq.train.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(dq.train, "quantize_student", lambda *a, **k: pytest.fail("calibrated"))
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"cannot write in {run / 'checkpoints'} \(PermissionError: .*make it writ"):
        train(compose_cfg("train", [*fast(tiny_teacher_dir), "logger=none"], run))


def test_ctrl_c_outside_a_fit_is_one_line_and_status_130(capsys):
    with pytest.raises(SystemExit) as exit_, cli_errors("dq-x"):
        raise KeyboardInterrupt
    assert exit_.value.code == 130 and capsys.readouterr().err == "dq-x: interrupted (Ctrl-C)\n"


def test_a_run_dir_hydra_cannot_make_is_refused_with_one_line(tmp_path, monkeypatch):
    """A file, a path under a file, a read-only place: Hydra failed on each with a traceback."""
    (tmp_path / "file").write_text("")
    assert _unusable_run_dir(tmp_path / "file") == "is a file, not a directory"
    assert _unusable_run_dir(tmp_path / "file" / "run") == f"lies under {tmp_path / 'file'}, which is a file"
    assert _unusable_run_dir(tmp_path / "new" / "run") is None
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)  # root writes anywhere: pretend
    assert _unusable_run_dir(tmp_path / "new" / "run") == f"cannot be written: {tmp_path} is read-only for this user"
    done = subprocess.run([sys.executable, "-m", "dq.eval", f"hydra.run.dir={tmp_path / 'file'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)  # fmt: skip
    said = f"dq-eval: error: hydra.run.dir={tmp_path / 'file'} is a file, not a directory: pass another hydra.run.dir"
    assert done.returncode == 2 and done.stderr == f"{said}=...\n"


def test_an_empty_dq_cache_means_the_default_cache_not_the_working_directory(monkeypatch):
    monkeypatch.setenv("DQ_CACHE", "")
    assert cache_dir() == Path.home() / ".cache" / "dq"


def test_a_damaged_classifier_is_refused_at_start_not_after_training(tmp_path):
    clf = tmp_path / "clf"
    shutil.copytree(CLASSIFIER, clf)
    (clf / "model.safetensors").write_bytes((clf / "model.safetensors").read_bytes()[:100])
    cfg = compose_cfg("train", [f"eval.classifier_path={clf}"], tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"eval.classifier_path: Classifier checkpoint in '{clf}' is corrupt"):
        validate(cfg)


def test_a_student_dir_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(MissingFileError, match=rf"student_dir={tmp_path / 'nowhere'} does not exist"):
        load_student(tmp_path / "nowhere", tiny_unet(), "cpu")


def test_weights_that_do_not_fit_the_models_config_are_named_in_one_line(tiny_teacher_dir, tmp_path):
    """A config.json that does not describe the weights gave every size mismatch, 186 lines."""
    model = tmp_path / "model"
    shutil.copytree(tiny_teacher_dir, model)
    config = json.loads((model / "unet" / "config.json").read_text())
    config["block_out_channels"] = [2 * c for c in config["block_out_channels"]]
    (model / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load_teacher(model)
    assert "\n" not in str(e.value) and "size mismatch for" in str(e.value) and "more lines)" in str(e.value)
    assert str(e.value).endswith("or its config.json does not describe its weights: re-create it (dq-pretrain) or copy "
                                 "it again.")  # fmt: skip


def test_unfinished_writes_of_a_killed_attempt_are_removed_when_the_run_goes_on(tiny_teacher_dir, tmp_path, caplog):
    """A process killed while it wrote a checkpoint left a temporary file of the whole model's size for good."""
    run = tmp_path / "run"
    over = [*[o for o in fast(tiny_teacher_dir) if not o.startswith("eval.")], "logger=none", "eval=none"]
    train(compose_cfg("train", over, run))
    left = [run / "checkpoints" / ".last.safetensors.x1y2.tmp", run / "student" / ".model-ab.safetensors.c3.tmp"]
    for path in left:
        path.write_bytes(b"half a model")
    with caplog.at_level("INFO", logger="dq"):
        train(compose_cfg("train", over, run))
    assert not any(path.exists() for path in left)
    assert f"removed {left[0]}, an unfinished write of an earlier attempt" in caplog.text
    assert (run / "checkpoints" / CHECKPOINT_NAME).is_file() and (run / "student").is_dir()
