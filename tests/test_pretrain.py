import json

from conftest import compose_cfg
from safetensors.torch import load_file

from dq.metrics import MNISTClassifier
from dq.models import load_teacher
from dq.pretrain import pretrain


def test_pretrain_teacher_writes_loadable_model_and_card(tmp_path):
    over = [
        "pretrain=teacher", "logger=csv", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        "pretrain.trainer.max_steps=3", "pretrain.module.unet.block_out_channels=[8,8,16]",
        "pretrain.module.unet.norm_num_groups=4", "pretrain.module.unet.attention_head_dim=8",
        f"install_dir={tmp_path / 'installed'}",
    ]  # fmt: skip
    metrics = pretrain(compose_cfg("pretrain", over, tmp_path / "run"))
    card = json.loads((tmp_path / "run" / "ddpm_mnist" / "model_card.json").read_text())
    assert card["steps"] == 3 and card["seed"] == 0 and card["command"].startswith("dq-pretrain")
    assert card["hardware"].startswith("CPU") and "torch" in card["hardware"]
    assert card["metrics"]["train_loss"] == metrics["train_loss"] > 0
    unet, scheduler = load_teacher(tmp_path / "installed")
    assert unet.config.block_out_channels == [8, 8, 16]
    assert "train/loss" in (tmp_path / "run" / "csv" / "metrics.csv").read_text()


def test_pretrain_classifier_reports_holdout_accuracy(tmp_path):
    over = ["pretrain=classifier", "logger=none", "trainer.enable_progress_bar=false",
            "pretrain.trainer.max_epochs=1", "+pretrain.trainer.limit_train_batches=5"]  # fmt: skip
    metrics = pretrain(compose_cfg("pretrain", over, tmp_path / "run"))
    assert 0.0 <= metrics["holdout_accuracy"] <= 1.0
    saved = tmp_path / "run" / "mnist_classifier"
    assert set(load_file(str(saved / "model.safetensors"))) == set(MNISTClassifier().state_dict())
    MNISTClassifier.load(saved)
