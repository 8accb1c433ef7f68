"""What produced a run's numbers: dq's version and commit, torch, the CPU, threads and device.

`results.json` keeps it as `provenance`. One configuration trained with one commit's code on two machines differed
by up to a dB of PSNR per run (BENCHMARKS.md, "Why Weight Dilation's W4A8 gain moved"), even on two machines that
report the same instruction set, and at one thread (BENCHMARKS.md, "Time and memory of the defaults"), so a table
that mixes runs must be able to tell them apart.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import dq

__all__ = ["code_at_start", "cpu_id", "git_state", "provenance"]

_GIT_TIMEOUT_S = 10


def _git(root: Path, *args: str) -> str | None:
    """`git -C root args...`'s stdout stripped; None where git is missing, fails or hangs."""
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=_GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(package_dir: Path | None = None) -> dict[str, Any] | None:
    """`{"commit": <sha>, "dirty": <the working tree differs from it>}` of the checkout dq runs from; None for an
    installed copy.

    Only a checkout whose top level holds this very package counts: a virtual environment inside some other
    repository must not lend dq that repository's commit.
    """
    package_dir = Path(dq.__file__).resolve().parent if package_dir is None else package_dir.resolve()
    root = package_dir.parent
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return None
    if (commit := _git(root, "rev-parse", "HEAD")) is None:
        return None
    status = _git(root, "status", "--porcelain")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


@functools.cache
def code_at_start() -> dict[str, Any] | None:
    """`git_state()` as of this process's first call, which dq-train and dq-eval make as they start: the code a run
    imported, not what the checkout holds when it ends (a commit made while it trains is not its code)."""
    return git_state()


def _cpuinfo(path: Path) -> dict[str, str]:
    """The first processor's fields in Linux's /proc/cpuinfo ({} elsewhere, or where it cannot be read)."""
    try:
        first = path.read_text(errors="replace").split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines()) if k.strip()}


@functools.cache
def cpu_id(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """`{"model": <the CPU's name>, "id": <8 hex digits>}`, the id a digest of the name and its feature flags: two
    machines reporting the same instruction set (torch's cpu capability) can still round differently, since oneDNN
    picks its kernels by the finer flags (AMX, AVX512-BF16, ...)."""
    info = _cpuinfo(cpuinfo)
    model = info.get("model name") or platform.processor() or platform.machine() or "unknown"
    flags = " ".join(sorted((info.get("flags") or info.get("Features") or "").split()))  # Features: Linux on ARM
    return {"model": model, "id": hashlib.sha256(f"{model}|{flags}".encode()).hexdigest()[:8]}


def provenance(device: str = "cpu") -> dict[str, Any]:
    """dq's version and git state, torch's version, the CPU (vector instruction set, name and id), intra-op threads
    and device."""
    on_gpu = device.startswith("cuda") and torch.cuda.is_available()
    return {
        "dq": dq.__version__,
        "git": code_at_start(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # e.g. AVX2, AVX512: float order differs
        "cpu": cpu_id(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(torch.device(device)) if on_gpu else "cpu",
    }
