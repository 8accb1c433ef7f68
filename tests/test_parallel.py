"""trainer=ddp: data-parallel distillation over several processes (`dq.distill.parallel`), on CPUs with gloo."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from test_train import DDP_CPU, fast
from torch import nn

import dq.evaluation
from dq.distill.parallel import (
    PARENT_ENV,
    all_sum,
    batch_share,
    check_equal_students,
    ddp_child,
    mark_parent,
    shard,
    sum_gradients,
    world,
)
from dq.errors import ConfigError, UserError
from dq.evaluation import _first_builds_metrics, sample_timed, teacher_samples
from dq.models import ddim_sample, load_teacher, make_noise
from dq.validation import check_block_parallel, check_trainer_values

BATCH = 5  # uneven over two processes: shares of 3 and 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 4, generator=g), torch.randn(BATCH, 3, generator=g)


def _process(rank: int, size: int, store: str, out: str) -> None:
    """One process: its share's weighted loss, summed gradients, and a student check that fails on purpose."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    torch.set_num_threads(1)
    model, (x, y) = _model(), _data()
    idx, weight = shard(torch.arange(BATCH))
    loss = weight * F.mse_loss(model(x[idx]), y[idx])
    total = all_sum(loss)
    loss.backward()
    sum_gradients(model.parameters())
    result = {"world": world(), "idx": idx, "total": total, "grads": [p.grad for p in model.parameters()]}
    # an empty share (process 1 here) has no gradients: it takes process 0's; a parameter without any stays None
    model, unused = _model(), nn.Parameter(torch.zeros(2))
    if rank == 0:
        F.mse_loss(model(x[:2]), y[:2]).backward()
    sum_gradients([*model.parameters(), unused])
    result["one_sided"] = [p.grad for p in model.parameters()]
    result["unused"] = unused.grad
    check_equal_students(model)  # equal: passes
    if rank == 1:
        with torch.no_grad():
            model[0].bias[0] += 1e-6
    try:
        check_equal_students(model)
    except RuntimeError as e:
        result["error"] = str(e)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_shares_with_summed_gradients_give_the_whole_minibatchs_gradient(tmp_path):
    mp.spawn(_process, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model, (x, y) = _model(), _data()
    loss = F.mse_loss(model(x), y)  # the plain reference: one process, the whole minibatch
    loss.backward()
    assert [r["world"] for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["idx"].tolist() == [0, 2, 4] and ranks[1]["idx"].tolist() == [1, 3]
    for r in ranks:
        torch.testing.assert_close(r["total"], loss.detach(), rtol=1e-6, atol=0)
        for got, p in zip(r["grads"], model.parameters(), strict=True):
            torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["grads"], ranks[1]["grads"], strict=True))  # same update
    model.zero_grad()
    F.mse_loss(model(x[:2]), y[:2]).backward()
    for r in ranks:
        assert r["unused"] is None
        assert all(torch.equal(g, p.grad) for g, p in zip(r["one_sided"], model.parameters(), strict=True))
    for r in ranks:  # every process learns that process 1's student differs
        assert "students of processes [1] differ from process 0's" in r["error"]


def _eval_cfg(teacher_dir: str, cache: str) -> DictConfig:
    return OmegaConf.create({
        "seed": 0, "model": {"path": teacher_dir, "num_inference_steps": 2},
        "eval": {"batch_size": 2, "progress": False, "cache_dir": cache, "cache_teacher_samples": True, "seed": 0},
    })  # fmt: skip


def _sampling_process(rank: int, size: int, store: str, out: str, teacher_dir: str) -> None:
    """One process's share of evaluation sampling, and of the teacher-sample cache."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    torch.set_num_threads(1)
    teacher, scheduler = load_teacher(teacher_dir)
    cfg, result = _eval_cfg(teacher_dir, str(Path(out) / "cache")), {}
    for n in (7, 2):  # batches of 2: four (two each) and one (the second process samples none)
        noise = make_noise(n, (1, 8, 8), 0)
        share = batch_share(n, 2)
        sampled, _ = sample_timed(teacher, scheduler, noise, cfg, "teacher")
        result[n] = {"share": (share.start, share.stop), "sampled": sampled}
    noise = make_noise(7, (1, 8, 8), 0)
    result["first"] = teacher_samples(cfg, teacher, scheduler, noise)  # sampled, then cached by the first process
    result["cached"] = teacher_samples(cfg, teacher, scheduler, noise)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_evaluation_sampling_is_split_in_whole_batches_and_gathered_in_order(tiny_teacher_dir, tmp_path):
    """Each process samples a run of whole batches of the noise; the first gets every sample, in order, as one
    process samples them (the same batches), and alone reads and writes the teacher-sample cache."""
    mp.spawn(_sampling_process, args=(2, str(tmp_path / "store"), str(tmp_path), str(tiny_teacher_dir)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    teacher, scheduler = load_teacher(tiny_teacher_dir)
    assert [r[7]["share"] for r in ranks] == [(0, 4), (4, 7)]
    assert [r[2]["share"] for r in ranks] == [(0, 2), (2, 2)]
    for n in (7, 2):
        reference = ddim_sample(teacher, scheduler, make_noise(n, (1, 8, 8), 0), 2, 2, progress=False)
        torch.testing.assert_close(ranks[0][n]["sampled"], reference, rtol=0, atol=1e-5)  # float order
        assert ranks[1][n]["sampled"] is None
    (first, first_s), (cached, cached_s) = ranks[0]["first"], ranks[0]["cached"]
    assert first_s > 0 and cached_s is None and torch.equal(first, cached)
    assert ranks[1]["first"][0] is None and ranks[1]["cached"] == (None, None)
    assert len(list((tmp_path / "cache" / "teacher_samples").glob("*.safetensors"))) == 1


def _cli(cwd: Path, *args: str, app: str = "dq.train") -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", app, *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def _first_losses(run: Path, n: int) -> list[float]:
    """The `distill/loss` values of global steps 0 .. n-1 in the run's CSV log."""
    rows = csv.DictReader((run / "csv" / "metrics.csv").open())
    losses = {int(r["step"]): float(r["distill/loss"]) for r in rows if r.get("distill/loss")}
    return [losses[i] for i in range(n)]


@pytest.mark.parametrize("distill", ["bkd", "model_kd"])
def test_dq_train_on_two_processes_trains_as_one_process_does(tiny_teacher_dir, tmp_path, distill):
    """Two CPU processes (gloo) take shares of every minibatch: the first loss matches one process's to float
    tolerance, and BKD's second too (after one step on summed gradients); later, the students differ from one
    process's by float order. The first process alone saves, scores and prints, and each samples its share of the
    evaluation; the processes' students are equal (`check_equal_students`, or the run fails)."""
    over = [*fast(tiny_teacher_dir), "logger=csv", f"distill={distill}"]
    over += ["eval.batch_size=4", "eval.cache_teacher_samples=false"]  # each process samples a batch, teachers too
    if distill == "model_kd":
        over = [o for o in over if not o.startswith("distill.iters_per_block")] + ["distill.iters=2"]
    runs = {n: tmp_path / n for n in ("one", "two")}
    one = _cli(tmp_path, *over, f"hydra.run.dir={runs['one']}")
    two = _cli(tmp_path, *over, *DDP_CPU, f"hydra.run.dir={runs['two']}")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    results = {n: json.loads((run / "results.json").read_text()) for n, run in runs.items()}
    assert results["one"]["cost"]["processes"] == 1 and results["two"]["cost"]["processes"] == 2
    assert (runs["two"] / "student" / "quant_spec.json").is_file() and (runs["two"] / "samples.png").is_file()
    child_log = (runs["two"] / "train_ddp_process_1.log").read_text()  # its own log file
    assert "weight dilation: " in child_log and "student: process 1 samples 4 of 8" in child_log
    assert len(results["two"]["cost"]["process_peak_mem_mb"]) == 2
    # the teacher's samples, split over the processes, are one process's (the same batches): the same scores
    for key in ("fid", "is"):
        assert results["two"]["teacher"][key] == pytest.approx(results["one"]["teacher"][key], rel=1e-4)
    assert two.stdout.count("weight dilation: ") == 1 and two.stdout.count("results: ") == 1
    assert (two.stdout + two.stderr).count("is too few for meaningful scores") == 1  # the child's in its log alone
    (one0, one1), (two0, two1) = (_first_losses(run, 2) for run in runs.values())
    assert two0 == pytest.approx(one0, rel=1e-6)  # the shares' weighted losses sum to the minibatch's
    if distill == "bkd":  # one block: Adam's first, sign-like step flips no weight's rounding here (whole model: 1%)
        assert one1 != one0 and two1 == pytest.approx(one1, rel=1e-4)


def test_dq_eval_on_two_processes_scores_as_one_process_does(tiny_teacher_dir, tmp_path):
    """dq-eval trainer=ddp: the first process calibrates the PTQ student and the other takes it; each samples a
    batch of teacher and student with the first process's student, and the first scores them: one process's scores;
    it alone writes and prints."""
    over = [*fast(tiny_teacher_dir), "quantizer=ptq_minmax", "logger=csv", "eval.batch_size=4"]
    over = [o for o in over if not o.startswith(("distill.", "trainer."))] + ["eval.cache_teacher_samples=false"]
    runs = {n: tmp_path / n for n in ("one", "two")}
    one = _cli(tmp_path, *over, f"hydra.run.dir={runs['one']}", app="dq.eval")
    two = _cli(tmp_path, *over, *DDP_CPU, f"hydra.run.dir={runs['two']}", app="dq.eval")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    results = {n: json.loads((run / "results.json").read_text()) for n, run in runs.items()}
    assert results["two"]["cost"]["processes"] == 2 and "processes" not in results["one"]["cost"]
    for who in ("teacher", "student"):
        for key in ("fid", "is", "psnr_to_teacher") if who == "student" else ("fid", "is"):
            assert results["two"][who][key] == pytest.approx(results["one"][who][key], rel=1e-5), (who, key)
    child_log = (runs["two"] / "train_ddp_process_1.log").read_text()
    assert "student: process 1 takes the first process's student" in child_log and "calibrat" not in child_log
    assert "student: process 1 samples 4 of 8" in child_log
    assert two.stdout.count("results: ") == 1 and "student: process 0 samples 4 of 8" in two.stdout
    assert (two.stdout + two.stderr).count("is too few for meaningful scores") == 1


def _metrics_process(rank: int, size: int, store: str, out: str) -> None:
    """One process: the first fails to build the metrics (a classifier damaged after start-up), the others wait."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)

    def broken(cfg):
        raise UserError("Classifier checkpoint in 'x' is corrupt")

    dq.evaluation.build_metrics = broken  # only the first process builds them
    try:
        _first_builds_metrics(None)
        said = None
    except UserError as e:
        said = str(e)
    Path(out, f"rank{rank}.txt").write_text(str(said))
    dist.destroy_process_group()


def test_an_error_in_the_first_process_alone_is_raised_in_every_process(tmp_path):
    """The first process alone builds the FID/IS metrics; when it fails (a user error: a file damaged since start-up,
    which validation loads), the others, which would wait for it in their next collective, raise too."""
    mp.spawn(_metrics_process, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert said == ["Classifier checkpoint in 'x' is corrupt", "the first process could not build the FID/IS metrics: "
                    "it reports why"]  # fmt: skip


@pytest.mark.parametrize(
    "extra", [["experiment=dilatequant_adaround"], ["distill.dampen=1", "distill.act_drop_prob=0.5"]], ids=str
)
def test_adaround_dampening_and_qdrop_keep_the_processes_students_equal(tiny_teacher_dir, tmp_path, extra):
    """The terms of each block's loss that are not the MSE (AdaRound's regulariser, dampening), AdaRound's
    per-block parameters, QDrop's masks and minibatches of 2, of which a process often owns no entry, under
    trainer=ddp: the run ends only if every process holds the same student."""
    run = tmp_path / "run"
    over = [o for o in fast(tiny_teacher_dir) if not o.startswith(("eval.", "distill.iters_per_block"))]
    over += ["logger=csv", "eval=none", "distill.iters_per_block=3", "distill.batch_size=2", *extra]  # empty shares
    done = _cli(tmp_path, *over, *DDP_CPU, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((run / "checkpoints" / "last.json").read_text())["history"]
    assert len(history) == 17 and json.loads((run / "results.json").read_text())["cost"]["processes"] == 2
    if "experiment=dilatequant_adaround" in extra:
        assert any(h["rounded_otherwise"] > 0 for h in history)
    else:
        assert any(h["oscillated"] > 0 for h in history)  # the dampened latent weights trained


def test_a_dq_ddp_trainer_takes_a_number_of_devices_not_a_list():
    """Each process takes the GPU of its local rank, so particular GPUs are picked with CUDA_VISIBLE_DEVICES."""
    cfg = OmegaConf.create({"device": "cuda"})
    check_block_parallel(cfg, {"devices": 2}, one_process=True)
    check_block_parallel(cfg, {"devices": -1}, one_process=True)
    with pytest.raises(ConfigError, match=r"trainer.devices=\[2, 3\] with trainer.strategy=dq_ddp: .*CUDA_VISIBLE"):
        check_block_parallel(cfg, {"devices": [2, 3]}, one_process=True)
    with pytest.raises(ConfigError, match=r"trainer.devices='0,1'"):
        check_block_parallel(cfg, {"devices": "0,1"}, one_process=True)


SLURM_TASK = {"SLURM_NTASKS": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize(
    ("env", "launcher"),
    [
        ({**SLURM_TASK, "SLURM_JOB_NAME": "job"}, "a SLURM task"),
        ({"TORCHELASTIC_RUN_ID": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}, "one of the processes torch"),
        ({**SLURM_TASK, "SLURM_JOB_NAME": "interactive"}, None),  # Lightning's own way out of srun's tasks
    ],
)
def test_trainer_ddp_under_srun_or_torchrun_is_refused_before_lightning_waits_for_processes(monkeypatch, env, launcher):
    """Lightning starts no processes where srun or torchrun started this one: dq_ddp's own would never come."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(PARENT_ENV, raising=False)
    cfg = OmegaConf.create(
        {"device": "cpu", "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "dq_ddp", "logger": False}}
    )
    if launcher is None:
        check_trainer_values(cfg)
        return
    with pytest.raises(
        ConfigError, match=f"trainer.devices=2 starts one process per GPU itself, .* runs as {launcher}"
    ):
        check_trainer_values(cfg)
    check_trainer_values(OmegaConf.merge(cfg, {"trainer": {"devices": 1}}))  # one process: nothing to start
    check_trainer_values(OmegaConf.merge(cfg, {"trainer": {"devices": "auto"}}))  # one CPU process here, as one GPU


def test_only_a_process_the_parent_marked_is_a_child(monkeypatch):
    """torchrun / srun set RANK and LOCAL_RANK too: those processes are runs of their own, refused by the lock."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("DQ_DDP_PARENT", raising=False)
    assert not ddp_child()
    with mark_parent():
        assert not ddp_child()  # the parent itself
    monkeypatch.setenv("DQ_DDP_PARENT", str(os.getpid() + 1))
    assert ddp_child()


def test_a_diverging_ddp_run_stops_with_the_parents_one_line_error(tiny_teacher_dir, tmp_path):
    """Every process raises the non-finite loss at once, and the first reports it as one process does (exit 2, one
    line). The others wait for it to exit (`wait_for_parent`): Lightning kills the first process within 5 s of
    another exiting with an error, which here would only matter if the first took longer to report."""
    run = tmp_path / "run"
    over = [o for o in fast(tiny_teacher_dir) if not o.startswith("eval.")] + ["eval=none", "logger=none"]
    rates = ["distill.lr_weight=1e30", "distill.lr_weight_qparams=1e30", "distill.lr_act_qparams=1e30"]
    done = _cli(tmp_path, *over, *rates, "distill.revert_worse=false", *DDP_CPU, f"hydra.run.dir={run}")
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("dq-train: error: non-finite")]
    assert errors and "Traceback" not in done.stderr
    assert "crashed" not in (run / "train.log").read_text() and (run / "checkpoints").is_dir()
