"""Shared fixtures: composed Hydra configs, a tiny teacher directory, and an isolated cache."""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from dq.config import register_resolvers
from dq.paths import conf_dir

register_resolvers()
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "dq" / "assets" / "ddpm_mnist"
CLASSIFIER = REPO / "dq" / "assets" / "mnist_classifier"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DQ_CACHE", str(tmp_path_factory.getbasetemp() / "dq_cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def load_script(name: str) -> ModuleType:
    """`experiments/<name>.py` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_script_main(script: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                    *argv: str | Path) -> str:  # fmt: skip
    """`script.main()` (a `load_script` module) with `argv` as its command line; returns what it printed."""
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *map(str, argv)])
    script.main()
    return capsys.readouterr().out


def psnr_by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of 10 log10(2² / MSE) (images in [-1, 1]), each capped at 100 dB (MSE 0 counts as 100)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1).tolist()
    return sum(min(10 * math.log10(4 / e), 100.0) if e > 0 else 100.0 for e in mse) / len(mse)


def frechet_by_hand(f_r: np.ndarray, f_g: np.ndarray) -> float:
    """The Frechet distance of two feature sets by hand in float64: |mu_r - mu_g|² + tr S_r + tr S_g
    - 2 tr (S_r^1/2 S_g S_r^1/2)^1/2 (sample covariances; both roots of symmetric PSD matrices, so a singular S_r, from
    dead ReLU features, is fine)."""
    s_r, s_g = np.cov(f_r, rowvar=False), np.cov(f_g, rowvar=False)
    w, v = np.linalg.eigh(s_r)
    r_half = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T  # S_r^1/2
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh(r_half @ s_g @ r_half), 0, None)).sum()
    return float(((f_r.mean(0) - f_g.mean(0)) ** 2).sum() + np.trace(s_r) + np.trace(s_g) - 2 * tr_root)


def compose_cfg(config_name: str, overrides: list[str], run_dir: Path) -> DictConfig:
    """Compose a real dq config like the CLI does, with `run_dir` pointed at a test directory."""
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


def tiny_unet_config() -> dict:
    return dict(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
    )  # fmt: skip


def tiny_unet(seed: int = 0, **overrides: object) -> UNet2DModel:
    """A seeded random tiny UNet2DModel (attention at the 4x4 level), in eval mode; `overrides` change the config."""
    torch.manual_seed(seed)
    return UNet2DModel(**(tiny_unet_config() | overrides)).eval()


def tiny_cond_unet(seed: int = 0, **overrides: object) -> UNet2DConditionModel:
    """A seeded random tiny UNet2DConditionModel with cross-attention (text dim 12), in eval mode."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    return UNet2DConditionModel(**(config | overrides)).eval()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is faster than two fighting over a busy CPU (`pytestmark` opts in)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher() -> UNet2DModel:
    """A frozen random tiny teacher, shared by a module's tests."""
    torch.manual_seed(0)
    return UNet2DModel(**tiny_unet_config()).eval().requires_grad_(False)


@pytest.fixture
def tiny_teacher_dir(tmp_path: Path) -> Path:
    """A random tiny diffusers teacher saved like a pipeline directory (unet/ + scheduler/)."""
    torch.manual_seed(0)
    UNet2DModel(**tiny_unet_config()).save_pretrained(tmp_path / "tiny" / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "tiny" / "scheduler")
    return tmp_path / "tiny"
