"""dq.utils.provenance: results.json says which code, torch and hardware made a run's numbers."""

import subprocess
from pathlib import Path

import torch
from conftest import REPO

import dq
from dq.utils import provenance as provenance_module
from dq.utils.provenance import code_at_start, cpu_id, git_state, provenance


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
    assert record["git"] == git_state() and record["cpu"] == cpu_id() and record["cpu"]["model"]


def test_the_cpu_id_tells_machines_with_one_instruction_set_apart(tmp_path):
    """Two machines that both report AVX512 gave one run 0.4 dB apart at one thread: ids must differ where the flags
    do (here AMX), and one machine's must not depend on the flags' order."""

    def cpu(name: str, flags: str) -> dict[str, str]:
        (tmp_path / name).write_text("".join(
            f"processor\t: {i}\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: {flags}\n\n" for i in (0, 1)
        ))  # fmt: skip
        return cpu_id(tmp_path / name)

    plain = cpu("a", "fpu sse2 avx2 avx512f avx512bw")
    assert plain["model"] == "Intel(R) Xeon(R) Processor" and len(plain["id"]) == 8
    assert cpu("b", "fpu sse2 avx2 avx512f avx512bw amx_tile amx_bf16")["id"] != plain["id"]
    assert cpu("c", "avx512bw avx512f avx2 sse2 fpu") == plain
    assert cpu_id(tmp_path / "missing")["model"]  # no /proc/cpuinfo (macOS, Windows): still a name and an id


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
