"""experiments/fid_sensitivity.py: its controlled errors against hand-built images, and its table against FID, IS
and PSNR computed by hand."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLASSIFIER, TEACHER, frechet_by_hand, load_script
from PIL import Image

from dq.data import load_mnist_split
from dq.metrics import MNISTClassifier
from dq.models import ddim_sample, load_teacher, make_noise

pytestmark = pytest.mark.usefixtures("one_thread")

fs = load_script("fid_sensitivity")

DBS = (20.0, 25.0, 27.5, 30.0, 32.5, 35.0, 40.0)  # the target PSNRs of the noise rows
BLURS = (0.05, 0.1, 0.2, 0.3)
OFFSETS = (0.02, 0.05, 0.1)


def test_gaussian_noise_reaches_its_target_psnr() -> None:
    """Noise on a mid-grey image (no clamping): its std is 2 / 10^(dB / 20), its PSNR the target dB; seeded."""
    x = torch.zeros(64, 2, 16, 16)
    rows = fs.perturbations(x, seed=0)
    assert len(rows) == len(DBS) + len(BLURS) + len(OFFSETS)
    for (label, noisy), db in zip(rows, DBS, strict=False):
        sigma = 2.0 / 10 ** (db / 20)
        assert label == f"Gaussian noise, sigma {sigma:.4f}"
        assert noisy.std().item() == pytest.approx(sigma, rel=0.01) and abs(noisy.mean().item()) < sigma / 50
        mse = noisy.double().pow(2).flatten(1).mean(1)
        assert (10 * torch.log10(4 / mse)).mean().item() == pytest.approx(db, abs=0.1)
    again, other = fs.perturbations(x, seed=0), fs.perturbations(x, seed=1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(rows, again, strict=True))
    assert not torch.equal(rows[0][1], other[0][1])
    assert not torch.allclose(rows[0][1] / rows[0][1].std(), rows[1][1] / rows[1][1].std())  # a fresh draw per level


def test_blur_mixes_each_pixel_with_its_replicate_padded_3x3_mean_per_channel() -> None:
    """A lone pixel in a corner (channel 0: replicate padding counts it 4 / 9 at the corner) and in the middle
    (channel 1): the 3x3 means written out by hand, channels kept apart."""
    x = torch.zeros(1, 2, 5, 5)
    x[0, 0, 0, 0] = x[0, 1, 2, 2] = 1.0
    mean = torch.zeros(1, 2, 5, 5)
    mean[0, 0, :2, :2] = torch.tensor([[4.0, 2.0], [2.0, 1.0]]) / 9
    mean[0, 1, 1:4, 1:4] = 1 / 9
    blurs = fs.perturbations(x, seed=0)[len(DBS) : len(DBS) + len(BLURS)]
    for (label, blurred), a in zip(blurs, BLURS, strict=True):
        assert label == f"blur: {1 - a:.2f} x + {a:.2f} x 3x3 mean"
        torch.testing.assert_close(blurred, (1 - a) * x + a * mean)


def test_offset_is_added_and_clamped_to_the_data_range() -> None:
    """x + b, with values pushed past 1 held at 1."""
    x = torch.tensor([-1.0, 0.0, 0.9, 0.97, 0.99, 1.0]).reshape(1, 1, 2, 3)
    offsets = fs.perturbations(x, seed=0)[-len(OFFSETS) :]
    for (label, shifted), b in zip(offsets, OFFSETS, strict=True):
        assert label == f"offset +{b}"
        expected = [min(v + b, 1.0) for v in (-1.0, 0.0, 0.9, 0.97, 0.99, 1.0)]
        torch.testing.assert_close(shifted.flatten(), torch.tensor(expected))


def is_by_hand(logits: torch.Tensor, seed: int, splits: int) -> float:
    """exp(E KL(p(y|x) || p(y))) per split of the shuffle torchmetrics draws for the seed, averaged."""
    torch.manual_seed(seed)
    logits = logits.double()[torch.randperm(len(logits))]
    scores = []
    for chunk in logits.chunk(splits):
        p, log_p = chunk.softmax(1), chunk.log_softmax(1)
        scores.append(math.exp((p * (log_p - p.mean(0, keepdim=True).log())).sum(1).mean().item()))
    return sum(scores) / splits


def test_table_against_fid_is_and_psnr_by_hand(tmp_path: Path, monkeypatch, capsys) -> None:
    """Every row of the table: classifier-FID (a Frechet distance by hand on the classifier's features against a
    folder of 150 training images), its ratio to the teacher's, IS by hand and the mean per-image PSNR
    10 log10(2² / MSE) of the perturbed samples against the shipped teacher's DDIM-4 samples from seeded noise."""
    real = load_mnist_split(0)["train"][0][:150]
    codes = ((real + 1) * 127.5).round().to(torch.uint8)  # MNIST's values are k / 127.5 - 1: a PNG holds them exactly
    for i, img in enumerate(codes):
        Image.fromarray(img[0].numpy()).save(tmp_path / f"{i:03d}.png")
    n, steps, seed = 30, 4, 2
    overrides = [
        "model.data.name=image_folder", f"+model.data.path={tmp_path}",
        "+model.data.size=28", "+model.data.channels=1", f"eval.n_samples={n}", f"eval.batch_size={n}",
        f"model.num_inference_steps={steps}", "eval.is_splits=2", f"seed={seed}",
    ]  # fmt: skip
    out_file = tmp_path / "table.md"
    monkeypatch.setattr(sys, "argv", ["fid_sensitivity.py", *overrides, "--out", str(out_file)])
    fs.main()
    printed = capsys.readouterr().out
    assert out_file.read_text() == printed[printed.index("Classifier-FID of") :]
    assert f"teacher's {n} DDIM-{steps} samples (seed {seed})" in printed
    rows = re.findall(r"^\| (.+?) \| (inf|[\d.]+) \| ([\d.]+) \| ([\d.]+)x \| ([\d.]+) \|$", printed, flags=re.M)

    teacher, scheduler = load_teacher(TEACHER)
    samples = ddim_sample(teacher, scheduler, make_noise(n, (1, 28, 28), seed), steps, batch_size=n, progress=False)
    clf = MNISTClassifier.load(CLASSIFIER)
    with torch.no_grad():
        f_r = clf.features(codes.float() / 127.5 - 1).double().numpy()
        feats = lambda x: clf.features(x).double().numpy()
        expected = [("teacher (FP)", math.inf, frechet_by_hand(f_r, feats(samples)), is_by_hand(clf(samples), seed, 2))]
        for label, x in fs.perturbations(samples, seed):
            mse = (x.double() - samples.double()).pow(2).flatten(1).mean(1)
            db = (10 * torch.log10(4 / mse)).mean().item()
            expected.append((label, db, frechet_by_hand(f_r, feats(x)), is_by_hand(clf(x), seed, 2)))
    assert [r[0] for r in rows] == [e[0] for e in expected]
    assert len({round(e[2], 2) for e in expected}) == len(expected)  # every error moves FID: no row scores another's
    fp = expected[0][2]
    for (_, db, fid, ratio, isc), (label, db_ref, fid_ref, is_ref) in zip(rows, expected, strict=True):
        assert float(db) == pytest.approx(db_ref, abs=0.006), label
        assert float(fid) == pytest.approx(fid_ref, rel=1e-3, abs=0.006), label
        assert float(ratio) == pytest.approx(fid_ref / fp, rel=1e-3, abs=0.006), label
        assert float(isc) == pytest.approx(is_ref, rel=1e-4, abs=0.006), label


def test_pixel_noise_is_independent_of_the_samplers_starting_noise() -> None:
    """The same seed draws the samples' x_T (make_noise): the added noise must not be a multiple of it. Over 39,200
    values the correlation of independent draws is within a few 1 / sqrt(n) = 0.005 of 0."""
    x, x_T = torch.zeros(50, 1, 28, 28), make_noise(50, (1, 28, 28), 0)
    for _, noisy in fs.perturbations(x, seed=0)[: len(DBS)]:
        corr = torch.corrcoef(torch.stack([noisy.flatten(), x_T.flatten()]))[0, 1].item()
        assert abs(corr) < 0.03, corr
