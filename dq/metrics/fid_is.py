"""FID and IS through torchmetrics, on the shipped classifier's features or on Inception-v3.

"classifier FID/IS" (the MNIST default) uses the small classifier's penultimate features for FID and its logits for
IS: numbers comparable across dq runs, not with published Inception FID. `features="inception"` uses the standard
torchmetrics Inception metrics from a local weights file (the optional `inception` extra).
All images passed in are float tensors in [-1, 1], [N, C, H, W].
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.functional.audio import signal_noise_ratio
from torchmetrics.image import PeakSignalNoiseRatio
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from dq.errors import ConfigError, MissingFileError
from dq.metrics.classifier import MNISTClassifier
from dq.utils.io import write_cache

CLASSIFIER_PATH_UNSET = (
    "eval.classifier_path is not set: eval.features=classifier scores with the shipped classifier, the default of "
    "eval=fid_is (leave the setting out to use it)"
)

FEATURES = ("classifier", "inception")
_REF_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


class _Given(nn.Module):
    """The feature extractor torchmetrics' FID / IS call, for features computed beforehand: one forward of the network
    gives both FID's features and IS's logits (`SampleMetrics._extract`), and the metrics take them as they are."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # torchmetrics reads it instead of a dummy forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


INCEPTION_OUTPUTS = ("2048", "logits_unbiased")  # FID's pool features and IS's logits


def inception_net(weights_path: str) -> nn.Module:
    """torch-fidelity's Inception-v3 (its port of the TF graph behind published FID / IS) from a local weights file:
    uint8 images [N, 3, H, W] -> (the 2048-d pool features FID uses, the 1008 logits IS uses), in one forward."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:  # TF1's bilinear resize to 299 inside, as for the published numbers
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", list(INCEPTION_OUTPUTS), feature_extractor_weights_path=weights_path
        )
    except (RuntimeError, pickle.UnpicklingError, EOFError, TypeError, ValueError) as e:  # torch.load, load_state_dict
        raise ConfigError(
            f"eval.inception_weights_path='{weights_path}' is not torch-fidelity's Inception weights "
            f"(pt_inception-2015-12-05-6726825d.pth): {str(e).splitlines()[0][:300]}"
        ) from e
    return net.eval().requires_grad_(False)


def _inception(weights_path: str | None) -> nn.Module:
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError(
            "eval.features=inception needs the optional extra: install a torchvision matching your torch, then "
            "`pip install 'dq[inception]'` (torch-fidelity). The MNIST default uses eval.features=classifier."
        )
    if not weights_path or not Path(weights_path).expanduser().is_file():
        raise MissingFileError(
            f"eval.inception_weights_path='{weights_path}' is not a file. Point it at a local copy of the "
            "torch-fidelity Inception weights (pt_inception-2015-12-05-6726825d.pth); dq never downloads them."
        )
    return inception_net(str(Path(weights_path).expanduser()))


class SampleMetrics:
    """FID against reference statistics (cached on disk) and IS of generated samples.

    Args:
        features: "classifier" or "inception".
        classifier_path: directory of the shipped MNIST classifier (for `features="classifier"`).
        inception_weights_path: local Inception weights file (for `features="inception"`).
        is_splits: number of splits of the Inception Score.
        device: where feature extraction runs.
    """

    def __init__(
        self,
        features: str = "classifier",
        classifier_path: str | None = None,
        inception_weights_path: str | None = None,
        is_splits: int = 10,
        device: str | torch.device = "cpu",
    ) -> None:
        if features not in FEATURES:
            raise ValueError(f"eval.features='{features}' is not one of {list(FEATURES)}.")
        self.features, self.device = features, torch.device(device)
        if features == "classifier":
            if classifier_path is None:
                raise ConfigError(CLASSIFIER_PATH_UNSET)
            clf = MNISTClassifier.load(classifier_path)
            self.net, dims = clf, (clf.config["feat_dim"], clf.config["n_classes"])
            self.fingerprint = _file_digest(Path(classifier_path) / "model.safetensors")
        else:
            self.net, dims = _inception(inception_weights_path), (2048, 1008)
            self.fingerprint = _file_digest(Path(inception_weights_path).expanduser())
        self.net.to(self.device)
        # scored in one process (trainer=ddp gathers the samples first): no state is synced across processes
        self.fid = FrechetInceptionDistance(
            feature=_Given(dims[0]), reset_real_features=False, sync_on_compute=False
        ).to(self.device)
        with warnings.catch_warnings():  # "will save all extracted features": one row of logits per sample, known
            warnings.filterwarnings("ignore", ".*will save all extracted features in buffer.*")
            self.isc = InceptionScore(feature=_Given(dims[1]), splits=is_splits, sync_on_compute=False).to(self.device)

    def _extract(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FID's features and IS's logits of images in [-1, 1], from one forward of the network."""
        if self.features == "classifier":
            return self.net.features_and_logits(images.to(self.device))
        # rounded to uint8 here: torchmetrics' normalize=True would truncate
        return self.net(to_uint8_rgb(images).to(self.device))

    @torch.no_grad()
    def set_reference(self, images: torch.Tensor, batch_size: int = 500) -> None:
        """Accumulate the real-image statistics of FID from `images`."""
        self.fid.reset_real_features = True
        self.fid.reset()
        self.fid.reset_real_features = False
        for chunk in images.split(batch_size):
            self.fid.update(self._extract(chunk)[0], real=True)

    def reference_key(self, dataset: str) -> str:
        """Cache key of `dataset`'s reference statistics under this feature extractor."""
        blob = json.dumps({"dataset": dataset, "features": self.features, "extractor": self.fingerprint})
        return f"{dataset}-{self.features}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def load_or_set_reference(self, cache_root: str | Path, dataset: str, load_images: callable) -> bool:
        """Use cached reference statistics for `dataset` if present and valid, else compute and cache them.

        Returns True when the cache was used. A corrupt or mismatched cache file is reported and rebuilt.
        """
        images = None
        path = Path(cache_root) / "ref_stats" / f"{self.reference_key(dataset)}.safetensors"
        if path.is_file():
            try:
                states = load_file(str(path))
                if set(states) != set(_REF_STATES) or not all(torch.isfinite(v).all() for v in states.values()):
                    raise ValueError("unexpected or non-finite entries")
                for k in _REF_STATES:
                    expected = getattr(self.fid, k)
                    if states[k].shape != expected.shape:
                        raise ValueError(f"{k} has shape {tuple(states[k].shape)}, expected {tuple(expected.shape)}")
                    setattr(self.fid, k, states[k].to(device=self.device, dtype=expected.dtype))
                return True
            except Exception as e:  # corrupt cache: never use it, rebuild
                warnings.warn(f"Reference statistics cache '{path}' is unusable ({e}); recomputing it.", stacklevel=2)
        images = load_images()
        self.set_reference(images)
        states = {k: getattr(self.fid, k).detach().cpu().contiguous() for k in _REF_STATES}
        write_cache(path, lambda tmp: save_file(states, tmp), "reference statistics cache")
        return False

    @torch.no_grad()
    def score(self, images: torch.Tensor, seed: int = 0, batch_size: int = 500) -> dict[str, float]:
        """FID against the reference and IS (mean, std over splits) of `images`; deterministic for a seed."""
        if int(self.fid.real_features_num_samples) < 2:
            raise RuntimeError("SampleMetrics.score() needs reference statistics: call set_reference() first.")
        if bad := non_finite_count(images):  # NaN reaches LAPACK's eigen-solver in FID: a segfault, not an error
            raise ValueError(f"{bad} of {len(images)} images hold NaN or infinite values: they cannot be scored.")
        self.fid.reset()  # keeps the real statistics (reset_real_features=False)
        self.isc.reset()
        for chunk in images.split(batch_size):
            features, logits = self._extract(chunk)
            self.fid.update(features, real=False)
            self.isc.update(logits)
        fid = float(self.fid.compute())
        with torch.random.fork_rng(devices=[]):  # IS shuffles before splitting, with the CPU generator
            torch.default_generator.manual_seed(seed)  # that one alone: torch.manual_seed reseeds CUDA's for good
            is_mean, is_std = (float(v) for v in self.isc.compute())
        # torchmetrics returns the splits' sample std (n - 1); the IS literature (Salimans et al.'s code,
        # torch-fidelity) reports the population std (n): rescale
        splits = int(self.isc.splits)
        is_std *= math.sqrt((splits - 1) / splits) if splits > 1 else 0.0
        return {"fid": fid, "is": is_mean, "is_std": is_std}


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] [N, C, H, W] as the uint8 RGB the Inception metrics take: rounded to the nearest of 256
    levels, as a saved PNG holds them (so `k / 127.5 - 1` comes back as `k`); one channel repeated to three."""
    x = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def non_finite_count(images: torch.Tensor) -> int:
    """How many of `images` [N, ...] hold a NaN or infinite value."""
    return int((~torch.isfinite(images.reshape(len(images), -1))).any(1).sum())


PSNR_CAP_DB = 100.0  # an image equal to its reference (MSE 0, PSNR infinite) counts at this


def psnr(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of `samples` against `reference`, images in [-1, 1] (data range 2); each image's
    PSNR capped at `PSNR_CAP_DB`, so that one bit-identical sample does not make the mean infinite."""
    metric = PeakSignalNoiseRatio(data_range=2.0, reduction="none", dim=(1, 2, 3))
    return float(metric(samples.double(), reference.double()).clamp(max=PSNR_CAP_DB).mean())


def sqnr_db(out: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio (dB) of `out` against `reference` over the whole tensor:
    `10 log10(sum ref² / sum (out - ref)²)` (torchmetrics' signal-to-noise ratio on the flattened tensors)."""
    return float(signal_noise_ratio(out.flatten().double(), reference.flatten().double()))


def _file_digest(path: Path) -> str:
    if not path.is_file():
        raise MissingFileError(f"Feature-extractor weights '{path}' not found.")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
