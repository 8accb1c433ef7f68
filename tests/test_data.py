import torch

from dq.data import MNISTDataModule, load_mnist_split


def test_split_sizes_balance_and_range():
    split = load_mnist_split(0)
    (xt, yt), (xh, yh) = split["train"], split["holdout"]
    assert xt.shape == (4000, 1, 28, 28) and xh.shape == (1000, 1, 28, 28)
    assert torch.bincount(yt).tolist() == [400] * 10
    assert torch.bincount(yh).tolist() == [100] * 10
    assert xt.min() == -1.0 and xt.max() == 1.0 and xt.dtype == torch.float32
    # classes are mixed, not a sorted prefix
    assert len(set(yt[:100].tolist())) == 10


def test_split_is_seeded_and_disjoint():
    uncached = load_mnist_split.__wrapped__  # two real calls, not the lru_cache's one object twice
    a, b, c = uncached(0), uncached(0), uncached(1)
    assert a["train"][0] is not b["train"][0] and torch.equal(a["train"][0], b["train"][0])
    assert torch.equal(a["train"][1], b["train"][1]) and torch.equal(a["holdout"][0], b["holdout"][0])
    assert not torch.equal(a["holdout"][0], c["holdout"][0])
    train = {bytes(x.numpy()) for x in a["train"][0][:4000:7]}
    assert not any(bytes(x.numpy()) in train for x in a["holdout"][0])


def test_datamodule_batches():
    dm = MNISTDataModule(batch_size=32, seed=0)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and y.shape == (32,)
    assert sum(len(b[0]) for b in dm.val_dataloader()) == 1000


def test_image_folder(tmp_path):
    import numpy as np
    from PIL import Image

    from dq.data import load_image_folder

    for i in range(3):
        Image.fromarray(np.full((10, 12, 3), 50 * i, np.uint8)).save(tmp_path / f"{i}.png")
    x = load_image_folder(tmp_path, size=8, channels=3)
    assert x.shape == (3, 3, 8, 8)
    assert torch.allclose(x[1], torch.full_like(x[1], 50 / 127.5 - 1))


def test_a_folders_reference_key_follows_its_images_and_how_they_are_read(tmp_path):
    """FID statistics are cached under this key: a folder that gained an image, or read in grey instead of colour,
    must not reuse the old ones."""
    import os

    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image

    from dq.data import reference_name

    for i in range(2):
        Image.fromarray(np.full((10, 12, 3), 50 * i, np.uint8)).save(tmp_path / f"{i}.png")
    data = OmegaConf.create({"name": "image_folder", "path": str(tmp_path), "size": 8, "channels": 3, "limit": None})
    key = reference_name(data)
    assert reference_name(data) == key
    assert reference_name(OmegaConf.merge(data, {"channels": 1})) != key
    assert reference_name(OmegaConf.merge(data, {"limit": 1})) != key
    first_two = reference_name(OmegaConf.merge(data, {"limit": 2}))
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "2.png")
    grown = reference_name(data)
    assert grown != key
    assert reference_name(OmegaConf.merge(data, {"limit": 2})) == first_two  # the two images it reads are unchanged
    os.utime(tmp_path / "2.png", ns=(1, 1))  # replaced in place: another modification time
    assert reference_name(data) != grown
