"""dq.utils.io: atomic writes and the tolerant JSON reader."""

from pathlib import Path

import pytest

from dq.utils.io import atomic_write, atomic_write_text, read_json_object, write_cache


def test_read_json_object_gives_the_object_or_nothing(tmp_path: Path) -> None:
    (tmp_path / "ok.json").write_text('{"method": {"bits": "w4a8"}}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "torn.json").write_text('{"method": ')
    assert read_json_object(tmp_path / "ok.json") == {"method": {"bits": "w4a8"}}
    for name in ("list.json", "torn.json", "missing.json"):
        assert read_json_object(tmp_path / name) == {}
    assert read_json_object(tmp_path) == {}  # a directory: unreadable as a file


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    atomic_write_text(path, "old")

    def crash(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, crash)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_cache_that_cannot_be_written_warns_and_carries_on(tmp_path: Path) -> None:
    blocker = tmp_path / "cache"  # DQ_CACHE set to a file: every directory under it fails (root ignores chmod)
    blocker.write_text("not a directory")
    path = blocker / "ref_stats" / "x.safetensors"
    with pytest.warns(UserWarning, match=r"reference statistics cache '.*x\.safetensors'.*continuing uncached"):
        assert write_cache(path, lambda tmp: Path(tmp).write_text("data"), "reference statistics cache") is False
    assert blocker.read_text() == "not a directory"
    assert write_cache(tmp_path / "ok" / "x", lambda tmp: Path(tmp).write_text("data"), "cache") is True
    assert (tmp_path / "ok" / "x").read_text() == "data"


def test_an_atomic_write_reaches_the_disk_before_and_after_its_rename(tmp_path: Path, monkeypatch) -> None:
    """The new file's data is flushed before the rename and the directory entry after it: without it a power loss
    could leave an empty checkpoint under the final name."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_text(tmp_path / "last.json", "{}")
    (kind, tmp), *rest = events
    assert kind == "fsync" and Path(tmp).name.startswith(".last.json.")
    assert rest == [("replace", str(tmp_path / "last.json")), ("fsync", str(tmp_path))]
