import json

import pytest
from conftest import compose_cfg
from hydra.errors import ConfigCompositionException

from dq.eval import evaluate
from dq.paths import PACKAGE_DIR


def _package_files() -> list:
    return sorted(p for p in PACKAGE_DIR.rglob("*") if "__pycache__" not in p.parts)


def _fast(tiny_dir=None):
    over = ["eval.n_samples=40", "eval.batch_size=40", "eval.progress=false", "model.num_inference_steps=3",
            "eval.grid_n=16"]  # fmt: skip
    return over + ([f"model.path={tiny_dir}"] if tiny_dir else [])


def test_dq_eval_fp_teacher_writes_results_and_grid(tmp_path):
    cfg = compose_cfg("eval", _fast() + ["logger=many"], tmp_path / "run")
    package_files = _package_files()
    results = evaluate(cfg)
    assert _package_files() == package_files  # outputs go to the run directory only
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["teacher"]["fid"] == pytest.approx(results["teacher"]["fid"])
    assert saved["teacher"]["fid"] > 0 and saved["teacher"]["is"] >= 1
    assert saved["metric"] == {"features": "classifier", "n_samples": 40, "steps": 3, "seed": 0}
    assert saved["method"]["quantizer"] == "fp"
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0
    metrics_csv = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "eval/teacher/fid" in metrics_csv
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_missing_model_dir_is_a_clear_error(tmp_path):
    cfg = compose_cfg("eval", _fast(tmp_path / "missing") + ["logger=none"], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"model\.path"):
        evaluate(cfg)


def test_unknown_config_option_is_rejected(tmp_path):
    with pytest.raises(ConfigCompositionException, match="eval.nsamples"):
        compose_cfg("eval", ["eval.nsamples=3"], tmp_path)
    with pytest.raises(ConfigCompositionException, match="model"):
        compose_cfg("eval", ["model=nope"], tmp_path)


def test_bad_features_value_names_the_field(tmp_path):
    cfg = compose_cfg("eval", _fast() + ["logger=none", "eval.features=vgg"], tmp_path / "run")
    with pytest.raises(ValueError, match="eval.features='vgg'"):
        evaluate(cfg)
