import pytest
import torch
from conftest import CLASSIFIER, frechet_by_hand
from torch import nn

from dq.data import load_mnist_split
from dq.errors import ConfigError
from dq.metrics import SampleMetrics, psnr, sqnr_db
from dq.metrics.fid_is import PSNR_CAP_DB


@pytest.fixture(scope="module")
def metrics():
    m = SampleMetrics("classifier", classifier_path=str(CLASSIFIER))
    m.set_reference(load_mnist_split(0)["train"][0])
    return m


def test_classifier_accuracy_on_holdout():
    from dq.metrics import MNISTClassifier

    x, y = load_mnist_split(0)["holdout"]
    with torch.no_grad():
        acc = (MNISTClassifier.load(CLASSIFIER)(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.97


def test_fid_is_sanity(metrics):
    holdout = load_mnist_split(0)["holdout"][0]
    noise = torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real, fake = metrics.score(holdout), metrics.score(noise)
    assert real["fid"] < 25 and fake["fid"] > 50 * real["fid"]
    assert 8.5 < real["is"] <= 10.0
    assert 1.0 <= fake["is"] < 1.5


def test_fid_against_plain_frechet_distance():
    """Classifier-FID against the Frechet distance of the classifier's 128-d features computed by hand in float64."""
    from dq.metrics import MNISTClassifier

    split = load_mnist_split(0)
    real, fake = split["train"][0][:600], split["holdout"][0][:300]
    m = SampleMetrics("classifier", classifier_path=str(CLASSIFIER))
    m.set_reference(real, batch_size=250)
    with torch.no_grad():
        clf = MNISTClassifier.load(CLASSIFIER)
        f_r, f_g = clf.features(real).double().numpy(), clf.features(fake).double().numpy()
    assert f_r.shape[1] == 128
    assert m.score(fake)["fid"] == pytest.approx(frechet_by_hand(f_r, f_g), rel=1e-4)


def test_identical_seeds_identical_results(metrics, monkeypatch):
    """...and scoring leaves every generator as it found it: CUDA's were reseeded outside the CPU-only fork_rng."""
    x = load_mnist_split(0)["holdout"][0][:300]
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    before = torch.get_rng_state()
    assert metrics.score(x, seed=3) == metrics.score(x, seed=3)
    assert torch.equal(torch.get_rng_state(), before) and reseeded == []


def test_inception_score_against_plain_formula(metrics):
    """IS = exp(E_x KL(p(y|x) || p(y))) per split, mean and population std over splits (Salimans et al.'s code and
    torch-fidelity; torchmetrics' own std divides by n - 1), on the shuffle torchmetrics draws for the seed."""
    from dq.metrics import MNISTClassifier

    x = load_mnist_split(0)["holdout"][0][:300]
    with torch.no_grad():
        logits = MNISTClassifier.load(CLASSIFIER)(x).double()
    torch.manual_seed(5)
    logits = logits[torch.randperm(len(logits))]
    scores = []
    for chunk in logits.chunk(10):
        p, log_p = chunk.softmax(1), chunk.log_softmax(1)
        scores.append(torch.exp((p * (log_p - p.mean(0, keepdim=True).log())).sum(1).mean()))
    scores = torch.stack(scores)
    got = metrics.score(x, seed=5)
    assert got["is"] == pytest.approx(float(scores.mean()), rel=1e-5)
    assert got["is_std"] == pytest.approx(float(scores.std(correction=0)), rel=1e-4)
    assert got["is_std"] < float(scores.std(correction=1)) * 0.99


def test_reference_cache_reused_and_corrupt_cache_rebuilt(tmp_path):
    train = load_mnist_split(0)["train"][0][:500]
    calls = []

    def load():
        calls.append(1)
        return train

    a = SampleMetrics("classifier", classifier_path=str(CLASSIFIER))
    assert a.load_or_set_reference(tmp_path, "mnist-test", load) is False
    b = SampleMetrics("classifier", classifier_path=str(CLASSIFIER))
    assert b.load_or_set_reference(tmp_path, "mnist-test", load) is True
    assert len(calls) == 1
    x = load_mnist_split(0)["holdout"][0][:200]
    assert a.score(x) == b.score(x)

    (cache_file,) = (tmp_path / "ref_stats").iterdir()
    cache_file.write_bytes(b"\x00garbage")
    c = SampleMetrics("classifier", classifier_path=str(CLASSIFIER))
    with pytest.warns(UserWarning, match=str(cache_file.name)):
        assert c.load_or_set_reference(tmp_path, "mnist-test", load) is False
    assert len(calls) == 2 and c.score(x) == a.score(x)


def test_reference_statistics_are_computed_when_the_cache_cannot_be_written(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    train = load_mnist_split(0)["train"][0][:500]
    m = SampleMetrics("classifier", classifier_path=str(CLASSIFIER))
    with pytest.warns(UserWarning, match="continuing uncached"):
        assert m.load_or_set_reference(blocker, "mnist-test", lambda: train) is False
    fresh = SampleMetrics("classifier", classifier_path=str(CLASSIFIER))
    fresh.set_reference(train)
    x = load_mnist_split(0)["holdout"][0][:200]
    assert m.score(x) == fresh.score(x)


def test_inception_without_extra_or_weights_is_a_clear_error(tmp_path):
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    expected = "inception_weights_path" if _TORCH_FIDELITY_AVAILABLE else r"dq\[inception\]"
    with pytest.raises((ModuleNotFoundError, FileNotFoundError), match=expected):
        SampleMetrics("inception", inception_weights_path=str(tmp_path / "missing.pth"))


class _StubInception(torch.nn.Module):
    """Stands in for torch-fidelity's Inception-v3 (not installed here): takes uint8 RGB, as the real one asserts,
    returns FID's 2048 features and IS's 1008 logits as one tuple, and records what it was given."""

    def __init__(self, weights_path: str) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, 2048 + 1008)
        self.seen = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        self.seen.append(x)
        return self.proj(x.to(self.proj.weight.dtype).flatten(1) / 255).split([2048, 1008], dim=1)


def test_inception_metrics_take_rounded_uint8_through_one_forward(tmp_path, monkeypatch):
    """FID and IS both score from the local weights file, loaded once, with one forward per batch for both (each
    metric loaded and ran its own network), and see each pixel rounded to the nearest of 256 levels, so a reference
    image `k / 127.5 - 1` reaches the network as `k` (torchmetrics' normalize=True truncates: 63 of the 256 levels
    came back one lower)."""
    import dq.metrics.fid_is as fid_is

    loads = []
    monkeypatch.setattr(fid_is, "inception_net", lambda path: loads.append(path) or _StubInception(path))
    monkeypatch.setattr("torchmetrics.utilities.imports._TORCH_FIDELITY_AVAILABLE", True)
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"stub")
    m = SampleMetrics("inception", inception_weights_path=str(weights))
    levels = torch.arange(256, dtype=torch.float32)
    real = (levels.repeat(4)[: 4 * 64].reshape(4, 1, 8, 8) / 127.5 - 1).repeat(5, 1, 1, 1)  # every level, one channel
    m.set_reference(real)
    fake = (torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1).double()
    scores = m.score(fake, batch_size=8)
    assert all(torch.isfinite(torch.tensor(v)) for v in scores.values())
    assert loads == [str(weights)] and len(m.net.seen) == 1 + 3  # the reference batch, then 20 fakes in batches of 8
    fed_real = m.net.seen[0]
    assert torch.equal(fed_real[:, 0].float(), ((real[:, 0] + 1) * 127.5).round())
    assert torch.equal(fed_real[:, 0], fed_real[:, 2])
    plain = ((fake + 1) * 127.5).round().clamp(0, 255)
    assert torch.equal(torch.cat(m.net.seen[1:])[:, 1].double(), plain[:, 0])
    with torch.no_grad():  # IS's logits are the second output of the same forward
        logits = torch.cat([m.net.proj(x.float().flatten(1) / 255)[:, 2048:] for x in m.net.seen[1:]])
    assert torch.equal(torch.cat(m.isc.features), logits)


@pytest.mark.parametrize("content", ["garbage", "wrong keys"])
def test_a_weights_file_that_is_not_inceptions_is_named(content, tmp_path, monkeypatch):
    """torch-fidelity loads the file with torch.load and load_state_dict; either failing was a traceback."""
    import sys
    import types

    import dq.metrics.fid_is as fid_is

    class LoadsLikeTorchFidelity(nn.Module):  # what FeatureExtractorInceptionV3 does with the path, on a small net
        def __init__(self, name, features_list, feature_extractor_weights_path):
            super().__init__()
            assert features_list == ["2048", "logits_unbiased"]
            self.fc = nn.Linear(2, 2)
            self.load_state_dict(torch.load(feature_extractor_weights_path, weights_only=True))

    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = LoadsLikeTorchFidelity
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)
    weights = tmp_path / "weights.pth"
    if content == "garbage":
        weights.write_bytes(b"not a checkpoint")
    else:
        torch.save({"conv.weight": torch.zeros(1)}, weights)
    with pytest.raises(ConfigError, match=r"eval.inception_weights_path='.*weights.pth' is not torch-fidelity's"):
        fid_is.inception_net(str(weights))


def test_unknown_features_value():
    with pytest.raises(ValueError, match="eval.features='vgg'"):
        SampleMetrics("vgg")


def test_psnr_against_plain_formula():
    a = torch.rand(4, 1, 8, 8) * 2 - 1
    b = (a + 0.1 * torch.randn_like(a)).clamp(-1, 1)
    mse = ((a - b) ** 2).flatten(1).mean(1).double()
    expected = (10 * torch.log10(4.0 / mse)).mean().item()
    assert psnr(b, a) == pytest.approx(expected, rel=1e-6)  # torchmetrics keeps data_range in float32


def test_psnr_of_an_identical_image_is_capped_not_infinite():
    a = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    b = a.clone()
    b[1] += 0.01
    noisy = 10 * torch.log10(torch.tensor(4.0, dtype=torch.float64) / 1e-4).item()
    assert psnr(a, a) == PSNR_CAP_DB
    assert psnr(b, a) == pytest.approx((PSNR_CAP_DB + noisy) / 2, rel=1e-6)


def test_sqnr_against_plain_formula():
    ref = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    out = ref + 0.05 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    expected = 10 * torch.log10(ref.double().square().sum() / (out - ref).double().square().sum()).item()
    assert sqnr_db(out, ref) == pytest.approx(expected, rel=1e-9)
    assert 100 < sqnr_db(ref, ref) < float("inf")  # identical: large, finite


def test_nan_or_inf_images_are_refused_not_scored(metrics):
    x = load_mnist_split(0)["holdout"][0][:50].clone()
    x[3, 0, 5, 5], x[7, 0, 0, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 of 50 images hold NaN or infinite"):  # LAPACK would segfault on NaN
        metrics.score(x)


def test_random_shift_is_a_bilinear_translation_padded_with_background():
    """Output pixel (r, c) is the input's bilinear value at (r + dy, c + dx), -1 outside, (dx, dy) drawn uniform in
    [-max_shift, max_shift] from the generator."""
    import math

    from dq.metrics.classifier import random_shift

    x = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = random_shift(x, 2.0, generator=torch.Generator().manual_seed(1))
    shifts = (torch.rand(3, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 2.0  # [N, (dx, dy)]

    def at(img, r, c):
        return img[0, r, c].item() if 0 <= r < 6 and 0 <= c < 6 else -1.0

    expected = torch.empty_like(x)
    for n, (dx, dy) in enumerate(shifts.tolist()):
        for r in range(6):
            for c in range(6):
                y, xx = r + dy, c + dx
                y0, x0 = math.floor(y), math.floor(xx)
                wy, wx = y - y0, xx - x0
                expected[n, 0, r, c] = (
                    (1 - wy) * (1 - wx) * at(x[n], y0, x0) + (1 - wy) * wx * at(x[n], y0, x0 + 1)
                    + wy * (1 - wx) * at(x[n], y0 + 1, x0) + wy * wx * at(x[n], y0 + 1, x0 + 1)
                )  # fmt: skip
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(random_shift(x, 0.0), x)  # no shift: the image (to float rounding of x + 1 - 1)
