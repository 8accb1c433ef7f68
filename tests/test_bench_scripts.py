"""experiments/bench_sampling.py and bench_calibration.py: the printed fingerprints against students and samples made
here, the printed times against a fake clock."""

from __future__ import annotations

import hashlib
import re
import resource
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_cfg, load_script
from diffusers import DDIMPipeline

from dq.distill.calibration import teacher_fingerprint
from dq.models import load_teacher
from dq.quant import act_quantizers, expand_act_quantizers, load_quantized, save_quantized
from dq.student import build_student, quantize_student

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.sample_shape=[1,8,8]", "model.num_inference_steps=3"]  # with model.path=<tiny teacher>


def fake_clock(monkeypatch: pytest.MonkeyPatch, script, readings: list[float]):
    """`script.time.perf_counter` returns `readings` in turn (the script's module only); returns the iterator, so a
    test can check that every reading was taken."""
    it = iter(readings)
    monkeypatch.setattr(script, "time", SimpleNamespace(perf_counter=it.__next__))
    return it


@torch.no_grad()
def ddim_by_hand(unet, scheduler, noise: torch.Tensor, steps: int, batch: int) -> torch.Tensor:
    """Deterministic DDIM (eta 0) over `noise` in chunks of `batch`, clamped to [-1, 1]."""
    scheduler.set_timesteps(steps)
    out = []
    for x in noise.split(batch):
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def sha16(samples: torch.Tensor) -> str:
    return hashlib.sha256(samples.numpy().tobytes()).hexdigest()[:16]


def test_best_time_keeps_the_fastest_run(monkeypatch) -> None:
    """Fake clock: runs of 3 s, 1 s and 2 s give 1 s (not the first, last, slowest or mean), one sampling each."""
    bench = load_script("bench_sampling")
    calls = []

    def sample(model, scheduler, noise, steps, batch, progress=True):
        calls.append((model, scheduler, noise, steps, batch, progress))
        return torch.full((2,), float(len(calls)))

    monkeypatch.setattr(bench, "ddim_sample", sample)
    clock = fake_clock(monkeypatch, bench, [10.0, 13.0, 20.0, 21.0, 30.0, 32.0])
    noise = torch.zeros(2, 1, 4, 4)
    samples, seconds = bench.best_time("model", "sched", noise, 7, 5, repeats=3)
    assert seconds == 1.0
    assert next(clock, None) is None  # two readings per run, no more
    assert len(calls) == 3 and all(c == ("model", "sched", noise, 7, 5, False) for c in calls)
    assert samples.tolist() in ([1.0, 1.0], [2.0, 2.0], [3.0, 3.0])  # one run's samples (all runs sample alike)


def _save_student(teacher_dir, folder):
    """A TPQ student of the tiny teacher, built as dq-eval builds one, saved to `folder`; returns the teacher and its
    scheduler."""
    overrides = [f"model.path={teacher_dir}", *TINY, "calib.n_calib=12", "calib.batch_size=12"]
    cfg = compose_cfg("train", [*overrides, "+quantizer.temporal=true", "eval.progress=false"], folder.parent / "run")
    teacher, scheduler = load_teacher(teacher_dir)
    student, _ = build_student(cfg, teacher, scheduler)
    save_quantized(student, folder)
    return teacher, scheduler


def test_sampling_main_prints_the_student_samples_sha_and_the_times(tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    """Reference: the student saved here, sampled by a hand-written DDIM loop from `make_noise`-like seeded noise and
    checked against diffusers' stock DDIMPipeline; the times are a fake clock's."""
    teacher, scheduler = _save_student(tiny_teacher_dir, tmp_path / "student")

    bench = load_script("bench_sampling")
    # teacher runs of 0.25 s and 0.5 s, student runs of 1 s and 0.75 s: the fastest is first for one, last for the other
    clock = fake_clock(monkeypatch, bench, [0.0, 0.25, 1.0, 1.5, 2.0, 3.0, 4.0, 4.75])
    models, real_sample = [], bench.ddim_sample
    monkeypatch.setattr(
        bench, "ddim_sample", lambda model, *a, **k: models.append(model) or real_sample(model, *a, **k)
    )
    bench.main([str(tmp_path / "student"), "--n", "4", "--repeats", "2", *TINY, f"model.path={tiny_teacher_dir}",
                "eval.batch_size=2", "seed=5", "eval.seed=3"])  # fmt: skip
    out = capsys.readouterr().out.strip()
    assert next(clock, None) is None
    assert [bool(list(act_quantizers(m))) for m in models] == [False, False, True, True]  # teacher timed, then student

    noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(3))  # eval.seed=3, shape [1, 8, 8]
    saved = load_quantized(tmp_path / "student")
    expected = ddim_by_hand(saved, scheduler, noise, 3, 2)
    digest = sha16(expected)
    assert out == (
        f"4 images, DDIM-3, batch 2, cpu float32, {torch.get_num_threads()} thread(s), best of 2: teacher 0.25 s, "
        "student 0.75 s "
        f"(3.00x the teacher), student samples sha256 {digest}"
    )
    # the hand loop is DDIM as diffusers runs it (one batch of 4 there, so float order may differ in the last bit)
    pipe = DDIMPipeline(unet=saved, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(4, generator=torch.Generator().manual_seed(3), num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(stock, expected / 2 + 0.5, rtol=0, atol=1e-5)
    # the printed samples are the student's, from seed 3: not the teacher's, nor the student's from seed 0
    assert sha16(ddim_by_hand(teacher, scheduler, noise, 3, 2)) != digest
    assert sha16(ddim_by_hand(saved, scheduler, torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                              3, 2)) != digest  # fmt: skip


def test_sampling_main_samples_in_eval_dtype_as_dq_train(tiny_teacher_dir, tmp_path, capsys):
    """`eval.dtype=bfloat16`: both models cast as dq-train casts them (the student's latent weights snapped onto their
    grid), the noise too; reference: the saved student cast to bfloat16 by hand and sampled by the hand loop."""
    _, scheduler = _save_student(tiny_teacher_dir, tmp_path / "student")
    bench = load_script("bench_sampling")
    bench.main([str(tmp_path / "student"), "--n", "4", "--repeats", "1", *TINY, f"model.path={tiny_teacher_dir}",
                "eval.batch_size=2", "eval.seed=3", "eval.dtype=bfloat16"])  # fmt: skip
    out = capsys.readouterr().out.strip()
    noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    saved = load_quantized(tmp_path / "student").to(torch.bfloat16)
    expected = ddim_by_hand(saved, scheduler, noise, 3, 2).float()
    as_float32 = ddim_by_hand(load_quantized(tmp_path / "student"), scheduler, noise.float(), 3, 2)
    assert sha16(expected) != sha16(as_float32)  # the dtype shows in the samples
    assert re.fullmatch(
        rf"4 images, DDIM-3, batch 2, cpu bfloat16, \d+ thread\(s\), best of 1: .* student samples sha256 "
        rf"{sha16(expected)}",
        out,
    ), out


def test_calibration_main_fingerprints_the_calibrated_student(tiny_teacher_dir, tmp_path, monkeypatch, capsys) -> None:
    """Reference: a TPQ student built by `build_student` (dq-eval's path, per-step quantizers) on a calibration set
    drawn afresh into another cache; the uncalibrated student's fingerprint must differ; the time is a fake clock's."""
    overrides = [f"model.path={tiny_teacher_dir}", *TINY, "calib.n_calib=10", "calib.batch_size=4"]
    bench = load_script("bench_calibration")
    clock = fake_clock(monkeypatch, bench, [2.0, 3.5])
    seen = []
    real_fingerprint = bench.teacher_fingerprint

    def fingerprint(model):
        seen.append(model)
        return real_fingerprint(model)

    monkeypatch.setattr(bench, "teacher_fingerprint", fingerprint)
    bench.main([*overrides, f"eval.cache_dir={tmp_path / 'bench_cache'}"])
    out = capsys.readouterr().out.strip()
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    assert next(clock, None) is None

    m = re.fullmatch(
        rf"calibrate_student: 10 pairs, batch 4, cpu, {torch.get_num_threads()} thread\(s\): 1\.5 s, "
        r"peak host memory (\d+\.\d\d) GB, student sha256 ([0-9a-f]{16})",
        out,
    )
    assert m, out
    assert 0.05 < float(m[1]) <= peak_after + 0.005
    printed = m[2]

    cfg = compose_cfg(
        "train",
        [*overrides, f"eval.cache_dir={tmp_path / 'ref_cache'}", "+quantizer.temporal=true", "eval.progress=false"],
        tmp_path / "ref",
    )
    teacher, scheduler = load_teacher(tiny_teacher_dir)
    reference, _ = build_student(cfg, teacher, scheduler)
    (student,) = seen
    assert all(q.initialized for _, q in act_quantizers(student))
    ref_state, state = reference.state_dict(), student.state_dict()
    assert state.keys() == ref_state.keys()
    assert [k for k in state if not torch.equal(state[k], ref_state[k])] == []
    assert printed == teacher_fingerprint(reference)[:16]

    uncalibrated = quantize_student(cfg, teacher, scheduler)
    expand_act_quantizers(uncalibrated)
    assert teacher_fingerprint(uncalibrated)[:16] != printed
