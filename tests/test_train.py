"""`dq-train` end to end on a tiny teacher, and the ablation / baseline configs."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_cfg
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from pytorch_lightning.trainer.states import TrainerStatus
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from tqdm.auto import tqdm

import dq
from dq.callbacks import QALoRA, TemporalParallelQuantizer, WeightDilation
from dq.config import (
    HYDRA_RECORD,
    NoteFoundRunDir,
    build_loggers,
    cli_errors,
    config_groups,
    drop_refused_run_dir,
    one_line_warnings,
    run_dir_is_new,
)
from dq.distill import BlockwiseDistillation, ModelDistillation, NoDistillation
from dq.distill.calibration import teacher_fingerprint
from dq.errors import CheckpointError, ConfigError, MissingFileError
from dq.evaluation import eval_seed, evaluate_models, method_of
from dq.models import load_teacher
from dq.paths import run_dir_lock
from dq.quant import act_quantizers, load_quantized, quant_report, quantize_model, weight_quantizers
from dq.quant.quantizer import UniformQuantizer
from dq.student import quant_spec_of, sampler_timesteps
from dq.train import build_callbacks, config_fingerprint, peak_memory, reset_peak_memory, train
from dq.utils.loggers import WandbLogger
from dq.utils.progress import ConsoleHandler
from dq.utils.provenance import cpu_id, git_state
from dq.validation import accepted_settings, check_appended, validate

pytestmark = pytest.mark.usefixtures("one_thread")


DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "device=cpu"]  # trainer=ddp on CPUs


def fast(tiny_dir: Path) -> list[str]:
    return [
        f"model.path={tiny_dir}", "model.num_inference_steps=3", "calib.n_calib=12", "calib.batch_size=12",
        "distill.iters_per_block=2", "distill.batch_size=4", "quantizer.spec.act_init=minmax",
        "eval.n_samples=8", "eval.batch_size=8", "eval.grid_n=8", "eval.is_splits=2", "eval.progress=false",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    ]  # fmt: skip


def test_dq_train_end_to_end(tiny_teacher_dir, tmp_path):
    run = tmp_path / "run"
    cfg = compose_cfg("train", fast(tiny_teacher_dir) + ["logger=csv"], run)
    results = train(cfg)

    saved = json.loads((run / "results.json").read_text())
    assert saved["student"]["psnr_to_teacher"] == pytest.approx(results["student"]["psnr_to_teacher"])
    assert {"fid", "is", "sample_s"} <= saved["teacher"].keys() and saved["student"]["fid"] > 0
    assert saved["method"]["distill"] == "bkd" and saved["method"]["callbacks"] == ["weight_dilation", "tpq"]
    assert saved["cost"]["blocks"] == 17 and saved["cost"]["steps"] == 34 and saved["cost"]["peak_mem_mb"] > 0
    assert saved["provenance"] == {  # which code, torch and CPU made these numbers
        "dq": dq.__version__, "git": git_state(), "torch": torch.__version__, "device": "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "cpu": cpu_id(),
    }  # fmt: skip
    assert (run / "samples.png").stat().st_size > 0
    assert json.loads((run / "dilation.json").read_text())["summary"]["layers"] > 0
    meta = json.loads((run / "checkpoints" / "last.json").read_text())
    assert meta["finished_blocks"] == 17 and len(meta["history"]) == 17

    student = load_quantized(run / "student")  # the saved student is the last checkpoint's state
    final = load_file(str(run / "checkpoints" / "last.safetensors"))
    assert all(torch.equal(v, final[k]) for k, v in student.state_dict().items())
    assert all(q.num_steps == 3 for _, q in act_quantizers(student))
    assert any(r.split for r in quant_report(student))  # dilatequant splits up-block shortcut inputs by default
    teacher, _ = load_teacher(tiny_teacher_dir)
    x, t = torch.randn(2, 1, 28, 28), student.dq_timesteps[:2]
    out = student(x, t).sample
    assert torch.equal(load_quantized(run / "student")(x, t).sample, out)
    assert not torch.equal(out, teacher(x, t).sample)
    spec = json.loads((run / "student" / "quant_spec.json").read_text())
    assert spec["teacher"] == teacher_fingerprint(teacher)  # what dq-eval student_dir=... checks model.path by

    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"block/00/loss", "block/16/loss", "block/05/mse_after", "distill/loss", "wd/s_mean"} <= logged
    assert {"tpq/scale_spread_mean", "eval/student/psnr_to_teacher"} <= logged
    # each block's values are written while it trains, not repeated at every later step (2 steps per block)
    for k in range(17):
        steps = {int(r["step"]) for r in rows if r.get(f"block/{k:02d}/loss")}
        assert steps and steps <= {2 * k, 2 * k + 1}, (k, sorted(steps))
        assert sum(bool(r.get(f"block/{k:02d}/mse_after")) for r in rows) == 1
    assert sum(bool(r.get("block/00/reverted")) for r in rows) == 1


def test_the_evaluation_noise_follows_eval_seed_which_is_the_training_seed_unless_set(tmp_path, monkeypatch):
    """`dq-train seed=3 eval.seed=0` trains with seed 3 and scores on seed 0's noise, like every seed-0 run."""
    drawn = []

    class Drawn(Exception):
        pass

    def noise(n: int, shape: tuple, seed: int):
        drawn.append(seed)
        raise Drawn  # nothing past the noise matters here

    monkeypatch.setattr("dq.evaluation.make_noise", noise)
    for overrides, expected in [([], 0), (["seed=3"], 3), (["seed=3", "eval.seed=0"], 0), (["eval.seed=5"], 5)]:
        cfg = compose_cfg("train", overrides, tmp_path)
        assert eval_seed(cfg) == expected
        with pytest.raises(Drawn):
            evaluate_models(cfg, torch.nn.Linear(1, 1), None, None, tmp_path, [], {})
    assert drawn == [0, 3, 0, 5]
    assert eval_seed(compose_cfg("eval", ["seed=2"], tmp_path)) == 2  # dq-eval: `seed` is the noise, as before
    assert eval_seed(OmegaConf.create({"seed": 4, "eval": {"features": "classifier"}})) == 4  # a config from before


def test_eval_none_trains_and_saves_the_student_and_records_the_cost_of_each_block(tiny_teacher_dir, tmp_path):
    run = tmp_path / "run"
    over = [o for o in fast(tiny_teacher_dir) if not o.startswith("eval.")] + ["eval=none", "eval.progress=false"]
    results = train(compose_cfg("train", over + ["logger=csv"], run))

    saved = json.loads((run / "results.json").read_text())
    assert saved == json.loads(json.dumps(results)) and "teacher" not in saved and "student" not in saved
    assert saved["metric"] == {"features": "none"} and saved["method"]["distill"] == "bkd"
    assert saved["provenance"]["git"] == git_state() and saved["provenance"]["device"] == "cpu"
    blocks = json.loads((run / "checkpoints" / "last.json").read_text())["blocks"]
    assert list(saved["cost"]["block_s"]) == blocks and all(s > 0 for s in saved["cost"]["block_s"].values())
    assert saved["cost"]["train_s"] >= sum(saved["cost"]["block_s"].values())
    assert not (run / "samples.png").exists()
    final = load_file(str(run / "checkpoints" / "last.safetensors"))  # the saved student is the last checkpoint's
    assert all(torch.equal(v, final[k]) for k, v in load_quantized(run / "student").state_dict().items())
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    assert sum(bool(r.get("block/16/seconds")) for r in rows) == 1

    scored = tmp_path / "scored"
    (scored / "checkpoints").mkdir(parents=True)  # a dq-train run scored earlier
    (scored / "results.json").write_text(json.dumps({"student": {"fid": 50.0}}))
    with pytest.raises(ConfigError, match=r"eval=none would replace the scores in .*results.json"):
        train(compose_cfg("train", over + ["logger=csv"], scored))
    assert json.loads((scored / "results.json").read_text()) == {"student": {"fid": 50.0}}


@pytest.mark.parametrize(
    ("overrides", "module_cls", "callbacks"),
    [
        ([], BlockwiseDistillation, [WeightDilation, TemporalParallelQuantizer]),
        (["~callbacks.weight_dilation"], BlockwiseDistillation, [TemporalParallelQuantizer]),
        (["~callbacks.tpq"], BlockwiseDistillation, [WeightDilation]),
        (["distill=model_kd"], ModelDistillation, [WeightDilation, TemporalParallelQuantizer]),
        (["distill=none"], NoDistillation, [WeightDilation, TemporalParallelQuantizer]),
        (["experiment=qat_lsq"], ModelDistillation, []),
        (["experiment=efficientdm"], ModelDistillation, [QALoRA, TemporalParallelQuantizer]),
        (["experiment=efficientdm_tuned"], ModelDistillation, [QALoRA, TemporalParallelQuantizer]),
        (["experiment=ptq_recon"], BlockwiseDistillation, []),
        (["experiment=paper_budget"], BlockwiseDistillation, [WeightDilation, TemporalParallelQuantizer]),
        (["quantizer=ptq_recon", "callbacks=none", "distill.lr_weight=0"], BlockwiseDistillation, []),
    ],
)
def test_ablation_and_baseline_configs_compose(overrides, module_cls, callbacks, tmp_path):
    cfg = compose_cfg("train", overrides, tmp_path)
    assert hydra.utils.get_class(cfg.distill._target_) is module_cls
    assert [type(c) for c in build_callbacks(cfg.get("callbacks"))] == callbacks
    method = method_of(cfg)
    assert method["distill"] == cfg.distill.name and method["callbacks"] == list(cfg.get("callbacks") or {})


def test_the_tuned_efficientdm_is_efficientdm_with_the_two_rates_its_runs_used(tmp_path):
    tuned = OmegaConf.to_container(compose_cfg("train", ["experiment=efficientdm_tuned"], tmp_path))
    ran = ["experiment=efficientdm", "distill.lr_act_qparams=1e-4", "distill.lr_lora=1e-4"]  # its run list
    same = OmegaConf.to_container(compose_cfg("train", ran, tmp_path))
    assert tuned.pop("tags") == [*same.pop("tags"), "tuned"]
    assert tuned == same
    assert OmegaConf.to_container(compose_cfg("train", ["experiment=efficientdm"], tmp_path)) != same


def test_qat_lsq_quantizes_weights_as_lsq_does(tiny_teacher_dir, tmp_path):
    """experiment=qat_lsq: symmetric per-channel weight grids starting at 2 mean|w| / sqrt(Q_P) (Esser et al. 2020),
    8-bit ones for conv_in / conv_out; the activations keep dq's asymmetric grids."""
    spec = quant_spec_of(compose_cfg("train", ["experiment=qat_lsq", "bits=w4a4"], tmp_path))
    teacher, scheduler = load_teacher(tiny_teacher_dir)
    student = copy.deepcopy(teacher)
    quantize_model(student, spec, sampler_timesteps(scheduler, 3))
    weights = dict(teacher.named_modules())
    quantizers = list(weight_quantizers(student))
    layers = [r.name for r in quant_report(student).rows if r.kind in ("conv", "linear")]
    assert [n.removesuffix(".weight_quantizer") for n, _ in quantizers] == layers and layers  # every conv / linear
    for name, q in quantizers:
        w = weights[name.removesuffix(".weight_quantizer")].weight.detach().reshape(len(q.scale), -1)
        qp = 127 if name.startswith(("conv_in.", "conv_out.")) else 7
        assert (q.qmin, q.qmax) == (-qp - 1, qp), name
        assert_close(q.scale.detach(), 2 * w.abs().mean(1) / qp**0.5, msg=name)
        assert not q.zero_point.any() and "zero_point" not in dict(q.named_parameters()), name
    assert all(not a.spec.symmetric and a.spec.init == "mse" for _, a in act_quantizers(student))


def test_config_fingerprint_ignores_location_and_sees_the_student_settings(tiny_teacher_dir, tmp_path):
    teacher, scheduler = load_teacher(tiny_teacher_dir)
    moved = tmp_path / "moved"  # the same teacher in another directory, another FID reference seed
    base = config_fingerprint(compose_cfg("train", fast(tiny_teacher_dir), tmp_path), teacher, scheduler)
    same = compose_cfg("train", [*fast(moved), "model.data.seed=3", "distill.progress=true"], tmp_path)
    assert config_fingerprint(same, teacher, scheduler) == base
    other = compose_cfg("train", [*fast(tiny_teacher_dir), "distill.iters_per_block=3"], tmp_path)
    assert config_fingerprint(other, teacher, scheduler) != base
    older = compose_cfg("train", [*fast(tiny_teacher_dir), "~distill.act_drop_prob"], tmp_path)  # before QDrop existed
    assert config_fingerprint(older, teacher, scheduler) == base  # ... its runs still resume
    qdrop = compose_cfg("train", [*fast(tiny_teacher_dir), "distill.act_drop_prob=0.5"], tmp_path)
    assert config_fingerprint(qdrop, teacher, scheduler) != base
    older = compose_cfg("train", [*fast(tiny_teacher_dir), "~quantizer.spec.fp_output_layer_input"], tmp_path)
    assert config_fingerprint(older, teacher, scheduler) == base  # a nested option added later: also neutral
    fp_out = compose_cfg("train", [*fast(tiny_teacher_dir), "quantizer.spec.fp_output_layer_input=true"], tmp_path)
    assert config_fingerprint(fp_out, teacher, scheduler) != base
    older = compose_cfg("train", [*fast(tiny_teacher_dir), "~distill.lr_lora", "~callbacks.tpq.init"], tmp_path)
    assert config_fingerprint(older, teacher, scheduler) == base  # before QALoRA and TPQ's shared start existed
    shared = compose_cfg("train", [*fast(tiny_teacher_dir), "callbacks.tpq.init=shared"], tmp_path)
    assert config_fingerprint(shared, teacher, scheduler) != base
    fp32 = compose_cfg("train", [*fast(tiny_teacher_dir), "+trainer.precision=32-true"], tmp_path)
    assert config_fingerprint(fp32, teacher, scheduler) == base  # Lightning's default, spelled out
    mixed = compose_cfg("train", [*fast(tiny_teacher_dir), "+trainer.precision=bf16-mixed"], tmp_path)
    assert config_fingerprint(mixed, teacher, scheduler) != base  # a resume must not mix precisions across blocks
    scheduler.register_to_config(beta_end=0.03)  # another noise schedule draws other calibration trajectories
    assert config_fingerprint(compose_cfg("train", fast(tiny_teacher_dir), tmp_path), teacher, scheduler) != base


def test_callbacks_run_in_order_whatever_the_config_order(tmp_path):
    cfg = compose_cfg("train", [], tmp_path)
    reordered = {"tpq": cfg.callbacks.tpq, "weight_dilation": cfg.callbacks.weight_dilation}
    assert [type(c) for c in build_callbacks(reordered)] == [WeightDilation, TemporalParallelQuantizer]


def test_ptq_recon_learns_roundings_and_activation_ranges_only(tiny_teacher_dir, tmp_path, monkeypatch):
    """`experiment=ptq_recon`: AdaRound with the weights and their MSE-searched step sizes fixed. Biases and norm
    affines stay the teacher's; each latent weight is the teacher's, or a grid value at most a step from its nearest
    code (its learned rounding, baked in); activation step sizes train."""
    monkeypatch.setattr("dq.train.evaluate_models", lambda *args, **kwargs: {})  # training only
    run = tmp_path / "run"
    train(compose_cfg("train", fast(tiny_teacher_dir) + ["experiment=ptq_recon", "logger=none"], run))
    teacher, _ = load_teacher(tiny_teacher_dir)
    student = load_quantized(run / "student")
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    layers = {
        n: m for n, m in student.named_modules() if isinstance(getattr(m, "weight_quantizer", None), UniformQuantizer)
    }
    rounded = 0
    for name, p in t_params.items():
        layer = layers.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if layer is None:  # biases, norm affines, the time embedding's unquantized parts: the teacher's (no WD either)
            assert torch.equal(p, s_params[name]), name
            continue
        wq = layer.weight_quantizer
        fresh = UniformQuantizer(wq.spec, p.shape[0])
        fresh.init_from(p)  # the MSE search of the teacher's weight: the grid AdaRound held fixed
        assert torch.equal(fresh.scale, wq.scale) and torch.equal(fresh.zero_point, wq.zero_point), name
        codes, nearest = wq.codes(s_params[name]), wq.codes(p)
        assert (codes - nearest).abs().max() <= 1, name
        rounded += int((codes != nearest).sum())
        assert torch.equal(s_params[name], p) or torch.allclose(layer.quantized_weight(), s_params[name], atol=1e-6)
    assert rounded > 0  # some weights round otherwise than to nearest
    moved = [n for n, p in s_params.items() if n not in t_params and "act_quantizer" in n and "scale" in n]
    assert moved and all(q.num_steps == 1 for _, q in act_quantizers(student))


def test_an_fp_output_layer_input_student_keeps_it_off_through_training_saving_and_resuming(
    tiny_teacher_dir, tmp_path, monkeypatch
):
    """TPQ calibration, BKD (with revert), the saved student and a resumed run all leave conv_out's input in float."""
    monkeypatch.setattr("dq.train.evaluate_models", lambda *args, **kwargs: {})  # training only
    run = tmp_path / "run"
    overrides = ["quantizer.spec.fp_output_layer_input=true", "logger=none"]
    cfg = compose_cfg("train", fast(tiny_teacher_dir) + overrides, run)
    train(cfg)
    for _ in range(2):  # as trained, then after a rerun into the same run directory (resumes: every block finished)
        student = load_quantized(run / "student")
        assert [n for n, q in act_quantizers(student) if not q.enabled] == ["conv_out.act_quantizer"]
        assert student.conv_out.act_quantizer.num_steps == 3  # expanded by TPQ like the others, just unused
        assert next(r for r in quant_report(student) if r.name == "conv_out").act_bits is None
        train(cfg)


CIFAR = ["model=ddpm_cifar10", "model.path=/models/ddpm-cifar10-32"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (CIFAR, r"model.data.path is not set: eval=fid_is computes FID against real images"),
        ([*CIFAR, "model.data.path=/png"], r"shipped MNIST classifier, which takes \[1, 28, 28\] images, and "
         r"model.sample_shape is \[3, 32, 32\]: pass eval=inception"),
        ([*CIFAR, "model.data.path=/png", "eval=inception"], r"eval.inception_weights_path is not set"),
        ([*CIFAR, "model.data.path=/png", "eval=inception", "eval.inception_weights_path=/w.pth"],
         r"eval=inception needs torch_fidelity and torchvision, not installed here: pip install 'dq\[inception\]'"),
        (["distill.lr_weight=-1"], r"distill.lr_weight=-1 is invalid: a learning rate must be a finite number >= 0"),
        (["distill.lr_weight=nan"], r"distill.lr_weight=nan is invalid: a learning rate must be a finite number"),
        (["distill.lr_act_qparams=inf"], r"distill.lr_act_qparams=inf is invalid"),
        (["distill.lr_act_qparams=fast"], r"distill.lr_act_qparams='fast' is invalid"),
        (["distill.lr_schedule=linear"], r"distill.lr_schedule='linear' is not one of \['cosine', 'constant'\]"),
        (["calib.n_calib=64", "distill.batch_size=100"], r"distill.batch_size=100 is larger than the calibration set"),
        # each of these was a traceback after sampling or calibration (a review helper's fuzzing); scores were lost
        (["eval.grid_n=0"], r"eval.grid_n=0 is invalid: must be a whole number >= 1"),
        (["eval.n_samples=1", "eval.batch_size=1"], r"eval.n_samples=1 with eval.is_splits=10: FID needs at least 2"),
        (["eval.n_samples=16", "eval.is_splits=100"], r"IS at least one sample per split"),
        (["seed=-1"], r"seed=-1 is invalid: must be a whole number in \[0, 2\^32\)"),
        (["eval.seed=-1"], r"eval.seed=-1 is invalid: must be a whole number in \[0, 2\^32\)"),
        (["calib.seed=4294967296"], r"calib.seed=4294967296 is invalid"),
        (["distill.revert_worse=maybe"], r"distill.revert_worse='maybe' is invalid: must be true or false"),
        (["eval.progress=1"], r"eval.progress=1 is invalid: must be true or false"),
        (["distill.lr_bits=0"], r"distill.lr_bits=0 is invalid: the weight bit-width"),
        (["distill.act_drop_prob=1.5"], r"distill.act_drop_prob=1.5 is invalid: a number \[0, 1\)"),
        (["distill.dampen=-0.5"], r"distill.dampen=-0.5 is invalid: a number \[0, inf\), the weight of oscillation"),
        (["distill.freeze=1"], r"distill.freeze=1 is invalid: a number \[0, 1\), the oscillation frequency"),
        (["distill.adam_eps=0"], r"distill.adam_eps=0 is invalid: a number \[1e-30, 1\), Adam's epsilon"),
        (["distill.lr_weight=0", "distill.lr_weight_qparams=0", "distill.lr_act_qparams=0"],
         r"distill.lr_weight=0, distill.lr_weight_qparams=0, distill.lr_act_qparams=0, distill.lr_lora=0, "
         r"distill.lr_rounding=0: nothing would train. For post-training quantization without training use "
         r"distill=none"),
        (["distill.rounding_reg=-1"], r"distill.rounding_reg=-1 is invalid: a number \[0, inf\), AdaRound's"),
        (["distill.lr_rounding=-1"], r"distill.lr_rounding=-1 is invalid: a learning rate must be a finite number"),
        (["distill.lr_rounding=0.01", "distill.lr_weight=0"],
         r"distill.lr_rounding > 0 with distill.lr_weight=0, distill.lr_weight_qparams=0.001: AdaRound learns each"),
        (["distill.lr_weight=0", "distill.lr_weight_qparams=0", "distill.lr_act_qparams=0",
          "distill.lr_act_step_rel=0"], r"distill.lr_act_step_rel=0: nothing would train"),
        (["distill.lr_act_step_rel=abc"], r"distill.lr_act_step_rel='abc' is invalid"),
        (["distill.lr_zero_point=inf"], r"distill.lr_zero_point=inf is invalid: a learning rate must be a finite"),
        (["callbacks.weight_dilation.s_max=0"], r"callbacks.weight_dilation.s_max=0 is invalid: a number >= 1"),
        (["callbacks.tpq.batch_size=abc"], r"callbacks.tpq.batch_size='abc' is invalid: must be a whole number >= 1"),
        (["callbacks=efficientdm", "distill.lr_lora=1e-4", "callbacks.lora.rank=0"], r"callbacks.lora.rank=0 is"),
        (["trainer.devices=0"], r"Trainer refuses these settings: `Trainer\(devices=0\)` value is not a valid"),
        (["trainer.devices=2"], r"trainer.devices=2, trainer.num_nodes=1, trainer.strategy=auto: 2 processes with "
                                r"Lightning's DDPStrategy, .* Use trainer=ddp \(trainer.strategy=dq_ddp\)"),
        ([*DDP_CPU, "+trainer.num_nodes=2"], r"trainer.num_nodes=2 with trainer.strategy=dq_ddp: .* one machine"),
        ([*DDP_CPU[:3], "device=cpu:0"], r"device=cpu:0 with trainer.strategy=dq_ddp: .* pass device=cpu"),
        (["+trainer.precision=banana"], r"Trainer refuses these settings: Precision 'banana' is invalid"),
        (["+trainer.precision=bf16-true"], r"trainer.precision=bf16-true casts the student to half precision.*use "
                                           r"bf16-mixed"),
        (["model.data.name=foo"], r"model.data.name='foo' is not one of \['mnist', 'image_folder'\]"),
        (["eval.classifier_path=null"], r"eval.classifier_path is not set: eval.features=classifier scores with"),
        (["calib.n_traj=1"], r"calib.n_traj=1 is invalid: 512 pairs over 25 steps need at least 21 trajectories"),
        # the next ones each passed start-up and failed after training (a review helper's finding)
        (["eval.dtype=float16:x"], r"eval.dtype='float16:x' is not one of \['float32', 'float16', 'bfloat16'\]"),
        (["distill.lr_schedule=cosine:x"], r"distill.lr_schedule='cosine:x' is not one of"),
        (["device=cuda:0"], r"device='cuda:0' but PyTorch sees no CUDA GPU"),  # a device index is no typo
        (["+trainer.gradient_clip_val=1.0"], r"trainer.gradient_clip_val=1.0, .*manual optimization"),
        (["+trainer.accumulate_grad_batches=2"], r"trainer.accumulate_grad_batches=2: .*manual optimization"),
        (["+trainer.barebones=true"], r"trainer.barebones=true turns off the logging"),
        (["eval.classifier_path=/nonexistent"], r"eval.classifier_path='/nonexistent' holds no classifier"),
        (["eval.n_samples=1e3"], r"eval.n_samples=1000.0 is invalid: must be a whole number >= 1 \(written as 1000: "
                                 r"Hydra reads 1000.0 as a float\)"),
        (["model.data.seed=-1"], r"model.data.seed=-1 is invalid: must be a whole number in \[0, 2\^32\)"),
        ([*CIFAR, "model.data.path=/nonexistent", "model.sample_shape=[1,28,28]"],
         r"model.data.path='/nonexistent' is not a directory"),
        ([*CIFAR, "model.data.path=/", "model.sample_shape=[1,28,28]", "model.data.channels=2"],
         r"model.data.channels=2 is invalid: 1 \(grey\) or 3 \(RGB\)"),
        # a bad-value audit's findings: tracebacks (some after training), or accepted and misread
        (["tags=foo"], r"tags='foo' is invalid: a list of labels of 1-64 characters each"),
        (["tags=['']"], r"tags=\[''\] is invalid"),
        ([f"tags=[{'x' * 65}]"], r"tags=\['x{65}'\] is invalid"),
        (["device=cpu:abc"], r"device='cpu:abc' is invalid: a device type and index"),
        (["logger=wandb", "logger.wandb.project=''"], r"logger.wandb.project='' is invalid: name the W&B project"),
        (["logger=wandb", "logger.wandb.offline=maybe"], r"logger.wandb.offline='maybe' is invalid: true or false"),
        (["+trainer.precision=64"], r"trainer.precision=64 trains in float64"),
        (["model.sample_shape=28"], r"model.sample_shape=28 is invalid: give \[channels, height, width\]"),
        (["model.sample_shape=[1,28]"], r"model.sample_shape=\[1, 28\] is invalid"),
        (["model.data.name=image_folder"], r"model.data.path is not set"),
        ([*CIFAR, "model.data.path=/png", "model.data.limit=0"], r"model.data.limit=0 is invalid: must be a whole"),
        ([*CIFAR, "model.data.path=/png", "model.data.limit=2.5"], r"model.data.limit=2.5 is invalid"),
        ([*CIFAR, "model.data.path=/png", "model.data.size=-5"], r"model.data.size=-5 is invalid"),
        # accepted before: Lightning takes any truthy value for a switch; a name with a path put the run anywhere
        (["trainer.enable_progress_bar=maybe"], r"trainer.enable_progress_bar='maybe' is invalid: must be true or"),
        (["trainer.enable_model_summary=3"], r"trainer.enable_model_summary=3 is invalid: must be true or false"),
        (["+trainer.detect_anomaly=null"], r"trainer.detect_anomaly=None is invalid"),
        (["model.name=../../elsewhere"], r"model.name='../../elsewhere' is invalid: the name becomes part of the run"),
        (["bits.name=w4/a8"], r"bits.name='w4/a8' is invalid"),
        (["distill.name=.hidden"], r"distill.name='.hidden' is invalid"),
        (["quantizer=ptq_minmax", "quantizer.name=fp"], r"quantizer.name=fp marks the full-precision teacher alone"),
        (["quantizer=fp", "quantizer.name=mine"], r"quantizer.name='mine' has no quantizer.spec"),
    ],
)  # fmt: skip
def test_settings_that_would_fail_after_training_are_refused_at_start_up(overrides, message, tmp_path, monkeypatch):
    """Each of these used to fail with a traceback, some only once training had finished (evaluation comes last)."""
    find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda n, *a: None if n in ("torch_fidelity", "torchvision")
                        else find_spec(n, *a))  # fmt: skip
    cfg = compose_cfg("train", overrides, tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_a_conditional_teacher_is_refused_by_dq_train_and_dq_eval_before_any_work(tmp_path):
    """Their sampling and calibration call the UNet without conditioning: dq-train failed in calibration, after it
    had written the run directory's checkpoints/config.json."""
    from conftest import tiny_cond_unet
    from diffusers import DDPMScheduler

    from dq.eval import evaluate

    tiny_cond_unet().save_pretrained(tmp_path / "cond" / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "cond" / "scheduler")
    for app, run_app in (("train", train), ("eval", evaluate)):
        run = tmp_path / app
        with pytest.raises(ConfigError, match=r"holds a UNet2DConditionModel: dq-train and dq-eval sample uncond"):
            run_app(compose_cfg(app, [f"model.path={tmp_path / 'cond'}", "logger=none"], run))
        assert not (run / "checkpoints").exists() and not (run / "results.json").exists()


def test_inception_weights_that_are_not_a_file_are_refused_at_start_up(tmp_path, monkeypatch):
    """With torch-fidelity and torchvision installed, a wrong weights path failed only once training had finished."""
    find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda n, *a: object() if n in ("torch_fidelity", "torchvision")
                        else find_spec(n, *a))  # fmt: skip
    folder = tmp_path / "png"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    given = [*CIFAR, f"model.data.path={folder}", "eval=inception", "eval.inception_weights_path=/w.pth"]
    with pytest.raises(ConfigError, match=r"eval.inception_weights_path='/w.pth' is not a file"):
        validate(compose_cfg("train", given, tmp_path / "run"))
    (tmp_path / "w.pth").write_bytes(b"weights")
    loaded = []  # the weights load at start-up too: a file of other weights failed once training had finished
    monkeypatch.setattr("dq.validation.inception_net", lambda path: loaded.append(path))
    validate(compose_cfg("train", [*given[:-1], f"eval.inception_weights_path={tmp_path / 'w.pth'}"], tmp_path / "run"))
    assert loaded == [str(tmp_path / "w.pth")]


def test_an_image_folder_the_evaluation_cannot_use_is_refused_at_start_up(tmp_path):
    """An empty folder (or one the classifier cannot read at its size) failed only once training had finished."""
    folder = tmp_path / "png"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    given = [*CIFAR, f"model.data.path={folder}", "model.sample_shape=[1,28,28]", "model.data.channels=1"]
    with pytest.raises(ConfigError, match=r"model.data.channels=1, model.data.size=32: eval.features=classifier"):
        validate(compose_cfg("train", given, tmp_path / "run"))
    given.append("model.data.size=28")
    with pytest.raises(ConfigError, match=rf"model.data.path='{folder}' holds no images \(.bmp, .jpeg"):
        validate(compose_cfg("train", given, tmp_path / "run"))
    (folder / "a.png").write_bytes(b"")  # found by its name; reading it comes later
    validate(compose_cfg("train", given, tmp_path / "run"))


def test_dq_eval_is_not_told_to_pass_eval_none(tmp_path):
    """dq-eval only scores (it refuses eval=none), so its refusal offers no eval=none way out."""
    with pytest.raises(ConfigError, match=r"model.data.path is not set") as e:
        validate(compose_cfg("eval", CIFAR, tmp_path))
    assert "eval=none" not in str(e.value)


def test_callbacks_are_built_before_calibration(tmp_path, monkeypatch):
    """A callback refusing its settings in `__init__` stops the run before calibration (minutes on a real model)."""

    def refuse(_cfg):
        raise ConfigError("callbacks.x.y=1 is invalid")

    def calibrate(*_a, **_k):
        raise AssertionError("calibration ran before the callbacks were built")

    monkeypatch.setattr("dq.train.build_callbacks", refuse)
    monkeypatch.setattr("dq.train.calibration_set", calibrate)
    with pytest.raises(ConfigError, match=r"callbacks.x.y=1 is invalid"):
        train(compose_cfg("train", ["logger=none", "eval=none"], tmp_path))


def test_activation_step_sizes_alone_pass_the_nothing_trains_check(tmp_path):
    """`lr_act_step_rel` trains the activation step sizes with every absolute rate at 0 (set_optimization agrees)."""
    rates = ["distill.lr_weight=0", "distill.lr_weight_qparams=0", "distill.lr_act_qparams=0"]
    validate(compose_cfg("train", [*rates, "distill.lr_act_step_rel=0.004"], tmp_path))


def test_a_real_model_without_scoring_passes_the_start_up_checks(tmp_path):
    validate(compose_cfg("train", [*CIFAR, "eval=none"], tmp_path))


def test_a_keep_8bit_entry_naming_no_layer_is_refused_before_the_run_writes(tmp_path):
    """It was a traceback ('crashed, a bug in dq') after the checkpoint directory had been claimed."""
    cfg = compose_cfg("train", ["bits.keep_8bit=[conv_in,'*.conv_shortcutt']", "logger=none"], tmp_path)
    with pytest.raises(ConfigError, match=r"keep_8bit entries \['\*.conv_shortcutt'\] name no quantizable layer"):
        train(cfg)
    assert not (Path(cfg.run_dir) / "checkpoints").exists()


def test_an_unwritable_log_directory_is_refused_before_calibration(tmp_path, monkeypatch):
    """The CSV logger failed with a traceback once training started; W&B wrote to a temporary directory instead."""
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setattr("dq.train.calibration_set", lambda *a, **k: pytest.fail("calibrated before the refusal"))
    for logger in ("csv", "wandb"):
        cfg = compose_cfg("train", [f"logger={logger}", f"logger.{logger}.save_dir={blocked / 'logs'}"], tmp_path)
        with pytest.raises(ConfigError, match=rf"logger.{logger}.save_dir=.*a_file/logs: cannot write there"):
            train(cfg)
        assert not (Path(cfg.run_dir) / "checkpoints").exists()  # nothing written: the refused run leaves no trace
    writable = tmp_path / "new" / "logs"
    cfg = compose_cfg("train", ["logger=csv", f"logger.csv.save_dir={writable}"], tmp_path)
    assert build_loggers(cfg.logger) and writable.is_dir()  # made now, as the logger would make it


def test_fp_quantizer_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="quantizer=fp"):
        train(compose_cfg("train", ["quantizer=fp", "logger=none"], tmp_path))


def test_trainer_gpu_moves_the_whole_run_and_a_mismatch_is_named(tmp_path):
    assert compose_cfg("train", ["trainer=gpu"], tmp_path).device == "cuda"
    assert compose_cfg("pretrain", ["trainer=gpu"], tmp_path).trainer.accelerator == "gpu"
    cfg = compose_cfg("train", ["trainer.accelerator=gpu", "logger=none"], tmp_path)
    with pytest.raises(ValueError, match=r"trainer.accelerator='gpu'.*device='cpu'"):
        train(cfg)


def test_peak_memory_is_per_run_window() -> None:
    """A multirun's jobs share a process: the peak after `reset_peak_memory` must not include an earlier job's."""
    big = torch.ones(200 * 2**20 // 4)  # 200 MB, touched
    before = peak_memory()["peak_mem_mb"]
    del big
    reset_peak_memory()
    after = peak_memory()["peak_mem_mb"]
    assert before - after > 150, (before, after)


@pytest.mark.parametrize(("platform", "ru_maxrss"), [("linux", 3 * 2**20), ("darwin", 3 * 2**30)])
def test_peak_memory_without_proc_reads_ru_maxrss_in_its_platforms_unit(platform, ru_maxrss, monkeypatch) -> None:
    """Where /proc/self/status is missing (macOS), the peak comes from ru_maxrss: KiB on Linux, bytes on macOS."""
    import dq.train as train_module

    class NoProc:
        def __init__(self, path: str) -> None:
            assert path == "/proc/self/status"

        def read_text(self) -> str:
            raise OSError("no /proc here")

    monkeypatch.setattr(train_module, "Path", NoProc)
    monkeypatch.setattr(train_module.sys, "platform", platform)
    monkeypatch.setattr(train_module.resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=ru_maxrss))
    assert peak_memory()["peak_mem_mb"] == 3072.0  # 3 GiB either way


def test_a_run_whose_every_block_is_put_back_says_so_at_the_end(tiny_teacher_dir, tmp_path, caplog):
    """Revert names each block as it happens; a run where training undid everything (rates far too high) exited 0
    with nothing on the terminal summing it up (a bad-value audit's finding)."""
    rates = ["distill.lr_weight=1e3", "distill.lr_weight_qparams=1e3", "distill.lr_act_qparams=1e3"]
    over = [o for o in fast(tiny_teacher_dir) if not o.startswith("eval.")] + ["eval=none", "logger=none", *rates]
    with caplog.at_level(logging.INFO, logger="dq"):
        result = train(compose_cfg("train", over, tmp_path / "run"))
    reverted, blocks = result["cost"]["reverted_blocks"], result["cost"]["blocks"]
    summary = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "kept untrained" in r.message]
    assert summary == [
        f"{blocks} of {blocks} blocks kept untrained (training raised their calibration MSE): {', '.join(reverted)}. "
        "Every block: the learning rates (distill.lr_*) are likely too high for this model"
    ]
    assert len(reverted) == blocks > 1


def test_a_second_run_into_the_same_run_dir_keeps_the_csv_log(tiny_teacher_dir, tmp_path, monkeypatch, caplog):
    """Re-running into an existing run directory (resume, or a repeated command) must not crash at the final log."""
    run = tmp_path / "run"
    first = train(compose_cfg("train", fast(tiny_teacher_dir) + ["logger=csv"], run))
    (run / "checkpoints" / "config.json").unlink()  # as a run started before dq kept it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dq"), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        again = train(compose_cfg("train", fast(tiny_teacher_dir) + ["logger=csv"], run))
    assert "every block is trained and the student saved in" in caplog.text  # scored again, not trained
    assert not [w for w in warned if "across ranks is zero" in str(w.message)]  # Lightning's alarm: no batches left
    assert (run / "checkpoints" / "config.json").is_file()  # back-filled on the matching resume
    assert again["student"]["psnr_to_teacher"] == pytest.approx(first["student"]["psnr_to_teacher"])
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    assert any(r.get("eval/student/psnr_to_teacher") for r in rows)
    assert any(r.get("block/00/loss") for r in rows)  # the first attempt's training curves are kept

    # other student settings: refused before anything in the run is touched (dilation.json was rewritten before)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and "csv" not in p.parts}
    monkeypatch.setattr("dq.train.quantize_student", lambda *a: pytest.fail("quantized before the refusal"))
    other = fast(tiny_teacher_dir) + ["logger=csv", "distill.lr_weight=1e-5", "callbacks.weight_dilation.s_max=1.5"]
    with pytest.raises(ValueError, match=r"another configuration \(callbacks.weight_dilation.s_max, distill.lr_weight "
                       r"differ\); nothing was changed"):  # fmt: skip
        train(compose_cfg("train", other, run))
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and "csv" not in p.parts} == before


def test_a_finished_run_without_block_checkpoints_is_not_replaced_by_another_configuration(tiny_teacher_dir, tmp_path):
    """distill=model_kd / none keep no block checkpoints: another configuration into the same run directory would
    have replaced the student, results.json and the Hydra record without a word; the same one trains again."""
    run = tmp_path / "run"
    over = [o for o in fast(tiny_teacher_dir) if o.split(".")[0] not in ("distill", "eval")]
    over += ["logger=none", "distill=none", "eval=none"]
    train(compose_cfg("train", over, run))
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    refused = rf"{run} holds a student trained with another configuration \(bits.act_bits, bits.name differ\)"
    with pytest.raises(ConfigError, match=refused):
        train(compose_cfg("train", [*over, "bits=w4a4"], run))
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    train(compose_cfg("train", over, run))  # the same command again is accepted


def test_a_rerun_of_a_finished_whole_model_run_scores_its_saved_student_and_a_bkd_run_without_checkpoints_trains(
    tiny_teacher_dir, tmp_path, monkeypatch
):
    """distill=model_kd keeps no block checkpoints: a re-run with its configuration (kept in checkpoints/config.json)
    scores the saved student instead of training again. A BKD run whose block checkpoints were deleted, to start over,
    trains again, though its student and config.json are still there."""
    over = [o for o in fast(tiny_teacher_dir) if not o.startswith("distill.")] + ["logger=none"]
    kd = [*over, "distill=model_kd", "distill.iters=4", "distill.batch_size=4"]
    first = train(compose_cfg("train", kd, tmp_path / "kd"))
    real = dq.train.quantize_student
    monkeypatch.setattr(dq.train, "quantize_student", lambda *a, **k: pytest.fail("trained again"))
    again = train(compose_cfg("train", kd, tmp_path / "kd"))
    assert again["student"]["psnr_to_teacher"] == first["student"]["psnr_to_teacher"]
    assert again["cost"] == {**first["cost"], "evaluated_saved_student": True}
    monkeypatch.setattr(dq.train, "quantize_student", real)
    bkd = [*fast(tiny_teacher_dir), "logger=none"]
    train(compose_cfg("train", bkd, tmp_path / "bkd"))
    (tmp_path / "bkd" / "checkpoints" / "last.safetensors").unlink()  # config.json and student/ stay
    calls = []
    monkeypatch.setattr(dq.train, "quantize_student", lambda *a, **k: calls.append(1) or real(*a, **k))
    retrained = train(compose_cfg("train", bkd, tmp_path / "bkd"))
    assert calls == [1] and "evaluated_saved_student" not in retrained["cost"]


def test_a_run_dir_in_use_by_another_process_is_refused_and_a_killed_holder_frees_it(tiny_teacher_dir, tmp_path):
    """Two processes writing one run directory corrupt its CSV log; the second is refused up front. A holder that
    is killed (SIGKILL, no clean-up) leaves no stale lock: the OS releases it with the process."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; from dq.paths import run_dir_lock\nwith run_dir_lock({str(run)!r}):\n"
         "    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=r"run_dir=.*run is in use by another running dq process"):
            train(compose_cfg("train", fast(tiny_teacher_dir) + ["logger=csv"], run))
        assert sorted(p.name for p in run.iterdir()) == [".dq.lock"]  # nothing was written
    finally:
        holder.kill()
        holder.wait()
    with run_dir_lock(run):  # free again
        pass


@pytest.mark.parametrize("exits", [True, False])
def test_an_interrupted_run_says_how_to_resume(tiny_teacher_dir, tmp_path, monkeypatch, caplog, exits):
    """Lightning ends the process after Ctrl-C (SystemExit) in recent versions, and returned in older ones; the hint
    offers a resume only where a block checkpoint was written."""
    run = tmp_path / "run"

    def interrupted_fit(self, *args, **kwargs):
        self.state.status = TrainerStatus.INTERRUPTED
        if exits:  # with one finished block on disk (only its fingerprint is read)
            meta = {"dq_block_checkpoint": json.dumps({"fingerprint": "f"})}
            save_file({"x": torch.zeros(1)}, str(run / "checkpoints" / "last.safetensors"), metadata=meta)
            raise SystemExit(1)

    monkeypatch.setattr(pl.Trainer, "fit", interrupted_fit)
    if exits:
        with pytest.raises(SystemExit):
            train(compose_cfg("train", fast(tiny_teacher_dir) + ["logger=none"], run))
        hint = rf"the finished blocks are kept in {run / 'checkpoints'}: .*hydra.run.dir={run} to resume"
        assert re.search(hint, caplog.text) and caplog.records[-1].levelno == logging.WARNING
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # a job of hydra/launcher=slurm: submitit requeues it
        (run / "checkpoints" / "last.safetensors").unlink()
        with pytest.raises(SystemExit):
            train(compose_cfg("train", fast(tiny_teacher_dir) + ["logger=none"], run))
        assert "the job resumes from them where submitit requeues it" in caplog.records[-1].getMessage()
    else:
        with pytest.raises(RuntimeError, match="interrupted before any checkpoint was written: a re-run starts over"):
            train(compose_cfg("train", fast(tiny_teacher_dir) + ["logger=none"], run))
    assert not (run / "results.json").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_run_ended_by_a_signal_exits_with_the_shells_status_and_says_how_to_resume(
    tiny_teacher_dir, tmp_path, monkeypatch, caplog, signum
):
    """A job scheduler's SIGTERM (Slurm, Kubernetes, `kill`) or Ctrl-C ends training after Lightning's graceful
    shutdown with the status of a process ended by that signal (143, 130): Lightning's own exit is status 0 after
    SIGTERM, which a scheduler takes for success, and 1 after Ctrl-C, as for an error."""
    run = tmp_path / "run"

    class Stop(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:  # block 1 (2 steps) is checkpointed, block 2 has started
                os.kill(os.getpid(), signum)

    real = build_callbacks
    monkeypatch.setattr("dq.train.build_callbacks", lambda cfg: [*real(cfg), Stop()])
    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with Ctrl-C ignored
    try:
        with pytest.raises(SystemExit) as exit_:
            train(compose_cfg("train", fast(tiny_teacher_dir) + ["logger=none"], run))
    finally:
        signal.signal(signal.SIGINT, handler)  # as before (Lightning ignores Ctrl-C once it has caught one)
    assert exit_.value.code == 128 + signum
    assert re.search(rf"kept in {run / 'checkpoints'}: .*hydra.run.dir={run} to resume", caplog.text)
    assert (run / "checkpoints" / "last.safetensors").is_file() and not (run / "results.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Lightning put the default handler back


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=tmp_path)


def test_a_refused_resume_leaves_the_runs_hydra_record_as_it_was(tiny_teacher_dir, tmp_path):
    """Hydra saves each command's config to <run>/.hydra before dq can refuse it; dq puts the run's own back. Both
    commands' messages reach <run>/train.log with their times, and the terminal as plain lines."""
    run = tmp_path / "run"
    over = [o for o in fast(tiny_teacher_dir) if not o.startswith("eval.")] + ["eval=none", "distill.iters_per_block=1"]
    first = _cli(tmp_path, "dq.train", *over, "logger=none", f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"\nrun directory: {run}\n" in "\n" + first.stdout and "\nweight dilation: " in first.stdout
    assert re.search(
        rf"^\[[-\d :,]+\]\[dq\.train\]\[INFO\] - run directory: {re.escape(str(run))}$",
        (run / "train.log").read_text(),
        re.M,
    )
    record = {p.name: p.read_text() for p in (run / ".hydra").iterdir()}
    assert "distill.iters_per_block=1" in record["overrides.yaml"]

    refused = _cli(tmp_path, "dq.train", *over, "logger=none", "calib.seed=7", f"hydra.run.dir={run}")
    assert refused.returncode == 2 and "calib.seed differ" in refused.stderr and "differ" not in refused.stdout
    assert re.search(r"\[ERROR\] - dq-train: error: .*calib\.seed differ", (run / "train.log").read_text())
    assert {p.name: p.read_text() for p in (run / ".hydra").iterdir()} == record
    refused = _cli(tmp_path, "dq.eval", "logger=none", f"hydra.run.dir={run}")  # any refusal, not only a resume's
    assert refused.returncode == 2 and "holds a dq-train run" in refused.stderr
    assert {p.name: p.read_text() for p in (run / ".hydra").iterdir()} == record
    # each attempt's command, as typed, heads its lines in the log file (and only there)
    commands = re.findall(r"\]\[dq\.command\]\[INFO\] - (.*)$", (run / "train.log").read_text(), re.M)
    assert commands == [
        shlex.join(["dq-train", *over, "logger=none", f"hydra.run.dir={run}"]),
        shlex.join(["dq-train", *over, "logger=none", "calib.seed=7", f"hydra.run.dir={run}"]),
    ]
    assert "dq-train model.path=" not in first.stdout + first.stderr + refused.stdout + refused.stderr
    eval_line = f"[dq.command][INFO] - dq-eval logger=none hydra.run.dir={run}\n"
    assert eval_line in (run / "eval.log").read_text()


def test_dqs_own_warnings_are_one_line_like_its_errors(tmp_path):
    """A setting dq warns about printed its source file, line and code, and a blank line, before the one-line
    refusal; other packages' warnings keep their file and line."""
    refused = _cli(tmp_path, "dq.eval", "logger=none", "eval.n_samples=16", f"model.path={tmp_path / 'missing'}",
                   f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    lines = refused.stderr.splitlines()
    assert refused.returncode == 2 and len(lines) == 2, refused.stderr
    assert lines[0].startswith("dq-eval: warning: eval.n_samples=16 is too few for meaningful scores: IS splits")
    assert lines[1].startswith(f"dq-eval: error: Model directory '{tmp_path / 'missing'}' does not exist.")
    fmt = one_line_warnings("dq-train", warnings.formatwarning, end="")
    assert fmt("a cache was skipped", UserWarning, str(Path(dq.__file__).parent / "utils" / "io.py"), 62) == (
        "dq-train: warning: a cache was skipped"
    )
    elsewhere = fmt("deprecated", FutureWarning, "/site-packages/other/x.py", 7, "call()")
    assert elsewhere == "/site-packages/other/x.py:7: FutureWarning: deprecated\n  call()"


def test_progress_bars_go_to_stderr_and_stdout_keeps_whole_lines(tiny_teacher_dir, tmp_path):
    """`dq-train ... > out.txt` (or `| tee`) keeps dq's messages as lines; the bars (dq's and Lightning's) are on
    stderr, and a message printed while a bar runs is not glued onto the bar's line."""
    run = tmp_path / "run"
    over = [o for o in fast(tiny_teacher_dir) if "progress" not in o and not o.startswith("eval.")]
    done = _cli(tmp_path, "dq.train", *over, "eval=none", "logger=none", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stdout and re.search(r"^block 1 \(conv_in\): ", done.stdout, re.M)
    bars = done.stderr
    assert re.search(r"calibration: 100%", bars) and re.search(r"distillation: 100%.*it/s", bars)  # dq's, Lightning's
    assert "block 1 (conv_in)" not in bars and "Epoch 0" not in bars  # Lightning's label: one epoch is all of BKD
    assert re.search(r"distill/block=16\b", bars) and not re.search(r"distill/block=\d+\.", bars)  # not 16.000
    # Lightning's TPU line and why fit stopped go to the log file only; its GPU line stays on the terminal
    terminal, log = done.stdout + done.stderr, (run / "train.log").read_text()
    for line in ("TPU available: False", "`Trainer.fit` stopped: `max_steps="):
        assert line not in terminal and line in log
    assert "GPU available: False, used: False" in terminal


def test_help_lists_the_groups_the_app_composes():
    """Hydra's --help listed every group in conf/: dq-train offered pretrain=, which it then refused."""
    groups = {app: [line.split(":")[0] for line in config_groups(app).splitlines()] for app in ("train", "pretrain")}
    assert groups["pretrain"] == ["logger", "pretrain", "trainer"]
    assert "pretrain" not in groups["train"] and {"bits", "distill", "callbacks", "experiment"} <= set(groups["train"])
    assert "distill: bkd, model_kd, none" in config_groups("train").splitlines()


def test_a_log_line_printed_while_a_bar_runs_gets_a_line_of_its_own():
    out = io.StringIO()
    handler = ConsoleHandler(out)
    log = logging.getLogger("dq.test.console")
    log.addHandler(handler)
    try:
        with tqdm(total=3, file=out, ascii=True) as bar:
            bar.update()
            log.warning("block 1 done")
            bar.update()
    finally:
        log.removeHandler(handler)
    # tqdm.write clears the bar (\r, spaces, \r), writes the line, and redraws the bar after it
    assert re.search(r"\r +\rblock 1 done\n\r.*1/3", out.getvalue())


def test_a_diverging_run_stops_with_one_line_naming_the_block_and_what_to_change(tiny_teacher_dir, tmp_path):
    """NaN in training is a setting to change, not a bug: one line, exit 2, the block, the last good checkpoint and
    the learning rates named; the run directory and its checkpoints are kept."""
    run = tmp_path / "run"
    over = [o for o in fast(tiny_teacher_dir) if not o.startswith("eval.")] + ["eval=none"]
    rates = ["distill.lr_weight=1e30", "distill.lr_weight_qparams=1e30", "distill.lr_act_qparams=1e30"]
    rates.append("distill.revert_worse=false")
    done = _cli(tmp_path, "dq.train", *over, *rates, "logger=none", f"hydra.run.dir={run}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.splitlines()[-1]
    assert re.match(r"dq-train: error: non-finite distillation loss \(\S+\) in block \d+ \(", last), last
    assert "lower learning rates (distill.lr_weight" in last and "new run directory" in last
    assert (run / "checkpoints").is_dir() and "crashed" not in (run / "train.log").read_text()


def test_run_dir_on_the_command_line_is_refused_for_hydra_run_dir(tmp_path):
    """`run_dir=` alone would leave Hydra's config and log in another, timestamped directory."""
    mine = tmp_path / "mine"
    done = _cli(tmp_path, "dq.eval", f"run_dir={mine}", f"hydra.run.dir={tmp_path / 'hydra'}", "logger=none")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"dq-eval: error: run_dir={mine} would split the run")
    assert f"Pass hydra.run.dir={mine} instead" in done.stderr
    assert not mine.exists() and not (tmp_path / "hydra").exists()  # the refused command leaves no run behind


@pytest.mark.parametrize(
    ("args", "first_line"),
    [
        (["dq.train", "bits.weight_bits=3.5"], "dq-train: error: bits / quantizer.spec: weight_bits=3.5 is not an"),
        (["dq.train", "distill.iters_per_block=0"], "dq-train: error: distill.iters_per_block=0 is invalid"),
        (["dq.train", "model.path=/nowhere"], "dq-train: error: Model directory '/nowhere' does not exist"),
        (["dq.eval", "+eval.nsamples=3"], "dq-eval: error: +eval.nsamples=3: dq reads no eval.nsamples"),
        (
            ["dq.eval", "quantizer=ptq_minmax", "bits.keep_8bit=[conv_in,nowhere]"],
            "dq-eval: error: keep_8bit entries ['nowhere'] name no quantizable layer of this model",
        ),
        (["dq.pretrain", "install_dir=."], "dq-pretrain: error: install_dir=/"),  # resolved; "... is not empty"
    ],
)
def test_command_line_errors_are_one_line_not_a_traceback(tmp_path, args, first_line):
    (tmp_path / "something.txt").write_text("kept")  # install_dir=. is not empty
    done = _cli(tmp_path, *args, f"hydra.run.dir={tmp_path / 'run'}", "logger=none")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(first_line)
    assert "run directory:" not in done.stdout  # it is named once the command is accepted
    assert (tmp_path / "something.txt").read_text() == "kept"
    assert not (tmp_path / "run").exists()  # a refused command leaves no empty run directory among the real ones


def test_a_refused_command_keeps_an_empty_run_directory_the_user_made(tmp_path):
    (tmp_path / "mine").mkdir()
    done = _cli(tmp_path, "dq.eval", "eval.n_samples=0", f"hydra.run.dir={tmp_path / 'mine'}", "logger=none")
    assert done.returncode == 2 and "eval.n_samples=0 is invalid" in done.stderr
    assert "dq-eval eval.n_samples=0" in (tmp_path / "mine" / "eval.log").read_text()  # its attempt is logged there


@pytest.mark.parametrize("case", ["fresh", "user file", "earlier attempt", "lock held", "working directory"])
def test_a_refused_command_removes_only_a_run_directory_it_filled_itself(tmp_path, monkeypatch, case):
    """A refused single run leaves no run directory when Hydra's record and this command's log are all there is;
    anything else (the user's files, an earlier attempt's log lines, a lock that a starting process holds) keeps it."""
    run = tmp_path / "outputs" / "eval" / "run"  # as Hydra's default outputs/<app>/<...>/<time>
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "notes.txt").write_text("kept")
    NoteFoundRunDir().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(run)}}}))  # before Hydra makes it
    (run / ".hydra").mkdir(parents=True)
    monkeypatch.chdir(run if case == "working directory" else tmp_path)
    for name in HYDRA_RECORD:
        (run / ".hydra" / name).write_text("{}")
    earlier = "[2026-11-28 03:00:00,000][dq.eval][INFO] - run directory: run\n"  # any line, in any log format
    (run / "eval.log").write_text(earlier if case == "earlier attempt" else "")
    if case == "user file":
        (run / "notes.txt").write_text("kept")
    hydra_cfg = SimpleNamespace(runtime=SimpleNamespace(output_dir=str(run)), job=SimpleNamespace(name="eval"),
                                output_subdir=".hydra")  # fmt: skip
    monkeypatch.setattr(HydraConfig, "get", lambda: hydra_cfg)
    new = run_dir_is_new()  # as cli_errors asks before the command writes its line
    assert new == (case not in ("user file", "earlier attempt"))
    with (run / "eval.log").open("a") as f:
        f.write("[2026-11-29 03:00:00,000][dq.command][INFO] - dq-eval eval.n_samples=0\n")
    (run / ".dq.lock").touch()
    with FileLock(run / ".dq.lock", timeout=0) if case == "lock held" else contextlib.nullcontext():
        if new:
            drop_refused_run_dir()
    assert run.exists() == (case != "fresh") and (tmp_path / "outputs" / "eval").exists() == (case != "fresh")
    assert (tmp_path / "outputs" / "notes.txt").read_text() == "kept"  # empty parents go, up to the first kept
    if case != "fresh":
        assert "dq-eval eval.n_samples=0" in (run / "eval.log").read_text()
        assert (run / ".hydra" / "config.yaml").exists()


def test_a_refused_name_with_a_path_leaves_no_directories_hydra_made(tmp_path):
    """Hydra makes the run directory `outputs/train/../../../esc/<...>` (and, walking its path, `outputs/train` too)
    before dq refuses the name: every directory it made goes, wherever it lies; what was there before stays."""
    here = tmp_path / "work" / "here"
    (tmp_path / "work" / "notes").mkdir(parents=True)
    here.mkdir()
    done = _cli(here, "dq.train", "model.name=../../../esc", "logger=none")
    assert done.returncode == 2 and "model.name='../../../esc' is invalid" in done.stderr
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["here", "notes"]  # no work/esc/...
    assert list(here.iterdir()) == []  # no outputs/train


@pytest.mark.parametrize("error", [ConfigError, MissingFileError, CheckpointError])
def test_only_errors_the_user_can_fix_lose_their_traceback(error, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_, cli_errors("dq-x"):
        raise error("'/a/b' is missing: set `model.path`")
    assert exit_.value.code == 2 and capsys.readouterr().err == "dq-x: error: '/a/b' is missing: set `model.path`\n"
    with pytest.raises(FileNotFoundError), cli_errors("dq-x"):  # a missing file dq did not check for is a bug
        (tmp_path / "not-there").read_text()


def test_a_config_error_fails_one_multirun_job_and_the_sweep_goes_on(tmp_path):
    """Each failed job says why on the terminal, as it fails, and in its own log file."""
    done = _cli(tmp_path, "dq.eval", "-m", "eval.n_samples=0,-1", "logger=none", f"hydra.sweep.dir={tmp_path / 'mr'}")
    assert done.returncode != 0
    assert sorted(p.name for p in (tmp_path / "mr").iterdir() if p.is_dir()) == ["0-fp-w8a8", "1-fp-w8a8"]
    for job, n in [("0-fp-w8a8", "0"), ("1-fp-w8a8", "-1")]:
        line = f"dq-eval: error: eval.n_samples={n} is invalid"
        assert f"\n{line}" in "\n" + done.stderr
        assert re.search(rf"\[ERROR\] - {line}", (tmp_path / "mr" / job / "eval.log").read_text())


def test_an_unexpected_error_keeps_its_traceback_on_the_terminal_and_in_the_log_file(tmp_path):
    run = tmp_path / "run"
    code = (
        "import sys, dq.eval\n"
        "dq.eval.evaluate = lambda cfg: {}['no such key']\n"  # a bug: not an error the user can fix
        f"sys.argv = ['dq-eval', 'logger=none', 'hydra.run.dir={run}']\n"
        "dq.eval.main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and "KeyError: 'no such key'" in done.stderr and done.stdout == ""
    kept = (run / "eval.log").read_text()
    assert "[dq.crash][ERROR] - dq-eval: crashed" in kept and "Traceback" in kept and "KeyError: 'no such key'" in kept


def test_help_says_what_each_tool_does(tmp_path):
    """...and lists the config groups that tool composes (`test_help_lists_the_groups_the_app_composes`)."""
    for module, first, group, other in [("dq.train", "dq-train: quantize", "distill", "pretrain"),
                                        ("dq.eval", "dq-eval: sample", "quantizer", "distill"),
                                        ("dq.pretrain", "dq-pretrain: train", "pretrain", "bits")]:  # fmt: skip
        done = _cli(tmp_path, module, "--help")
        assert done.returncode == 0 and done.stdout.startswith(first), (module, done.stdout[:200])
        assert re.search(rf"^{group}: \w", done.stdout, re.M) and not re.search(rf"^{other}: ", done.stdout, re.M)


def test_a_corrupt_block_checkpoint_is_named_before_any_work(tiny_teacher_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setattr("dq.train.quantize_student", lambda *a: pytest.fail("quantized before the refusal"))
    with pytest.raises(CheckpointError, match=r"block checkpoint .*last.safetensors is unreadable .*; delete it"):
        train(compose_cfg("train", fast(tiny_teacher_dir) + ["logger=none"], run))


def test_a_bad_tpq_init_is_named_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr("dq.train.load_teacher", lambda *a: pytest.fail("loaded the teacher before the check"))
    with pytest.raises(ConfigError, match=re.escape("callbacks.tpq.init='per_layer' is not one of")):
        train(compose_cfg("train", ["callbacks.tpq.init=per_layer", "logger=none"], tmp_path / "run"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["callbacks=efficientdm"], "callbacks.lora adds low-rank adapters that distill.lr_lora=0 leaves untrained"),
        (["callbacks=efficientdm", "distill=none"], "distill.lr_lora=None leaves untrained (distill=none)"),
        (["distill.lr_lora=1e-5"], "distill.lr_lora=1e-05 trains low-rank adapters, but no callbacks.lora adds them"),
    ],
)
def test_adapters_and_their_rate_are_refused_alone_before_any_work(tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr("dq.train.load_teacher", lambda *a: pytest.fail("loaded the teacher before the check"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(compose_cfg("train", [*overrides, "logger=none"], tmp_path / "run"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+distill.foo=1"], "distill.foo: not a setting of BlockwiseDistillation (distill)"),
        (
            ["distill=model_kd", "+distill.iters_per_block=3"],
            "distill.iters_per_block: not a setting of ModelDistillation (distill). distill.iters_per_block is a "
            "setting of distill=bkd, not of distill=model_kd",
        ),
        (
            ["+callbacks.tpq.inti=shared"],
            "callbacks.tpq.inti: not a setting of TemporalParallelQuantizer (callbacks.tpq). callbacks.tpq.inti: did "
            "you mean callbacks.tpq.init?",
        ),
        (["+distill.lr_weights=1e-4"], "distill.lr_weights: did you mean distill.lr_weight or"),
        (["logger=csv", "+logger.csv.flush=1"], "logger.csv.flush: not a setting of ResumableCSVLogger"),
        (["logger=wandb", "+logger.wandb.entty=me"], "logger.wandb.entty: did you mean logger.wandb.entity?"),
        (["distill._target_=dq.distill.Blockwise"], "distill._target_=dq.distill.Blockwise names no class of dq"),
        (["+trainer.gradient_clip=1"], "trainer.gradient_clip: not an argument of pytorch_lightning.Trainer"),
        (["+trainer.max_steps=5"], "trainer.max_steps: set by dq-train itself"),
        (["+trainer.max_time=00:00:01:00"], "trainer.max_time: would end the distillation early"),
        (["+trainer.limit_train_batches=0.5"], "trainer.limit_train_batches: would end the distillation early"),
        (["+trainer.fast_dev_run=true"], "trainer.fast_dev_run: would end the distillation early"),
        (["+callbacks.tpq.num_steps=10"], "callbacks.tpq.num_steps=10 is invalid: TPQ keeps one range per sampling"),
        (["+callbacks.weight_dilation.filename=../d.json"], "callbacks.weight_dilation.filename='../d.json' is inv"),
        (["+callbacks.weight_dilation.filename=/tmp/d.json"], "the name becomes a file in the run directory"),
        (["model=ddpm_cifar10", "eval=none"], "model.path is not set: model=ddpm_cifar10 loads from a local diffusers"),
        (["quantizer=ptq_minmax"], "quantizer.temporal=false (quantizer=ptq_minmax), but dq-train makes activation"),
        (
            ["quantizer=ptq_minmax", "quantizer.temporal=true", "callbacks=none"],
            "[] leave out: pass quantizer.temporal=false",
        ),
    ],
)
def test_a_setting_the_class_does_not_take_is_named_before_any_work(tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr("dq.train.load_teacher", lambda *a: pytest.fail("loaded the teacher before the check"))
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(compose_cfg("train", overrides, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+eval.nsamples=3"], "+eval.nsamples=3: dq reads no eval.nsamples, and the value would change nothing. "
                               "Did you mean eval.n_samples"),
        (["eval=none", "+eval.n_samples=8"], "+eval.n_samples=8: eval=none samples nothing, so dq reads no eval.n_s"),
        (["++calib.ncalib=64"], "++calib.ncalib=64: dq reads no calib.ncalib"),
        (["+quantizer.spec.fp_input=true"], "Did you mean quantizer.spec.fp_network_input"),
        (["+model.sample_size=16"], "+model.sample_size=16: dq reads no model.sample_size"),
        (["+bits.keep8bit=[conv_in]"], "Did you mean bits.keep_8bit"),
        (["+quantizer.spec.weight_bits=3"], "+quantizer.spec.weight_bits=3: dq reads no quantizer.spec.weight_bits"),
        (["++eval.n_samples=8", "+quantizer.temporal=true", "++calib.n_traj=4", "+model.data.limit=5"], None),
        (["+quantizer.spec.weight_symmetric=true", "+quantizer.spec.quantize_attention=false"], None),  # QuantSpec's
        (["++eval.print_report=true"], None),
    ],
)  # fmt: skip
def test_an_appended_setting_dq_never_reads_is_refused(tmp_path, overrides, message):
    """Hydra answers a typo (`eval.nsamples=3`) with "use +eval.nsamples=3"; dq then refuses the added key instead of
    ignoring it. A key that some option of the group has (`quantizer=ptq_minmax`'s `temporal`) is read."""
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    if message is None:
        check_appended(cfg, overrides)
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_appended(cfg, overrides)


def test_accepted_settings_follow_kwargs_through_dq_and_stop_where_they_leave_it():
    class Outside:  # not dq's: its **kwargs could go anywhere
        def __init__(self, **kwargs):
            pass

    class Ours(Outside):
        def __init__(self, a: int = 0, **kwargs):
            super().__init__(**kwargs)

    Ours.__module__ = "dq.fake"
    assert accepted_settings(Ours) is None
    assert {"iters_per_block", "revert_worse", "calib_batch_size", "name"} <= accepted_settings(BlockwiseDistillation)
    assert "iters_per_block" not in accepted_settings(ModelDistillation)
    assert {"save_dir", "log_model", "entity", "tags"} <= accepted_settings(WandbLogger)  # Lightning's and wandb.init's


def test_evaluation_noise_that_repeats_the_calibration_trajectories_is_named(tmp_path):
    """make_noise is prefix-stable: with eval.seed = calib.seed the first n_traj evaluation samples start from the
    calibration trajectories' noise (one run of train_seed_scatter.txt, seed=1 on calib.seed 1, did)."""
    from dq.evaluation import calibration_noise_overlap
    from dq.models import make_noise

    assert torch.equal(make_noise(21, (1, 28, 28), 1), make_noise(1000, (1, 28, 28), 1)[:21])
    assert calibration_noise_overlap(compose_cfg("train", [], tmp_path / "a")) is None  # seed 0, calib.seed 1
    assert calibration_noise_overlap(compose_cfg("train", ["seed=1", "eval.seed=0"], tmp_path / "b")) is None
    said = calibration_noise_overlap(compose_cfg("train", ["seed=1"], tmp_path / "c"))
    assert said and said.startswith("eval.seed=1 equals calib.seed=1: the first 21 of the 1000 evaluation samples")
    said = calibration_noise_overlap(compose_cfg("train", ["eval.seed=1", "calib.n_traj=205"], tmp_path / "d"))
    assert said and "the first 205 of the 1000" in said


def test_a_rerun_of_a_finished_run_evaluates_its_saved_student_without_calibrating_again(
    tiny_teacher_dir, tmp_path, monkeypatch, caplog
):
    """Every block finished and the student saved (a requeued job stopped in the evaluation, a re-scoring): the
    re-run scores the saved student, keeping the run's training cost, instead of repeating Weight Dilation and the
    TPQ calibration; a saved student that does not match the checkpoints (here damaged) sends it down the usual path."""
    run = tmp_path / "run"
    over = [*fast(tiny_teacher_dir), "logger=none"]
    first = train(compose_cfg("train", over, run))
    real = dq.train.quantize_student
    monkeypatch.setattr(dq.train, "quantize_student", lambda *a, **k: pytest.fail("calibrated again"))
    again = train(compose_cfg("train", over, run))
    assert again["student"]["psnr_to_teacher"] == first["student"]["psnr_to_teacher"]
    assert again["student"]["fid"] == first["student"]["fid"]
    assert again["cost"] == {**first["cost"], "evaluated_saved_student": True}
    weights = next((run / "student").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # damaged: resumed (nothing left to train) and saved again
    monkeypatch.setattr(dq.train, "quantize_student", real)
    with caplog.at_level(logging.INFO, logger="dq"):
        resumed = train(compose_cfg("train", over, run))
    assert re.search(r"all 17 blocks were already trained in this run: nothing left to train", caplog.text)
    assert "evaluated_saved_student" not in resumed["cost"] and resumed["cost"]["resumed_at_step"] == 34
    assert resumed["student"]["psnr_to_teacher"] == first["student"]["psnr_to_teacher"]
