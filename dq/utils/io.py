"""Atomic file writes (a crash mid-write never leaves a half-written file under the final name), and a tolerant
JSON reader for the files dq writes."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, flush it to disk, then rename it into place (so a
    power loss after the rename finds the whole new file, not an empty one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (the rename) to disk where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def remove_unfinished_writes(directory: str | Path) -> list[Path]:
    """Remove the temporary files `atomic_write` left in `directory` when a process was killed mid-write (a
    checkpoint's: the whole model's size each); returns them. Call it only where no other process writes."""
    left = sorted(Path(directory).glob(".*.tmp"))
    for path in left:
        path.unlink(missing_ok=True)
    return left


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_cache(
    path: str | Path, write: Callable[[str], None], what: str, category: type[Warning] = UserWarning
) -> bool:
    """`atomic_write` for a cache, which only saves time: where it cannot be written (a read-only or full `DQ_CACHE`)
    warn and go on without it rather than lose the run. True when written."""
    try:
        atomic_write(path, write)
    except OSError as e:
        warnings.warn(f"Could not write the {what} '{path}' ({e}); continuing uncached.", category, stacklevel=3)
        return False
    return True


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`; {} when the file is missing, unreadable, or holds something else."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def changed_keys(old: Any, new: Any) -> list[str]:
    """Dotted keys whose values differ between `old` (read from a JSON file) and `new` (JSON-encoded first, so
    tuples and paths compare as a file holds them); a key present in only one counts."""
    return _changed_keys(old, json.loads(json.dumps(new, default=str)), "")


def _changed_keys(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new)) for c in _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".") or "(all)"]
