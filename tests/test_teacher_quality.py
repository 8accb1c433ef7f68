"""experiments/teacher_quality.py: its report on the shipped teacher against hand loops over the samples it drew,
the image sets each score was given, and a sample grid tiled by hand."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSIFIER, frechet_by_hand, load_script
from PIL import Image

from dq.data import load_mnist_split
from dq.metrics import MNISTClassifier, SampleMetrics
from dq.models import make_noise

pytestmark = pytest.mark.usefixtures("one_thread")


def test_report_against_hand_loops(tmp_path: Path, monkeypatch, capsys) -> None:
    """DDIM samples from make_noise(max N, seed) at --steps; the confident share (max softmax >= 0.9) and the class
    histogram by a loop over the samples; FID against the training split for the first N samples and the holdout
    (1,000 and its first 500; that one's Frechet distance by hand); throughput = max N / the sampling seconds; the
    figure's tiles are the samples."""
    tq = load_script("teacher_quality")
    sampled: dict = {}
    real_sample = tq.ddim_sample

    def timed_sample(*args: object, **kwargs: object) -> torch.Tensor:
        start = time.perf_counter()
        out = real_sample(*args, **kwargs)
        sampled.update(noise=args[2], steps=args[3], samples=out, seconds=time.perf_counter() - start)
        return out

    references: list[torch.Tensor] = []
    scored: list[tuple[torch.Tensor, int, dict]] = []

    class SpyMetrics(SampleMetrics):
        def set_reference(self, images: torch.Tensor, batch_size: int = 500) -> None:
            references.append(images)
            super().set_reference(images, batch_size)

        def score(self, images: torch.Tensor, seed: int = 0, batch_size: int = 500) -> dict[str, float]:
            result = super().score(images, seed, batch_size)
            scored.append((images, seed, result))
            return result

    monkeypatch.setattr(tq, "ddim_sample", timed_sample)
    monkeypatch.setattr(tq, "SampleMetrics", SpyMetrics)
    figure, seed, steps = tmp_path / "grid.png", 3, 4
    argv = ["--n", "8", "20", "--steps", str(steps), "--seed", str(seed), "--figure", str(figure)]
    monkeypatch.setattr(sys, "argv", ["teacher_quality.py", *argv])
    tq.main()
    report = json.loads(capsys.readouterr().out)

    torch.testing.assert_close(sampled["noise"], make_noise(20, (1, 28, 28), seed), rtol=0, atol=0)
    assert sampled["steps"] == steps == report["steps"] and report["threads"] == torch.get_num_threads() == 1
    samples = sampled["samples"]
    assert report["images_per_s"] == pytest.approx(20 / sampled["seconds"], rel=0.2)  # the same timed call

    clf = MNISTClassifier.load(CLASSIFIER)
    confident, counts = 0, [0] * 10
    with torch.no_grad():
        for x in samples:
            p = clf(x[None]).softmax(1)[0]
            confident += int(p.max() >= 0.9)
            counts[int(p.argmax())] += 1
    assert report["confident_share@1000"] == pytest.approx(confident / 20)
    assert report["class_share@1000"] == pytest.approx([c / 20 for c in counts])
    assert 0 < confident < 20 and max(counts) < 20  # the check sees more than one answer

    split = load_mnist_split(0)
    assert len(references) == 1 and torch.equal(references[0], split["train"][0])
    holdout = split["holdout"][0]
    expected = {"teacher@8": samples[:8], "teacher@20": samples, "holdout_vs_train@1000": holdout}
    expected["holdout_vs_train@500"] = holdout[:500]
    assert len(scored) == len(expected)
    for (key, images), (got, got_seed, result) in zip(expected.items(), scored, strict=True):
        assert torch.equal(got, images) and got_seed == seed, key
        assert report[key] == pytest.approx(result), key
    assert report["holdout_vs_train@1000"]["fid"] < report["holdout_vs_train@500"]["fid"] < report["teacher@20"]["fid"]
    with torch.no_grad():  # the metric noise floor BENCHMARKS quotes, by hand
        f_r, f_g = (clf.features(x).double().numpy() for x in (split["train"][0], holdout[:500]))
    assert report["holdout_vs_train@500"]["fid"] == pytest.approx(frechet_by_hand(f_r, f_g), rel=1e-4)

    grid = np.asarray(Image.open(figure))[::2, ::2]  # saved at scale 2
    codes = ((samples[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    assert grid.shape == (2 + 2 * 30, 2 + 10 * 30)  # 10 per row, 28 pixels + a 2-pixel white border each
    for i in range(20):
        r, q = divmod(i, 10)
        np.testing.assert_array_equal(grid[2 + 30 * r : 30 + 30 * r, 2 + 30 * q : 30 + 30 * q], codes[i])
