"""trainer=ddp: data-parallel distillation over several processes (`dq.distill.parallel`), on CPUs with gloo."""

from __future__ import annotations

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
from test_train import fast
from torch import nn

from dq.distill.parallel import all_sum, check_equal_students, shard, sum_gradients, world

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
    for r in ranks:  # every process learns that process 1's student differs
        assert "students of processes [1] differ from process 0's" in r["error"]


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dq.train", *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.mark.parametrize("distill", ["bkd", "model_kd"])
def test_dq_train_on_two_processes_trains_as_one_process_does(tiny_teacher_dir, tmp_path, distill):
    """Two CPU processes (gloo) take shares of every minibatch: the first steps match one process's to float
    tolerance (later blocks start from students that differ by float order); the first process alone writes the
    run directory and prints; the processes' students are equal (`check_equal_students`, at the end of the fit)."""
    over = [*fast(tiny_teacher_dir), "logger=csv", f"distill={distill}"]
    if distill == "model_kd":
        over += ["distill.iters=2"]
        over.remove("distill.iters_per_block=2")
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "device=cpu"]
    runs = {n: tmp_path / n for n in ("one", "two")}
    one = _cli(tmp_path, *over, f"hydra.run.dir={runs['one']}")
    two = _cli(tmp_path, *over, *ddp, f"hydra.run.dir={runs['two']}")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    results = {n: json.loads((run / "results.json").read_text()) for n, run in runs.items()}
    assert results["one"]["cost"]["processes"] == 1 and results["two"]["cost"]["processes"] == 2
    assert (runs["two"] / "student" / "quant_spec.json").is_file() and (runs["two"] / "samples.png").is_file()
    assert "weight dilation: " in (runs["two"] / "train_ddp_process_1.log").read_text()  # its own log file
    assert two.stdout.count("weight dilation: ") == 1 and two.stdout.count("results: ") == 1
    if distill == "bkd":  # block 0 trained from the same start on the same minibatches
        first = [json.loads((run / "checkpoints" / "last.json").read_text())["history"][0] for run in runs.values()]
        assert first[0]["mse_trained"] != first[0]["mse_before"]
        assert first[1]["mse_trained"] == pytest.approx(first[0]["mse_trained"], rel=1e-5)
    psnr = [r["student"]["psnr_to_teacher"] for r in results.values()]
    assert psnr[1] == pytest.approx(psnr[0], abs=1.0)
