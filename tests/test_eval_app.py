import copy
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEACHER, compose_cfg, tiny_unet
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException

from dq.distill.calibration import teacher_fingerprint
from dq.errors import ConfigError, NonFiniteSamplesError
from dq.eval import check_steps, evaluate
from dq.evaluation import to_sampling_dtype
from dq.models import load_teacher
from dq.paths import PACKAGE_DIR, conf_dir
from dq.quant import QuantSpec, expand_act_quantizers, quantize_model, save_quantized
from dq.quant.model import quantizable_layers
from dq.student import build_student
from dq.validation import check_eval_bits, check_eval_trainer


def _package_files() -> list:
    return sorted(p for p in PACKAGE_DIR.rglob("*") if "__pycache__" not in p.parts)


SCORES = ("fid", "is", "is_std")  # what the teacher's cached samples determine (its timing is measured per run)


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
    assert saved["metric"] == {"features": "classifier", "n_samples": 40, "steps": 3, "seed": 0, "dtype": "float32"}
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


def test_bits_name_follows_the_bit_widths(tmp_path):
    for path in (Path(conf_dir()) / "bits").glob("*.yaml"):  # each preset is named after its own bit-widths
        assert compose_cfg("eval", [f"bits={path.stem}"], tmp_path).bits.name == path.stem
    assert compose_cfg("eval", ["bits=w4a4", "bits.weight_bits=8"], tmp_path).bits.name == "w8a4"  # runs, results


def test_every_bits_preset_keeps_layers_of_the_shipped_teacher_at_8_bits(tmp_path):
    layers = quantizable_layers(load_teacher(TEACHER)[0])
    for path in sorted((Path(conf_dir()) / "bits").glob("*.yaml")):
        keep = list(compose_cfg("eval", [f"bits={path.stem}"], tmp_path).bits.keep_8bit)
        QuantSpec(keep_8bit=keep).check_keep_8bit(layers, f"conf/bits/{path.name}")  # a typo raises, naming the file


def test_bad_features_value_names_the_field(tmp_path):
    cfg = compose_cfg("eval", _fast() + ["logger=none", "eval.features=vgg"], tmp_path / "run")
    with pytest.raises(ValueError, match="eval.features='vgg'"):
        evaluate(cfg)


def test_ptq_student_is_scored_against_teacher_from_identical_noise(tmp_path, monkeypatch):
    warned = []  # diffusers' `to(dtype)` warns "should be kept in float32: []" on every cast, even to its own dtype
    monkeypatch.setattr("diffusers.models.modeling_utils.logger.warning", lambda msg, *a, **k: warned.append(msg))
    over = _fast() + ["logger=none", "quantizer=ptq_minmax", "bits=w4a8", "calib.n_calib=30"]
    results = evaluate(compose_cfg("eval", over, tmp_path / "run"))
    assert not [m for m in warned if "kept in float32" in m]
    student, teacher = results["student"], results["teacher"]
    assert 5 < student["psnr_to_teacher"] < 100  # close to, but not identical with, the teacher
    assert student["sample_time_ratio"] > 0 and results["method"]["bits"] == "w4a8"
    w8 = evaluate(compose_cfg("eval", over[:-2] + ["bits=w8a8", "calib.n_calib=30"], tmp_path / "run8"))
    assert {k: w8["teacher"][k] for k in SCORES} == {k: teacher[k] for k in SCORES}  # same (cached) teacher samples
    assert w8["student"]["psnr_to_teacher"] > student["psnr_to_teacher"]  # 8 bits damage less than 4


def test_a_ptq_student_scored_on_its_calibration_noise_is_warned_of(tmp_path, monkeypatch, caplog):
    """dq-train warned when eval.seed = calib.seed (the first samples start from the calibration trajectories'
    noise); dq-eval, which calibrates a PTQ student the same way, did not."""

    class Built(Exception):
        pass

    def build(*_a, **_k):
        raise Built

    monkeypatch.setattr("dq.eval.build_student", build)
    over = _fast() + ["logger=none", "quantizer=ptq_minmax", "bits=w4a8"]
    for seed, warned in ((0, False), (1, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dq.eval"), pytest.raises(Built):
            evaluate(compose_cfg("eval", [*over, f"seed={seed}"], tmp_path / f"run{seed}"))
        assert ("eval.seed=1 equals calib.seed=1" in caplog.text) == warned, caplog.text


@pytest.mark.parametrize("quantizer", ["dilatequant", "qat_lsq", "ptq_recon", "efficientdm"])
def test_a_trained_method_is_refused_rather_than_scored_untrained(quantizer, tmp_path):
    """dq-eval builds a student without training, WD or TPQ: `quantizer=dilatequant` was scored as a plain
    untrained PTQ student and recorded as `dilatequant` in results.json."""
    cfg = compose_cfg("eval", _fast() + ["logger=none", f"quantizer={quantizer}"], tmp_path / "run")
    with pytest.raises(ConfigError, match=f"quantizer={quantizer} is a trained method.*dq-train quantizer={quantizer}"):
        evaluate(cfg)
    assert not (tmp_path / "run" / "results.json").exists()


def test_teacher_samples_are_cached_and_a_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    import dq.evaluation as evaluation

    calls = []
    real = evaluation.sample_timed
    monkeypatch.setattr(evaluation, "sample_timed", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    cfg = compose_cfg("eval", _fast() + ["logger=none", f"eval.cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    first = evaluate(cfg)["teacher"]
    second = evaluate(cfg)["teacher"]
    assert {k: second[k] for k in SCORES} == {k: first[k] for k in SCORES}
    assert calls == ["teacher", "teacher timing"]  # sampled once; the cached run only re-times one batch
    (cached,) = (Path(cfg.eval.cache_dir) / "teacher_samples").iterdir()
    cached.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match=cached.name):
        again = evaluate(cfg)["teacher"]
    assert calls == ["teacher", "teacher timing", "teacher"] and again["fid"] == pytest.approx(first["fid"])


def _saved_ptq_run(tmp_path, temporal: bool = False):
    """A run directory like dq-train's: student/ (a W4A8 min-max PTQ student, per-step ranges if `temporal`) and a
    results.json beside it; also returns the scores dq-eval gave the same student when it built it."""
    over = _fast() + ["logger=none", "quantizer=ptq_minmax", "bits=w4a8", "calib.n_calib=30"]
    over += [f"quantizer.temporal={str(temporal).lower()}"]
    cfg = compose_cfg("eval", over, tmp_path / "built")
    teacher, scheduler = load_teacher(cfg.model.path)
    student, _ = build_student(cfg, teacher, scheduler)
    run = tmp_path / "trained"
    save_quantized(student, run / "student", teacher=teacher_fingerprint(teacher))
    (run / "results.json").write_text(json.dumps({"method": {"quantizer": "ptq_minmax", "bits": "w4a8"}}))
    return run, evaluate(cfg)["student"]


def test_student_dir_scores_a_saved_student_and_a_train_run_dir_is_never_overwritten(tmp_path, caplog):
    run, built = _saved_ptq_run(tmp_path)
    with caplog.at_level(logging.INFO, logger="dq.eval"):
        results = evaluate(
            compose_cfg("eval", _fast() + ["logger=none", f"student_dir={run / 'student'}"], tmp_path / "e")
        )
    said = [r.getMessage() for r in caplog.records if r.name == "dq.eval"]
    assert said == [f"run directory: {tmp_path / 'e'}", f"student: {run / 'student'} (ptq_minmax w4a8, as saved)"]
    assert {k: results["student"][k] for k in (*SCORES, "psnr_to_teacher")} == {
        k: built[k] for k in (*SCORES, "psnr_to_teacher")
    }  # the saved student samples exactly like the one built in memory, from the same noise
    assert results["method"] == {"quantizer": "ptq_minmax", "bits": "w4a8", "student_dir": str(run / "student")}

    saved = (run / "results.json").read_text()
    with pytest.raises(ValueError, match=rf"run_dir={run} holds a dq-train run.*student_dir={run / 'student'}"):
        evaluate(compose_cfg("eval", _fast() + ["logger=none"], run))
    assert (run / "results.json").read_text() == saved and not (run / "samples.png").exists()


@pytest.mark.parametrize(
    ("overrides", "folder"),
    [
        ([], "fp-w8a8"),
        (["quantizer=ptq_minmax", "bits=w4a4"], "ptq_minmax-w4a4"),
        (["student_dir=/r/outputs/train/ddpm_mnist/dilatequant-w4a8/2026-11-28_10-00-00/student"],
         "saved-2026-11-28_10-00-00"),
        (["student_dir=multirun/train/2026-11-28/3-dilatequant-w4a4-bkd/student/"], "saved-3-dilatequant-w4a4-bkd"),
    ],
)  # fmt: skip
def test_the_eval_run_directory_is_named_after_what_is_scored(overrides, folder):
    """A saved student's scores are not filed under the teacher's `fp-w8a8` (the defaults of quantizer and bits)."""
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides, return_hydra_config=True)
    cfg.hydra.job.num = 3  # a multirun's job number, set by Hydra's launcher
    HydraConfig.instance().set_config(cfg)  # what ${hydra:...} resolves against
    try:
        run_dir = Path(cfg.hydra.run.dir)
        subdir = cfg.hydra.sweep.subdir
    finally:
        HydraConfig.instance().cfg = None  # later tests run outside a Hydra app
    assert run_dir.parent == Path("outputs/eval/ddpm_mnist") / folder and re.fullmatch(r"[\d_-]+", run_dir.name)
    assert subdir == f"3-{folder}"


def test_student_dir_mistakes_name_the_field(tmp_path):
    run, _ = _saved_ptq_run(tmp_path, temporal=True)
    student = run / "student"
    with pytest.raises(ValueError, match=rf"model.path`={student} is a quantized student.*student_dir="):
        evaluate(compose_cfg("eval", _fast() + ["logger=none", f"model.path={student}"], tmp_path / "a"))
    with pytest.raises(ValueError, match="scores a saved student, and quantizer=ptq_minmax would build another"):
        over = ["logger=none", f"student_dir={student}", "quantizer=ptq_minmax", "bits=w4a8"]
        evaluate(compose_cfg("eval", _fast() + over, tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match=rf"student_dir={run} holds no saved student"):
        evaluate(compose_cfg("eval", _fast() + ["logger=none", f"student_dir={run}"], tmp_path / "c"))
    with pytest.raises(ValueError, match=rf"student_dir={student} was calibrated for 3 sampling steps.*steps=3"):
        over = ["logger=none", f"student_dir={student}", "model.num_inference_steps=4"]
        evaluate(compose_cfg("eval", _fast() + over, tmp_path / "d"))
    offset = tmp_path / "offset"  # the same teacher, its schedule shifted by one: 3 steps at [667, 334, 1]
    shutil.copytree(TEACHER, offset)
    config = json.loads((offset / "scheduler" / "scheduler_config.json").read_text())
    (offset / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "steps_offset": 1}))
    with pytest.raises(ValueError, match=r"calibrated for the timesteps \[666, 333, 0\].*scheduler_config.json"):
        over = ["logger=none", f"student_dir={student}", f"model.path={offset}"]
        evaluate(compose_cfg("eval", _fast() + over, tmp_path / "d2"))
    spec = json.loads((student / "quant_spec.json").read_text())
    (student / "quant_spec.json").write_text(json.dumps({**spec, "teacher": "0" * 64}))  # a retrained teacher's
    with pytest.raises(ValueError, match=rf"student_dir={student} was quantized from another teacher than model.path"):
        evaluate(compose_cfg("eval", _fast() + ["logger=none", f"student_dir={student}"], tmp_path / "e"))


def test_only_per_step_students_are_tied_to_their_schedule(tmp_path):
    """dq-eval samples a student with shared ranges at any step count; one with per-step ranges at its own."""
    model = tiny_unet()
    quantize_model(model, QuantSpec(), timesteps=torch.tensor([666, 333, 0]))
    four = torch.tensor([750, 500, 250, 0])
    check_steps(model, tmp_path, four)  # shared ranges: nothing to refuse
    expand_act_quantizers(model)
    with pytest.raises(ConfigError, match="calibrated for 3 sampling steps.*num_inference_steps=3"):
        check_steps(model, tmp_path, four)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.n_samples=0", "eval.n_samples=0 is invalid: must be a whole number >= 1"),
        ("eval.batch_size=-4", "eval.batch_size=-4 is invalid: must be a whole number >= 1"),
        ("model.num_inference_steps=0", "model.num_inference_steps=0 is invalid"),
        ("calib.n_calib=abc", "calib.n_calib='abc' is invalid"),
        ("calib.seed=1.5", "calib.seed=1.5 is invalid: must be a whole number"),
        ("seed=true", "seed=True is invalid: must be a whole number"),
        ("device=cuda", "device='cuda' but PyTorch sees no CUDA GPU here"),
        ("eval.features=none", "eval.features=none skips the evaluation: pass eval=none"),
        ("eval.dtype=float8", "eval.dtype='float8' is not one of ['float32', 'float16', 'bfloat16']"),
    ],
)
def test_bad_counts_seeds_and_a_missing_gpu_are_named_before_any_work(tmp_path, monkeypatch, override, message):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("dq.eval.load_teacher", lambda *a: pytest.fail("loaded the teacher before the check"))
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate(compose_cfg("eval", _fast() + ["logger=none", override], tmp_path / "run"))


def test_eval_none_is_refused_by_dq_eval(tmp_path):
    with pytest.raises(ConfigError, match=r"eval=none scores nothing: dq-eval needs eval=fid_is"):
        evaluate(compose_cfg("eval", ["logger=none", "eval=none"], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_too_few_samples_for_the_scores_warn(tmp_path):
    cfg = compose_cfg(
        "eval", _fast() + ["logger=none", "eval.n_samples=7", "eval.batch_size=7", "eval.is_splits=2"], tmp_path / "run"
    )
    with pytest.warns(UserWarning, match=r"eval.n_samples=7 is too few for meaningful scores"):
        evaluate(cfg)


def _nan_in_first_sample(model):
    """`model`, whose noise prediction for the first sample of each batch is NaN from then on."""

    def hook(module, args, out):
        out[:1] = float("nan")
        return out

    model.conv_out.register_forward_hook(hook)
    return model


def test_a_student_that_samples_nan_keeps_what_was_measured_and_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "dq.eval.build_student", lambda cfg, teacher, scheduler, **_: (_nan_in_first_sample(copy.deepcopy(teacher)), {})
    )
    run = tmp_path / "run"
    cfg = compose_cfg("eval", _fast() + ["logger=csv", "quantizer=ptq_minmax", "eval.batch_size=20"], run)
    with pytest.raises(NonFiniteSamplesError, match=r"the student sampled 2 of 40 images with NaN or infinite") as e:
        evaluate(cfg)  # a segfault in FID's eigen-solver before
    assert "calibrate it again" in str(e.value) and "eval.dtype" not in str(e.value)  # float32, not trained here
    saved = json.loads((run / "results.json").read_text())
    assert saved["teacher"]["fid"] > 0 and saved["student"]["non_finite_samples"] == 2  # one per batch of 20
    assert saved["student"]["sample_s"] > 0 and "fid" not in saved["student"]
    assert (run / "samples.png").stat().st_size > 0
    assert "eval/student/non_finite_samples" in (run / "csv" / "metrics.csv").read_text()


def test_a_teacher_that_samples_nan_is_refused_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr("dq.eval.load_teacher", lambda path: (lambda t, s: (_nan_in_first_sample(t), s))(
        *load_teacher(path)))  # fmt: skip
    cfg = compose_cfg("eval", _fast() + ["logger=none", f"eval.cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    with pytest.raises(NonFiniteSamplesError, match=r"the teacher \(model.path=.*\) sampled 1 of 40 images") as e:
        evaluate(cfg)
    assert not (tmp_path / "cache" / "teacher_samples").exists()
    assert "results.json keeps the run's record" in str(e.value)  # a dq-train run's cost is not lost
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["metric"]["dtype"] == "float32" and "teacher" not in saved and saved["method"]["quantizer"] == "fp"


def test_the_cast_to_half_precision_drops_diffusers_advice_that_names_no_module():
    """diffusers' `to(dtype)` logs "modules ... that should be kept in float32: []" on any cast: twice per run."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        unet = tiny_unet()
        to_sampling_dtype(torch.float16, unet, None)
        assert next(unet.parameters()).dtype == torch.float16 and records == []
        unet.to(torch.float32)  # diffusers' own cast still gives it
        assert any("kept in float32: []" in r.getMessage() for r in records)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)


def test_eval_dtype_samples_teacher_and_student_in_half_precision(tmp_path, monkeypatch):
    import dq.evaluation as evaluation

    seen = []
    real = evaluation.ddim_sample
    monkeypatch.setattr(evaluation, "ddim_sample", lambda m, s, noise, *a, **k: seen.append(
        (next(m.parameters()).dtype, noise.dtype)) or real(m, s, noise, *a, **k))  # fmt: skip
    over = _fast() + ["logger=none", "quantizer=ptq_minmax", "bits=w8a8", "calib.n_calib=30"]
    f32 = evaluate(compose_cfg("eval", over, tmp_path / "f32"))
    f16 = evaluate(compose_cfg("eval", over + ["eval.dtype=float16"], tmp_path / "f16"))
    assert seen[-1] == (torch.float16, torch.float16) and all(d == (torch.float32,) * 2 for d in seen[:2])
    assert f16["metric"]["dtype"] == "float16" and f32["metric"]["dtype"] == "float32"
    assert f16["teacher"]["fid"] != f32["teacher"]["fid"]  # sampled again in float16, not read from float32's cache
    assert abs(f16["teacher"]["fid"] - f32["teacher"]["fid"]) < 0.05 * f32["teacher"]["fid"]
    assert f16["student"]["psnr_to_teacher"] > 20  # the W8A8 student in float16 stays close to its teacher


def test_dq_eval_refuses_trainer_settings_it_would_ignore(tmp_path):
    """dq-eval reads where to sample from the trainer group (trainer=gpu, trainer=ddp) and nothing else of it."""
    check_eval_trainer(["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.strategy=dq_ddp"])
    with pytest.raises(ConfigError, match=r"trainer.max_epochs: dq-eval trains nothing and reads only"):
        check_eval_trainer(["+trainer.max_epochs=3"])
    for key, value in (("precision", "16-mixed"), ("max_epochs", "3")):  # max_epochs: refused before dq-train's check
        command = [sys.executable, "-m", "dq.eval", f"+trainer.{key}={value}", f"hydra.run.dir={tmp_path / key}"]
        done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert done.returncode == 2 and f"dq-eval: error: trainer.{key}: dq-eval trains nothing" in done.stderr
    assert "eval.dtype sets the sampling precision" not in done.stderr  # said for precision alone


def test_a_run_dir_with_another_evaluations_results_is_refused_and_keeps_its_record(tiny_teacher_dir, tmp_path):
    """dq-eval into a directory holding another evaluation's results replaced its results.json and samples.png and
    mixed two students in its CSV log; now it is refused, and the run's Hydra record is put back. The same command
    scores again. dq's own logged warnings read `dq-eval: warning: ...` on the terminal, as its Python warnings do."""
    run = tmp_path / "run"
    over = [*_fast(tiny_dir=tiny_teacher_dir), "logger=csv", "quantizer=ptq_minmax", "calib.n_calib=12",
            "calib.batch_size=12", "eval.seed=1", "calib.seed=1", f"hydra.run.dir={run}"]  # fmt: skip
    command = [sys.executable, "-m", "dq.eval", *over]
    first = subprocess.run([*command, "bits=w8a8"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    said = "dq-eval: warning: eval.seed=1 equals calib.seed=1: the first"
    assert any(line.startswith(said) for line in first.stderr.splitlines()), first.stderr
    kept = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != "eval.log"}
    refused = subprocess.run([*command, "bits=w4a8"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert refused.returncode == 2
    assert f"dq-eval: error: run_dir={run} holds the results of another evaluation (method.bits" in refused.stderr
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != "eval.log"} == kept
    train = [sys.executable, "-m", "dq.train", f"model.path={tiny_teacher_dir}", "logger=none", f"hydra.run.dir={run}"]
    refused = subprocess.run(train, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert refused.returncode == 2 and f"run_dir={run} holds a dq-eval run" in refused.stderr
    kept_files = {p: v for p, v in kept.items() if p.suffix != ".log"}
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.suffix != ".log"} == kept_files
    again = subprocess.run([*command, "bits=w8a8"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    scores = json.loads((run / "results.json").read_text())["student"]
    assert scores["fid"] == json.loads(kept[run / "results.json"])["student"]["fid"]


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["bits=w4a4"], "bits=w4a4: quantizer=fp (dq-eval's default) scores the full-precision teacher alone"),
        (["student_dir=/s", "bits.weight_bits=3"], "bits.weight_bits=3: student_dir=/s scores the saved student"),
        (["quantizer=ptq_minmax", "bits=w4a4"], None),
        (["student_dir=/s"], None),
    ],
)
def test_bits_that_dq_eval_would_ignore_are_refused(overrides, refused):
    """`bits` shapes a student dq-eval builds: beside the default quantizer=fp or a saved student it did nothing."""
    cfg = compose_cfg("eval", overrides, Path("/tmp/unused"))
    if refused is None:
        check_eval_bits(cfg, overrides, multirun=False)
        return
    with pytest.raises(ConfigError, match=re.escape(refused)):
        check_eval_bits(cfg, overrides, multirun=False)
    check_eval_bits(cfg, overrides, multirun=True)  # a sweep over quantizer=fp,ptq_minmax at one bits
