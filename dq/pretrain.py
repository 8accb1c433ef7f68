"""`dq-pretrain`: train the embedded teacher (`pretrain=teacher`) or the feature classifier (`pretrain=classifier`).

Everything goes into the run directory; `install_dir=dq/assets/<name>` also copies the result there (that is how
the shipped assets were made; their model cards record the exact command).
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from dq.config import build_loggers, cli_errors, register_resolvers
from dq.errors import ConfigError
from dq.paths import conf_dir
from dq.utils.fit import known_fit_warnings
from dq.utils.io import atomic_write_text, read_json_object
from dq.utils.progress import progress_bar
from dq.utils.signals import signal_exit_status
from dq.validation import check_pretrain

log = logging.getLogger("dq.pretrain")  # not __name__, which is __main__ under python -m

register_resolvers()


def pretrain(cfg: DictConfig) -> dict[str, float]:
    """Train, export to `<run_dir>/<name>` with a model card, optionally install; returns the card's metrics."""
    check_pretrain(cfg)
    if cfg.install_dir:
        check_install_dir(Path(cfg.install_dir).resolve(), cfg.pretrain.name)  # before training, not after
    pl.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    try:
        module = hydra.utils.instantiate(cfg.pretrain.module)
    except Exception as e:  # e.g. a head dim above a block's width, which diffusers builds and then divides by 0
        cause = e.__cause__ or e  # Hydra wraps the builder's error in an InstantiationException
        raise ConfigError(
            f"pretrain.module: the model cannot be built from these settings ({cause}); check pretrain.module.unet "
            "(e.g. attention_head_dim must divide the width of each attention block in block_out_channels)."
        ) from e
    datamodule = hydra.utils.instantiate(cfg.pretrain.data)
    trainer_kwargs = {**OmegaConf.to_container(cfg.trainer), **OmegaConf.to_container(cfg.pretrain.trainer)}
    trainer = pl.Trainer(
        **trainer_kwargs, logger=build_loggers(cfg.logger), default_root_dir=str(run_dir), enable_checkpointing=False,
        callbacks=progress_bar(trainer_kwargs.get("enable_progress_bar", True)),
    )  # fmt: skip
    start = time.time()
    try:
        # the data module offers the holdout set, which only the classifier validates on
        with known_fit_warnings(".*val_dataloader.* but have no .*validation_step.*"), signal_exit_status(trainer):
            trainer.fit(module, datamodule=datamodule)
    except SystemExit:  # Lightning ends the process after Ctrl-C or SIGTERM, once it has shut down
        log.warning(f"training stopped at step {trainer.global_step}: nothing was exported; re-run the command")
        raise
    wall_s = time.time() - start

    out = run_dir / cfg.pretrain.name
    metrics = {"train_loss": float(trainer.callback_metrics.get("train/loss", float("nan")))}
    metrics |= module.export(out)
    card = {
        "name": cfg.pretrain.name,
        "command": shlex.join(["dq-pretrain", *sys.argv[1:]]),
        "seed": cfg.seed,
        "steps": trainer.global_step,
        "wall_time_s": round(wall_s, 1),
        "hardware": _hardware(trainer),
        "metrics": metrics,
        "config": OmegaConf.to_container(cfg.pretrain, resolve=True),
    }
    atomic_write_text(out / "model_card.json", json.dumps(card, indent=2))
    atomic_write_text(out / "README.md", _card_markdown(card))
    if cfg.install_dir:
        install(out, Path(cfg.install_dir), cfg.pretrain.name)
        log.info(f"installed {out} -> {cfg.install_dir}")
    log.info(json.dumps({k: card[k] for k in ("name", "steps", "wall_time_s", "metrics")}, indent=2))
    return metrics


def check_install_dir(dest: Path, name: str) -> None:
    """Refuse an `install_dir` that holds anything but an earlier copy of asset `name` (it would be replaced)."""
    if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
        return
    card = dest / "model_card.json"
    if read_json_object(card).get("name") != name:
        raise ConfigError(
            f"install_dir={dest} is not empty and holds no earlier '{name}' asset (no {card.name} naming it): "
            f"installing would delete what is there. Pass the asset's own folder, e.g. install_dir=dq/assets/{name}, "
            "or an empty or new one."
        )


def install(src: Path, dest: Path, name: str) -> None:
    """Copy the exported asset `src` to `dest`, replacing an earlier copy of the same asset only once the new one is
    complete (copied beside it, then swapped in by renames). A symbolic link is followed: its target is replaced."""
    dest = dest.resolve()
    check_install_dir(dest, name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.installing")
    old = dest.with_name(f".{dest.name}.replaced")
    for leftover in (staging, old):  # from an install that died half-way
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(src, staging)
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def _hardware(trainer: pl.Trainer) -> str:
    """Where the asset was trained, for the model card (wall time means little without it)."""
    root = trainer.strategy.root_device
    where = torch.cuda.get_device_name(root) if root.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}"


def _card_markdown(card: dict) -> str:
    return (
        f"# {card['name']}\n\nMade by dq's own code with:\n\n    {card['command']}\n\n"
        f"seed {card['seed']}, {card['steps']} optimizer steps, {card['wall_time_s']} s wall time"
        f" on {card.get('hardware', 'unrecorded hardware')}.\n\n"
        f"Metrics: `{json.dumps(card['metrics'])}`\n\nFull config: `model_card.json`.\n"
    )


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="pretrain")
def main(cfg: DictConfig) -> None:
    with cli_errors("dq-pretrain"):
        pretrain(cfg)


if __name__ == "__main__":  # python -m dq.pretrain
    # run from the importable dq.pretrain: a Hydra launcher that pickles the task function (submitit) pickles it by
    # value, and its globals then resolve to dq.pretrain by reference; as __main__'s they would be pickled (and fail)
    from dq.pretrain import main as importable_main

    sys.exit(importable_main())
