"""Where dq finds its configs and shipped assets, from an editable checkout or an installed wheel."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from dq.errors import ConfigError, MissingFileError

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
LOCK_NAME = ".dq.lock"  # in a run directory while a dq process writes it


def conf_dir() -> str:
    """Absolute path of the Hydra config tree: `dq/conf` in a wheel, top-level `conf/` in a checkout."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parent / "conf"):
        if candidate.is_dir():
            return str(candidate)
    raise MissingFileError(f"dq's Hydra configs were not found next to {PACKAGE_DIR}; reinstall dq.")


def asset(name: str) -> str:
    """Absolute path of a shipped asset (e.g. `ddpm_mnist`, `mnist_classifier`)."""
    return str(ASSETS_DIR / name)


def cache_dir() -> Path:
    """Cache shared between runs (reference statistics, calibration sets): `$DQ_CACHE` or `~/.cache/dq` (also when
    `DQ_CACHE` is set empty, which would otherwise mean the working directory)."""
    return Path(os.environ.get("DQ_CACHE") or Path.home() / ".cache" / "dq").expanduser()


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold `<run_dir>/.dq.lock` (`LOCK_NAME`) while a run writes, so two processes never write one run directory.

    Raises:
        ConfigError: another process holds the lock (names the directory and what to do).
    """
    lock = FileLock(Path(run_dir) / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(
            f"run_dir={run_dir} is in use by another running dq process (lock {lock.lock_file}); wait for it "
            "to finish, or pass another hydra.run.dir=... (resuming a finished or killed run into it is fine)"
        ) from None
    try:
        yield
    finally:
        lock.release()
