"""Calibration set from teacher DDIM trajectories, and its verified on-disk cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_cond_unet, tiny_unet
from diffusers import DDIMScheduler, UNet2DModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch.testing import assert_close

from dq.distill.calibration import (
    CalibrationCacheWarning,
    CalibrationSet,
    build_calibration_set,
    calibration_cache_path,
    calibration_key_fields,
    get_calibration_set,
    load_or_build_calibration,
    select_balanced,
    teacher_fingerprint,
)
from dq.models.sampling import make_noise

SHAPE = (1, 8, 8)
STEPS = 5


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return tiny_unet(attention_head_dim=4).requires_grad_(False)


@pytest.fixture(scope="module")
def scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=100)


@pytest.fixture(scope="module")
def calib(unet: UNet2DModel, scheduler: DDIMScheduler) -> CalibrationSet:
    return build_calibration_set(unet, scheduler, 10, STEPS, SHAPE, seed=0, progress=False)


def assert_same(a: CalibrationSet, b: CalibrationSet) -> None:
    ta, tb = a.to_tensors(), b.to_tensors()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert_close(ta[k], tb[k], atol=0, rtol=0, msg=k)


def test_deterministic_per_seed_and_differs_across_seeds(unet, scheduler, calib) -> None:
    assert_same(calib, build_calibration_set(unet, scheduler, 10, STEPS, SHAPE, seed=0, progress=False))
    by_one = build_calibration_set(unet, scheduler, 10, STEPS, SHAPE, seed=0, batch_size=1, progress=False)
    assert_close(by_one.x_t, calib.x_t)  # another batching changes only float rounding
    assert_close(by_one.step_index, calib.step_index, atol=0, rtol=0)
    other = build_calibration_set(unet, scheduler, 10, STEPS, SHAPE, seed=1, progress=False)
    assert not torch.equal(calib.x_t, other.x_t)


def test_shapes_and_table(calib: CalibrationSet, scheduler: DDIMScheduler) -> None:
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(STEPS)
    assert len(calib) == 10 and calib.x_t.shape == (10, *SHAPE) and calib.x_t.dtype == torch.float32
    assert_close(calib.table, sched.timesteps.long(), atol=0, rtol=0)
    assert_close(calib.timesteps, calib.table[calib.step_index], atol=0, rtol=0)
    assert calib.encoder_hidden_states is None


@pytest.mark.parametrize("n_calib", [10, 7, 13, 1])
def test_steps_are_balanced(n_calib: int) -> None:
    n_traj = -(-n_calib // STEPS)
    traj, step = select_balanced(n_calib, STEPS, n_traj, seed=3)
    counts = torch.bincount(step, minlength=STEPS)
    assert counts.sum() == n_calib and counts.max() - counts.min() <= 1
    if n_calib % STEPS == 0:
        assert (counts == n_calib // STEPS).all()
    pairs = {(int(a), int(b)) for a, b in zip(traj, step, strict=True)}
    assert len(pairs) == n_calib  # no (trajectory, step) pair is drawn twice
    assert int(traj.max()) < n_traj


def test_entries_follow_the_teacher_trajectories(unet, scheduler, calib) -> None:
    """x_t at step 0 is the seeded noise; later entries match a plain DDIM loop over the same noise."""
    first = calib.step_index == 0
    assert first.any()
    assert_close(calib.x_t[first], make_noise(2, SHAPE, seed=0)[calib.trajectory[first]], atol=0, rtol=0)
    assert_follows_trajectories(calib, unet, scheduler, n_traj=2)  # ceil(10 / 5)


def assert_follows_trajectories(c: CalibrationSet, unet, scheduler, n_traj: int) -> None:
    """Every entry equals a plain DDIM loop over `make_noise(n_traj, ...)` at its trajectory and step."""
    x = make_noise(n_traj, SHAPE, seed=0)
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(STEPS)
    with torch.no_grad():
        for s, t in enumerate(sched.timesteps):
            at = c.step_index == s
            assert_close(c.x_t[at], x[c.trajectory[at]], atol=0, rtol=0, msg=f"step {s}")
            x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample


def test_more_trajectories_follow_the_teacher_and_spread_the_set(unet, scheduler, calib) -> None:
    """n_traj = n_calib draws the same number of pairs from more distinct images, each still a true trajectory input."""
    wide = build_calibration_set(unet, scheduler, 10, STEPS, SHAPE, seed=0, progress=False, n_traj=10)
    assert len(wide) == 10 and int(wide.trajectory.max()) < 10
    assert torch.bincount(wide.step_index, minlength=STEPS).tolist() == [2] * STEPS
    assert wide.trajectory.unique().numel() > calib.trajectory.unique().numel() == 2
    assert_follows_trajectories(wide, unet, scheduler, n_traj=10)
    a = calibration_key_fields(unet, scheduler, 10, STEPS, SHAPE, seed=0)
    b = calibration_key_fields(unet, scheduler, 10, STEPS, SHAPE, seed=0, n_traj=10)
    assert a["n_traj"] == 2 and b["n_traj"] == 10  # part of the cache key
    assert a["device"] == "cpu"  # so is the device the trajectories were sampled on
    assert a == calibration_key_fields(unet, scheduler, 10, STEPS, SHAPE, seed=0, n_traj=2)


@pytest.mark.parametrize("bad", [1, 0, 2.5, True])
def test_too_few_trajectories_is_a_clear_error(unet, scheduler, bad) -> None:
    with pytest.raises(ValueError, match="calib.n_traj"):
        build_calibration_set(unet, scheduler, 10, STEPS, SHAPE, seed=0, progress=False, n_traj=bad)


def test_conditional_teacher_records_per_sample_conditioning() -> None:
    cond = tiny_cond_unet()
    ehs = torch.randn(2, 3, 12)  # one prompt embedding per trajectory: ceil(6 / 3) = 2
    sched = DDIMScheduler(num_train_timesteps=100)
    c = build_calibration_set(cond, sched, 6, 3, (4, 8, 8), seed=0, encoder_hidden_states=ehs, progress=False)
    assert c.encoder_hidden_states.shape == (6, 3, 12)
    assert_close(c.encoder_hidden_states, ehs[c.trajectory], atol=0, rtol=0)
    assert c.subset([0, 5]).encoder_hidden_states.shape == (2, 3, 12)
    with pytest.raises(ValueError, match="one per trajectory"):
        build_calibration_set(cond, sched, 6, 3, (4, 8, 8), seed=0, encoder_hidden_states=torch.randn(4, 3, 12))


def test_subset(calib: CalibrationSet) -> None:
    sub = calib.subset(torch.tensor([3, 1]))
    assert len(sub) == 2
    assert_close(sub.x_t, calib.x_t[[3, 1]], atol=0, rtol=0)
    assert_close(sub.table, calib.table, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------ cache

FIELDS = {"teacher": "abc", "n_calib": 10, "num_inference_steps": STEPS, "shape": [1, 8, 8], "seed": 0}


class CountingBuild:
    def __init__(self, calib: CalibrationSet) -> None:
        self.calib, self.calls = calib, 0

    def __call__(self) -> CalibrationSet:
        self.calls += 1
        return self.calib


def test_cache_round_trip_without_rebuild(tmp_path: Path, calib: CalibrationSet) -> None:
    build = CountingBuild(calib)
    first = load_or_build_calibration(tmp_path, FIELDS, build)
    path = calibration_cache_path(tmp_path, FIELDS)
    assert path.is_file() and path.parent == tmp_path / "calib" and build.calls == 1
    second = load_or_build_calibration(tmp_path, dict(reversed(FIELDS.items())), build)  # key order is irrelevant
    assert build.calls == 1
    assert_same(first, second)
    assert_same(calib, second)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # atomic write left no temp file
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["key_fields"])["seed"] == 0
    assert calibration_cache_path(tmp_path, {**FIELDS, "seed": 1}) != path


def test_a_cache_that_cannot_be_written_still_gives_the_set(tmp_path: Path, calib: CalibrationSet) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    with pytest.warns(CalibrationCacheWarning, match="continuing uncached"):
        assert_same(calib, load_or_build_calibration(blocker, FIELDS, CountingBuild(calib)))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(
        torch.randint(0, 256, (path.stat().st_size,), generator=torch.Generator().manual_seed(0))
        .to(torch.uint8)
        .numpy()
        .tobytes()
    )


def _other_metadata(path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = json.loads(f.metadata()["key_fields"])
    save_file(tensors, str(path), metadata={"key_fields": json.dumps({**meta, "seed": 99})})


def _nan(path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    tensors["x_t"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(path), metadata=meta)


def _wrong_shape(path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    tensors["timesteps"] = tensors["timesteps"][:-1]
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("damage", [_truncate, _random_bytes, _other_metadata, _nan, _wrong_shape])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path: Path, calib: CalibrationSet, damage) -> None:
    build = CountingBuild(calib)
    load_or_build_calibration(tmp_path, FIELDS, build)
    path = calibration_cache_path(tmp_path, FIELDS)
    damage(path)
    with pytest.warns(CalibrationCacheWarning, match=path.name):
        rebuilt = load_or_build_calibration(tmp_path, FIELDS, build)
    assert build.calls == 2
    assert_same(rebuilt, calib)
    assert_same(load_or_build_calibration(tmp_path, FIELDS, build), calib)  # the rewritten file is good again
    assert build.calls == 2
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_teacher_fingerprint(unet: UNet2DModel) -> None:
    fp = teacher_fingerprint(unet)
    assert fp == teacher_fingerprint(unet) and len(fp) == 64
    assert teacher_fingerprint(unet, max_elements_per_tensor=16) != fp  # sampled hashing is a different digest
    saved = unet.conv_out.bias.detach().clone()
    with torch.no_grad():
        unet.conv_out.bias[0] += 1.0
        try:
            assert teacher_fingerprint(unet) != fp
        finally:
            unet.conv_out.bias.copy_(saved)
    assert teacher_fingerprint(unet) == fp


def test_get_calibration_set_uses_the_cache(tmp_path: Path, unet, scheduler, calib) -> None:
    first = get_calibration_set(unet, scheduler, 10, STEPS, SHAPE, seed=0, cache_root=tmp_path, progress=False)
    assert_same(first, calib)
    fields = calibration_key_fields(unet, scheduler, 10, STEPS, SHAPE, seed=0)
    assert calibration_cache_path(tmp_path, fields).is_file()
    again = load_or_build_calibration(tmp_path, fields, lambda: pytest.fail("rebuilt a valid cache"))
    assert_same(again, calib)


def test_a_scheduler_other_than_ddim_is_named(unet: UNet2DModel, scheduler: DDIMScheduler) -> None:
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler.from_config(scheduler.config)
    with pytest.raises(TypeError, match=r"runs DDIM trajectories .* not EulerDiscreteScheduler: pass DDIMScheduler"):
        build_calibration_set(unet, euler, 10, STEPS, SHAPE, seed=0, progress=False)
