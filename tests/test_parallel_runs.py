"""experiments/parallel_runs.sh: every run of a list starts, at most JOBS at a time, and failures are counted.

The runs are a stand-in for `python3 -m dq.train` (a `python3` first on PATH that records when each run starts and
ends and writes a results.json); everything else, collect.py included, goes to the real interpreter.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

SCRIPT = REPO / "experiments" / "parallel_runs.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "dq.train" ]; then
  for a in "$@"; do case $a in hydra.run.dir=*) dir=${a#hydra.run.dir=} ;; esac; done
  name=$(basename "$dir")
  echo "start $name $(date +%s.%N)" >> "$EVENTS"
  sleep 0.4
  echo "end $name $(date +%s.%N)" >> "$EVENTS"
  case " $* " in *" fail=1 "*) exit 1 ;; esac
  mkdir -p "$dir/.hydra"
  printf -- '- seed=1\\n' > "$dir/.hydra/overrides.yaml"
  printf '{"teacher": {"fid": 42.0, "is": 8.0}, "student": {"fid": 50.0, "is": 8.0}, "metric": {"seed": 0},
    "method": {"quantizer": "dilatequant", "bits": "w4a8"}, "cost": {}}' > "$dir/results.json"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def _run_list(tmp_path: Path, lines: list[str], jobs: str | None) -> tuple[subprocess.CompletedProcess, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    runs = tmp_path / "runs.txt"
    runs.write_text("# a comment\n" + "\n".join(lines) + "\n")
    events = tmp_path / "events.txt"
    env = os.environ | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "EVENTS": str(events),
        "REAL_PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
    }
    env.pop("JOBS", None)
    if jobs is not None:
        env["JOBS"] = jobs
    root = tmp_path / "root"
    done = subprocess.run(["bash", str(SCRIPT), str(root), str(runs)], env=env, capture_output=True, text=True)
    return done, events


def _most_at_once(events: Path) -> int:
    """The largest number of runs between their start and end at one time."""
    timeline = []
    for line in events.read_text().splitlines():
        kind, _, t = line.split()
        timeline.append((float(t), 1 if kind == "start" else -1))
    now = most = 0
    for _, step in sorted(timeline):  # at equal times an end (-1) sorts before a start
        now += step
        most = max(most, now)
    return most


def test_jobs_caps_runs_at_a_time_and_every_run_finishes(tmp_path):
    done, events = _run_list(tmp_path, [f"r{i} seed={i}" for i in range(5)], jobs="2")
    assert done.returncode == 0, done.stderr
    assert "5 runs, 2 at a time" in done.stdout
    assert _most_at_once(events) == 2
    assert sorted(p.name for p in (tmp_path / "root").glob("r*.json")) == [f"r{i}.json" for i in range(5)]
    table = (tmp_path / "root" / "runs.md").read_text()
    assert table.count("| dilatequant |") == 5


def test_all_at_once_without_jobs(tmp_path):
    done, events = _run_list(tmp_path, [f"r{i} seed={i}" for i in range(3)], jobs=None)
    assert done.returncode == 0, done.stderr
    assert "3 runs, 3 at a time" in done.stdout
    assert _most_at_once(events) == 3


def test_a_failed_run_is_counted_and_the_others_kept(tmp_path):
    runs = ["good seed=1", "bad seed=2 fail=1", "late seed=3", "last seed=4 fail=1"]  # reaped at start / at the end
    done, events = _run_list(tmp_path, runs, jobs="1")
    assert done.returncode == 1
    assert "2 run(s) or the table failed" in done.stderr
    assert _most_at_once(events) == 1
    assert sorted(p.name for p in (tmp_path / "root").glob("*.json")) == ["good.json", "late.json"]


@pytest.mark.parametrize("jobs", ["0", "two", "-1"])
def test_invalid_jobs_is_refused_before_any_run(tmp_path, jobs):
    done, events = _run_list(tmp_path, ["r0 seed=0"], jobs=jobs)
    assert done.returncode == 1
    assert f"JOBS={jobs} is invalid" in done.stderr
    assert not events.exists()
    assert not (tmp_path / "root").exists()


RUN_LISTS = sorted((REPO / "experiments" / "runs").glob("*.txt"))


def run_list_lines(path: Path) -> list[tuple[str, list[str]]]:
    """`(name, overrides)` per run of a run list, read as parallel_runs.sh reads it (`#` starts a comment)."""
    runs = []
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            runs.append((words[0], words[1:]))
    return runs


@pytest.mark.parametrize("path", RUN_LISTS, ids=[p.stem for p in RUN_LISTS])
def test_every_committed_run_list_composes(path, tmp_path):
    """The run lists behind BENCHMARKS.md's tables still compose and pass dq-train's start-up checks, so a renamed
    option or config group breaks a test here rather than a reader's hour-long re-run."""
    from conftest import compose_cfg

    from dq.train import build_callbacks
    from dq.validation import validate

    runs = run_list_lines(path)
    assert runs, f"{path.name} holds no runs"
    assert len({name for name, _ in runs}) == len(runs), f"{path.name} repeats a run name"
    for name, overrides in runs:
        cfg = compose_cfg("train", overrides, tmp_path / name)
        validate(cfg)
        build_callbacks(cfg.get("callbacks"))
