"""experiments/bench_scale.py: its stand-in has the architecture of the paper's DDPM CIFAR-10 model."""

from conftest import load_script

from dq.distill.blocks import partition_blocks
from dq.models import load_teacher


def test_bench_scale_stand_in_has_the_architecture_of_ddpm_cifar10(tmp_path):
    """experiments/bench_scale.py times dq-train on google/ddpm-cifar10-32's architecture: 35.7M parameters, and the
    blocks dq distills it in."""
    bench = load_script("bench_scale")
    assert bench.write_standin(tmp_path / "m") == 35_746_307
    teacher, scheduler = load_teacher(tmp_path / "m")
    names = [b.name for b in partition_blocks(teacher)]
    assert len(names) == 37 and "down_blocks.1.attentions.1" in names and "up_blocks.2.attentions.2" in names
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.beta_end == 0.02
