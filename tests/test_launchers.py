"""Hydra launchers: a multirun's jobs through Hydra's submitit launcher (its local executor here; SLURM on a cluster,
`hydra/launcher=slurm`, conf/hydra/launcher/slurm.yaml)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from test_train import fast

from dq.config import CheckLauncherGpus
from dq.paths import conf_dir


def test_a_multirun_runs_each_job_as_a_submitit_job(tiny_teacher_dir, tmp_path):
    """`python -m dq.eval -m hydra/launcher=submitit_local ...`: submitit pickles the task function, which under
    `python -m` must be the importable `dq.eval.main`, and runs each job in a process of its own; each job writes its
    run directory under the sweep directory as the basic launcher's jobs do."""
    sweep = tmp_path / "sweep"
    over = [o for o in fast(tiny_teacher_dir) if o.startswith(("model.", "calib.", "eval.", "quantizer."))]
    command = [sys.executable, "-m", "dq.eval", "-m", "hydra/launcher=submitit_local", *over, "logger=csv",
               "quantizer=ptq_minmax", "bits=w8a8,w4a8", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=tmp_path, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert [r.name for r in runs] == ["0-ptq_minmax-w8a8", "1-ptq_minmax-w4a8"]
    for run, bits in zip(runs, ("w8a8", "w4a8"), strict=True):
        results = json.loads((run / "results.json").read_text())
        assert results["method"]["bits"] == bits and results["student"]["psnr_to_teacher"] > 0
        assert (run / "eval.log").is_file() and (run / "samples.png").is_file()
    logs = list((sweep / ".submitit").glob("*/*_0_log.out"))  # one submitit job each
    assert len(logs) == 2 and all("Job completed successfully" in log.read_text() for log in logs)


def test_the_slurm_preset_runs_one_process_on_one_gpu_per_job_and_requeues_on_timeout():
    """hydra/launcher=slurm is submitit's SLURM launcher with dq's defaults, each of them overridable."""
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)
    assert launcher.max_num_timeout == 3 and launcher.partition == "gpu"


def test_a_job_submitit_stops_for_good_says_so_and_how_to_resume_not_that_dq_crashed(tiny_teacher_dir, tmp_path):
    """A job past its time limit with no requeue left (`max_num_timeout=0`): submitit's signal handler raises its
    UncompletedJobError inside dq-train, which names it and says how to go on, not "crashed (a bug in dq ...)".
    The local executor signals 30 s before `timeout_min`: here 30 s into a job that would train for many minutes."""
    sweep = tmp_path / "sweep"
    over = [o for o in fast(tiny_teacher_dir) if not o.startswith(("distill.iters_per_block", "trainer."))]
    command = [sys.executable, "-m", "dq.train", "-m", "hydra/launcher=submitit_local", *over, "logger=csv",
               "distill.iters_per_block=100000", "hydra.launcher.timeout_min=1",
               "+hydra.launcher.max_num_timeout=0", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=tmp_path, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=600
    )
    assert done.returncode != 0 and "timed-out too many times" in done.stderr
    log = next(sweep.glob("*/train.log")).read_text()
    assert "dq-train: error: submitit stopped the job: Job not requeued because: timed-out too many times." in log
    assert "raise hydra.launcher.timeout_min" in log and f"{sweep}/0-" in log and "crashed" not in log


def test_a_launcher_that_reserves_gpus_for_cpu_jobs_is_refused_before_any_job_is_sent(tmp_path):
    """hydra/launcher=slurm reserves a GPU per job: without trainer=gpu every job would hold it idle for hours."""
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "dq.eval", "-m", "hydra/launcher=submitit_local", "hydra.launcher.gpus_per_node=1",
               "quantizer=ptq_minmax", "bits=w8a8,w4a8", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and not sweep.exists(), done.stderr[-3000:]
    assert done.stderr.startswith("dq-eval: error: hydra.launcher.gpus_per_node=1 reserves GPUs for every job")


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["hydra/launcher=slurm"], True),
        (["hydra/launcher=slurm", "trainer=gpu"], False),
        (["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0"], False),
        (["hydra/launcher=slurm", "trainer=cpu,gpu"], False),  # a swept trainer: each job's own
        (["hydra/launcher=submitit_local"], False),  # no GPU reserved
    ],
)
def test_the_launcher_gpu_check_looks_at_the_trainer_each_job_gets(overrides, refused):
    swept = [o for o in overrides if "," in o]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose("train", [o for o in overrides if o not in swept], return_hydra_config=True)
    cfg.hydra.overrides.task = [o for o in overrides if not o.startswith("hydra")]  # as the multirun has them
    if refused:
        with pytest.raises(SystemExit) as stop:
            CheckLauncherGpus().on_multirun_start(cfg)
        assert stop.value.code == 2
    else:
        assert CheckLauncherGpus().on_multirun_start(cfg) is None
