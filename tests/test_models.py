import re
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import TEACHER
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from dq.errors import ConfigError
from dq.models import check_inference_steps, check_sample_shape, ddim_sample, load_teacher, make_noise
from dq.models.loading import CheckpointError


def test_load_shipped_teacher_has_paper_building_blocks():
    unet, scheduler = load_teacher(TEACHER)
    kinds = {type(m).__name__ for m in unet.modules()}
    assert {"ResnetBlock2D", "Attention", "Downsample2D", "Upsample2D"} <= kinds
    assert not any(p.requires_grad for p in unet.parameters())
    assert scheduler.config.num_train_timesteps == 1000


def test_missing_model_directory_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*nope' does not exist. Set `model\.path`"):
        load_teacher(tmp_path / "nope")
    (tmp_path / "model.safetensors").write_bytes(b"")  # a file where the directory belongs
    with pytest.raises(FileNotFoundError, match=r"model.safetensors' is a file, not a directory. Set `model\.path`"):
        load_teacher(tmp_path / "model.safetensors")


def test_a_damaged_teacher_config_or_no_path_is_named(tiny_teacher_dir):
    config = tiny_teacher_dir / "unet" / "config.json"
    good = config.read_text()
    for bad, message in (("[]", r"config.json' is not a JSON object"), ('{"_class_name": ["x"]}', r"holds a \['x'\]")):
        config.write_text(bad)
        with pytest.raises(CheckpointError, match=message):
            load_teacher(tiny_teacher_dir)
    config.write_text(good)
    with pytest.raises(ConfigError, match=r"`model.path`=None: set it to a local diffusers directory"):
        load_teacher(None)  # type: ignore[arg-type]
    _, scheduler = load_teacher(tiny_teacher_dir)
    check_inference_steps(scheduler, scheduler.config.num_train_timesteps)
    with pytest.raises(ConfigError, match=r"model.num_inference_steps=5000: .* num_train_timesteps=1000"):
        check_inference_steps(scheduler, 5000)


def test_corrupt_checkpoint_is_a_clear_error(tiny_teacher_dir):
    weights = tiny_teacher_dir / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        load_teacher(tiny_teacher_dir)


def test_sampling_matches_diffusers_ddim_pipeline(tiny_teacher_dir):
    """The plain loop equals diffusers' stock DDIMPipeline drawing the same noise (one CPU generator, same seed)."""
    unet, scheduler = load_teacher(tiny_teacher_dir)
    ours = ddim_sample(unet, scheduler, make_noise(3, (1, 8, 8), seed=1), 4, progress=False)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(1)
    images = pipe(batch_size=3, generator=generator, num_inference_steps=4, eta=0.0, output_type="np").images
    expected = torch.from_numpy(images).permute(0, 3, 1, 2)  # [N, H, W, C] in [0, 1]
    torch.testing.assert_close(ours / 2 + 0.5, expected, atol=1e-6, rtol=0)


def test_sampling_is_a_function_of_the_noise(tiny_teacher_dir):
    unet, scheduler = load_teacher(tiny_teacher_dir)
    noise = make_noise(6, (1, 8, 8), seed=1)
    assert torch.equal(noise, make_noise(6, (1, 8, 8), seed=1))
    a = ddim_sample(unet, scheduler, noise, 4, batch_size=4, progress=False)
    b = ddim_sample(unet, scheduler, noise, 4, batch_size=6, progress=False)
    assert a.shape == (6, 1, 8, 8)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    c = ddim_sample(unet, scheduler, make_noise(6, (1, 8, 8), seed=2), 4, progress=False)
    assert not torch.allclose(a, c)


def test_pickle_only_checkpoint_names_the_conversion(tiny_teacher_dir):
    """A UNet saved as `diffusion_pytorch_model.bin` alone (older hub snapshots) is refused with the command that
    converts it, and that command, run as printed, makes the directory load."""
    unet_dir = tiny_teacher_dir / "unet"
    want = UNet2DModel.from_pretrained(unet_dir)
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    want.save_pretrained(unet_dir, safe_serialization=False)
    with pytest.raises(CheckpointError, match=r"only as a PyTorch pickle") as e:
        load_teacher(tiny_teacher_dir)
    code = re.search(r'python -c "(.+)"', str(e.value)).group(1)
    subprocess.run([sys.executable, "-c", code], check=True)
    got, _ = load_teacher(tiny_teacher_dir)
    for (name, a), (_, b) in zip(want.state_dict().items(), got.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([3, 8, 8], r"has 3 channels and the UNet takes 1"),
        ([1, 8], r"is invalid: give \[channels, height, width\]"),
        ([1, 9, 10], r"halves height and width 1 times, so both must be multiples of 2"),
    ],
)
def test_a_sample_shape_the_unet_cannot_take_is_refused(tiny_teacher_dir, shape, message):
    unet, _ = load_teacher(tiny_teacher_dir)
    with pytest.raises(ConfigError, match=rf"model.sample_shape={re.escape(str(shape))}.*{message}"):
        check_sample_shape(unet, shape)


def test_another_resolution_than_the_unets_is_only_a_warning(tiny_teacher_dir):
    unet, _ = load_teacher(tiny_teacher_dir)  # sample_size 8
    with pytest.warns(UserWarning, match=r"samples at 16x16, and the UNet was built for 8x8"):
        check_sample_shape(unet, [1, 16, 16])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_sample_shape(unet, [1, 8, 8])
