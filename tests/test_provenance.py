"""dq.utils.provenance: results.json says which code, torch and hardware made a run's numbers."""

import subprocess
from pathlib import Path

import torch
from conftest import REPO

import dq
from dq.utils import provenance as provenance_module
from dq.utils.provenance import code_at_start, git_state, provenance


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_the_checkout_dq_runs_from_is_named_by_its_commit_and_whether_it_differs():
    state = git_state()
    assert state == {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain"))}


def test_a_changed_file_makes_the_checkout_dirty(tmp_path):
    repo = tmp_path / "repo"
    (repo / "dq").mkdir(parents=True)
    (repo / "dq" / "__init__.py").write_text("x = 1\n")
    _git("init", "-q", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "empty", cwd=repo)
    _git("add", ".", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "dq", cwd=repo)
    assert git_state(repo / "dq") == {"commit": _git("rev-parse", "HEAD", cwd=repo), "dirty": False}
    (repo / "dq" / "__init__.py").write_text("x = 2\n")
    assert git_state(repo / "dq")["dirty"] is True


def test_a_copy_outside_a_checkout_or_inside_another_repository_has_no_commit(tmp_path):
    assert git_state(tmp_path / "site-packages" / "dq") is None  # not a git repository at all
    venv_copy = tmp_path / "venv" / "lib" / "site-packages" / "dq"  # installed into a venv inside another repo
    venv_copy.mkdir(parents=True)
    _git("init", "-q", cwd=tmp_path)
    assert git_state(venv_copy) is None


def test_provenance_names_versions_instruction_set_threads_and_device():
    record = provenance("cpu")
    assert record["dq"] == dq.__version__ and record["torch"] == torch.__version__
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and record["cpu_capability"]
    assert record["threads"] == torch.get_num_threads() and record["device"] == "cpu"
    assert record["git"] == git_state()


def test_the_git_state_is_the_one_the_run_started_with(monkeypatch):
    """A session commits while a batch of runs trains: each run's record names the code it imported, not the commit
    that was current when its results.json was written."""
    states = iter([{"commit": "a" * 40, "dirty": False}, {"commit": "b" * 40, "dirty": True}])
    monkeypatch.setattr(provenance_module, "git_state", lambda: next(states))
    code_at_start.cache_clear()
    try:
        assert code_at_start()["commit"] == "a" * 40  # dq-train / dq-eval call it first thing
        assert provenance("cpu")["git"] == {"commit": "a" * 40, "dirty": False}  # later: still the start's
    finally:
        code_at_start.cache_clear()
