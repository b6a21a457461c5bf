"""DataModules: fixed splits, standardisation, the CIFAR-10 pickle layout, ImageFolder, clear path errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from lightning_seng.recipes.data import (
    CIFAR10DataModule, DigitsDataModule, EpochSeededSampler, ImageNetDataModule, SyntheticImagesDataModule,
    load_cifar10_batch,
)
from tests.fakes import write_image_folder


def test_digits_split_is_fixed_disjoint_and_standardised_on_train():
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=0)
    a.setup(), b.setup()
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (1077, 270, 450)
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    x_train = a.train_set.tensors[0]
    assert x_train.shape == (1077, 64)
    informative = x_train.std(0) > 0.99  # pixels with a raw std below the floor of 1 keep a std < 1
    assert int(informative.sum()) > 40
    torch.testing.assert_close(x_train.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_train.std(0)[informative], torch.ones(int(informative.sum())), atol=1e-4, rtol=0)
    assert a.test_set.tensors[0].abs().max() < 20  # rare test pixels are not blown up by near-zero train stds
    rows = lambda s: {tuple(r.tolist()) for r in s.tensors[0]}  # noqa: E731
    assert not rows(a.train_set) & rows(a.test_set)


def test_digits_images_are_upsampled():
    dm = DigitsDataModule(image_size=16)
    dm.setup()
    assert dm.train_set.tensors[0].shape[1:] == (1, 16, 16)


def test_epoch_seeded_sampler_depends_on_the_epoch_only():
    s = EpochSeededSampler(20, seed=1)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    s.set_epoch(0)
    assert list(s) == first and second != first and sorted(second) == list(range(20))


def test_synthetic_images_have_the_requested_shape():
    dm = SyntheticImagesDataModule(num_classes=4, channels=2, image_size=8, train_size=10)
    dm.setup()
    x, y = dm.train_set[0]
    assert x.shape == (2, 8, 8) and 0 <= int(y) < 4 and len(dm.train_set) == 10


def _write_batch(path, data, labels):
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)


def test_cifar10_batch_rows_are_channel_major_32x32(tmp_path):
    data = np.zeros((2, 3072), dtype=np.uint8)
    data[0, 0] = 10          # red, row 0, col 0
    data[0, 1024 + 33] = 20  # green, row 1, col 1
    data[1, 2048 + 1023] = 30  # blue, row 31, col 31
    _write_batch(tmp_path / "b", data, [3, 7])
    images, labels = load_cifar10_batch(tmp_path / "b")
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    assert (images[0, 0, 0, 0], images[0, 1, 1, 1], images[1, 2, 31, 31]) == (10, 20, 30)
    assert labels.tolist() == [3, 7]


def test_cifar10_datamodule_reads_a_local_directory(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_batch(root / name, rng.integers(0, 256, (8, 3072), dtype=np.uint8), rng.integers(0, 10, 8).tolist())
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=4, num_workers=0)  # the parent directory works too
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (36, 4, 8)
    x, y = dm.train_set[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


@pytest.mark.parametrize("root, pattern", [
    (None, r"data.root is not set"),
    ("/nonexistent", r"data.root: no CIFAR-10"),
])
def test_cifar10_without_data_names_the_key(root, pattern):
    with pytest.raises(FileNotFoundError, match=pattern):
        CIFAR10DataModule(root=root).setup()


def test_imagenet_folder_tree_is_read_with_pil(tmp_path):
    write_image_folder(tmp_path, 40, 50, "JPEG")
    dm = ImageNetDataModule(root=str(tmp_path), image_size=32, num_workers=0)
    dm.prepare_data()
    dm.setup()
    assert dm.train_set.classes == ["n01", "n02"] and len(dm.train_set) == 4
    x, y = dm.train_set[3]
    assert x.shape == (3, 32, 32) and y == 1
    assert dm.val_set[0][0].shape == (3, 32, 32)


def test_imagenet_missing_split_names_the_key(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"data.root: .* lacks \['val'\]"):
        ImageNetDataModule(root=str(tmp_path)).prepare_data()
