"""DataModules used by the recipes.

- :class:`DigitsDataModule`: scikit-learn's ``load_digits`` (1,797 8x8 images, ships with scikit-learn, no
  download), fixed seeded train/val/test split, standardised with train statistics; flat ``(N, 64)``
  features or ``(N, 1, S, S)`` images upsampled bilinearly to ``image_size``.
- :class:`SyntheticImagesDataModule`: class templates plus Gaussian noise, for smoke runs of image models.
- :class:`CIFAR10DataModule`: the python-pickle CIFAR-10 batches (``data_batch_1..5``, ``test_batch``) read
  from a local directory.
- :class:`ImageNetDataModule`: an ImageFolder-style tree ``root/{train,val}/<class>/<image>`` decoded with PIL.

Training batches are shuffled by :class:`EpochSeededSampler`, whose permutation depends only on
``(seed, epoch)``: a run resumed from a checkpoint sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset


class EpochSeededSampler(Sampler[int]):
    """Random permutation of ``range(n)`` drawn from a generator seeded with ``seed + epoch``.

    Lightning calls :meth:`set_epoch` at the start of every training epoch (as it does for
    ``DistributedSampler``), so the order is a function of the epoch alone and survives checkpoint/resume.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"data.batch_size must be a positive integer (got {batch_size!r})")


def _check_fraction(key: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"data.{key} must be in (0, 1) (got {value!r})")


class _LoadersMixin:
    """Builds the three loaders from ``self.train_set``/``val_set``/``test_set``."""

    batch_size: int
    eval_batch_size: int | None
    num_workers: int
    seed: int

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=EpochSeededSampler(len(self.train_set), self.seed),
            num_workers=self.num_workers, drop_last=False, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.eval_batch_size or self.batch_size, shuffle=False,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)


class DigitsDataModule(_LoadersMixin, pl.LightningDataModule):
    """scikit-learn digits: 10 classes, fixed stratified split, features standardised with train statistics
    (``(x - mean) / max(std, 1)`` per pixel: the floor keeps near-constant border pixels from exploding).

    ``image_size=None`` gives flat ``(N, 64)`` features (for an MLP); an integer gives ``(N, 1, S, S)``
    images, bilinearly resampled from 8x8 when ``S != 8`` (for a CNN).
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        image_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_batch_size(batch_size)
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"data.val_fraction + data.test_fraction must be < 1 (got {val_fraction} + {test_fraction})"
            )
        if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
            raise ValueError(f"data.image_size must be null or a positive integer (got {image_size!r})")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.image_size, self.seed, self.num_workers = image_size, seed, num_workers

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        idx = np.arange(len(y))
        idx_rest, idx_test = train_test_split(idx, test_size=self.test_fraction, stratify=y, random_state=self.seed)
        val_share = self.val_fraction / (1.0 - self.test_fraction)
        idx_train, idx_val = train_test_split(
            idx_rest, test_size=val_share, stratify=y[idx_rest], random_state=self.seed
        )
        x = torch.as_tensor(x, dtype=torch.float32)
        y = torch.as_tensor(y, dtype=torch.long)
        mean = x[idx_train].mean(0)
        # Border pixels are (nearly) constant in the train split; dividing by their tiny std would blow a rare
        # nonzero test pixel up to thousands. A floor of one intensity level (pixels take 0..16) bounds that.
        std = x[idx_train].std(0).clamp_min(1.0)
        x = (x - mean) / std
        if self.image_size is not None:
            x = x.view(-1, 1, 8, 8)
            if self.image_size != 8:
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        self.train_set = TensorDataset(x[idx_train], y[idx_train])
        self.val_set = TensorDataset(x[idx_val], y[idx_val])
        self.test_set = TensorDataset(x[idx_test], y[idx_test])


class SyntheticImagesDataModule(_LoadersMixin, pl.LightningDataModule):
    """Images ``template[label] + noise_std * N(0, 1)`` of shape ``(channels, image_size, image_size)``.

    The templates are smooth random fields (Gaussian noise upsampled from 4x4), so a small CNN can learn
    them; the dataset exists for smoke runs of image recipes where the real data is not at hand.
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: int = 3,
        image_size: int = 32,
        train_size: int = 512,
        val_size: int = 128,
        test_size: int = 128,
        noise_std: float = 1.0,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_batch_size(batch_size)
        for key, value in (("num_classes", num_classes), ("channels", channels), ("image_size", image_size),
                           ("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{key} must be a positive integer (got {value!r})")
        self.num_classes, self.channels, self.image_size = num_classes, channels, image_size
        self.sizes = (train_size, val_size, test_size)
        self.noise_std, self.batch_size, self.eval_batch_size = noise_std, batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        g = torch.Generator().manual_seed(self.seed)
        coarse = torch.randn(self.num_classes, self.channels, 4, 4, generator=g)
        templates = F.interpolate(coarse, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        sets = []
        for n in self.sizes:
            labels = torch.randint(self.num_classes, (n,), generator=g)
            noise = torch.randn(n, self.channels, self.image_size, self.image_size, generator=g)
            sets.append(TensorDataset(templates[labels] + self.noise_std * noise, labels))
        self.train_set, self.val_set, self.test_set = sets


CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def load_cifar10_batch(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one python-pickle CIFAR-10 batch: ``images (n, 3, 32, 32) uint8``, ``labels (n,) int64``.

    The file is a pickled dict with ``b"data"`` (n, 3072) uint8, rows laid out channel-major
    (1024 red, 1024 green, 1024 blue values, each row-major 32x32), and ``b"labels"`` (n ints).
    """
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


def _require_root(root: str | os.PathLike | None, what: str, example: str) -> Path:
    if root is None or str(root) in ("", "???"):
        raise FileNotFoundError(f"data.root is not set: the {what} recipe reads its data from a local directory; "
                                f"pass data.root={example}")
    return Path(os.path.expanduser(str(root)))


def _find_cifar10_dir(root: str | os.PathLike | None) -> Path:
    root = _require_root(root, "CIFAR-10", "/path/to/cifar-10-batches-py")
    for candidate in (root, root / "cifar-10-batches-py"):
        if all((candidate / name).is_file() for name in CIFAR10_FILES):
            return candidate
    raise FileNotFoundError(
        f"data.root: no CIFAR-10 python batches ({', '.join(CIFAR10_FILES)}) in {str(root)!r} or "
        f"{str(root / 'cifar-10-batches-py')!r}; download and extract cifar-10-python.tar.gz and set "
        f"data.root=/path/to/cifar-10-batches-py"
    )


class _AugmentedImages(Dataset):
    """uint8 images ``(n, C, H, W)`` -> normalised float tensors, with optional pad-and-crop + horizontal flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 augment: bool, pad: int = 4) -> None:
        self.images, self.labels, self.augment, self.pad = images, labels, augment, pad
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (self.images[i].float() / 255.0 - self.mean) / self.std
        if self.augment:
            h, w = x.shape[-2:]
            padded = F.pad(x, (self.pad,) * 4)
            top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = padded[:, top:top + h, left:left + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x, self.labels[i]


class CIFAR10DataModule(_LoadersMixin, pl.LightningDataModule):
    """CIFAR-10 from the python-pickle batches in ``root``; train augmentation: pad 4 + random crop + flip.

    ``val_size > 0`` holds out that many training images (fixed by ``seed``) for validation;
    ``val_size = 0`` validates on the test batch.
    """

    num_classes = 10

    def __init__(self, root: str | None, batch_size: int = 128, val_size: int = 0, augment: bool = True,
                 seed: int = 0, num_workers: int = 2, eval_batch_size: int | None = None) -> None:
        super().__init__()
        _check_batch_size(batch_size)
        if not isinstance(val_size, int) or not 0 <= val_size < 50_000:
            raise ValueError(f"data.val_size must be an integer in [0, 50000) (got {val_size!r})")
        self.root, self.batch_size, self.val_size, self.augment = root, batch_size, val_size, augment
        self.seed, self.num_workers, self.eval_batch_size = seed, num_workers, eval_batch_size

    def prepare_data(self) -> None:
        _find_cifar10_dir(self.root)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        directory = _find_cifar10_dir(self.root)
        parts = [load_cifar10_batch(directory / name) for name in CIFAR10_FILES[:5]]
        x_train = torch.cat([p[0] for p in parts])
        y_train = torch.cat([p[1] for p in parts])
        x_test, y_test = load_cifar10_batch(directory / "test_batch")
        perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(self.seed))
        idx_val, idx_train = perm[: self.val_size], perm[self.val_size:]
        pixels = x_train[idx_train].float() / 255.0
        mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3))
        self.train_set = _AugmentedImages(x_train[idx_train], y_train[idx_train], mean, std, self.augment)
        self.test_set = _AugmentedImages(x_test, y_test, mean, std, augment=False)
        self.val_set = (
            _AugmentedImages(x_train[idx_val], y_train[idx_val], mean, std, augment=False)
            if self.val_size > 0 else self.test_set
        )


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolder(Dataset):
    """``root/<class>/<file>`` images; classes are the sorted sub-directory names, labels their indices."""

    def __init__(self, root: str | os.PathLike, transform: Callable, key: str = "data.root") -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{key}: image folder {str(root)!r} does not exist")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise FileNotFoundError(f"{key}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}/<class>/")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


class _ImageNetTransform:
    """PIL image -> normalised ``(3, size, size)`` tensor.

    train: random-resized crop (area in ``[0.08, 1]``, aspect ratio log-uniform in ``[3/4, 4/3]``) + horizontal
    flip; eval: resize the short side to ``size / 0.875`` then center crop ``size``.
    """

    def __init__(self, size: int, train: bool) -> None:
        self.size, self.train = size, train
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def _random_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        for _ in range(10):
            target = area * float(torch.empty(()).uniform_(0.08, 1.0))
            ratio = math.exp(float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3))))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, ()))
                top = int(torch.randint(0, height - h + 1, ()))
                return left, top, left + w, top + h
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, img) -> torch.Tensor:
        from PIL import Image

        if self.train:
            img = img.resize((self.size, self.size), Image.BILINEAR, box=self._random_box(*img.size))
            if torch.rand(()) < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            short = round(self.size / 0.875)
            w, h = img.size
            scale = short / min(w, h)
            img = img.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std


class ImageNetDataModule(_LoadersMixin, pl.LightningDataModule):
    """ImageNet (or any ImageFolder tree) at ``root`` with ``train/`` and ``val/`` sub-directories.

    The validation split doubles as the test split (ImageNet's test labels are not public).
    """

    def __init__(self, root: str | None, batch_size: int = 256, image_size: int = 224, seed: int = 0,
                 num_workers: int = 8, eval_batch_size: int | None = None) -> None:
        super().__init__()
        _check_batch_size(batch_size)
        self.root, self.batch_size, self.image_size = root, batch_size, image_size
        self.seed, self.num_workers, self.eval_batch_size = seed, num_workers, eval_batch_size

    def _check_root(self) -> Path:
        root = _require_root(self.root, "ImageNet", "/path/to/imagenet")
        missing = [s for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"data.root: {str(root)!r} lacks {missing} (expected an ImageFolder tree root/train/<class>/<image> "
                f"and root/val/<class>/<image>); set data.root=/path/to/imagenet"
            )
        return root

    def prepare_data(self) -> None:
        self._check_root()
        import PIL  # noqa: F401  (fail here, not inside a worker, when Pillow is missing)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        root = self._check_root()
        self.train_set = ImageFolder(root / "train", _ImageNetTransform(self.image_size, train=True))
        self.val_set = ImageFolder(root / "val", _ImageNetTransform(self.image_size, train=False))
        self.test_set = self.val_set


__all__ = [
    "EpochSeededSampler", "DigitsDataModule", "SyntheticImagesDataModule", "CIFAR10DataModule",
    "ImageNetDataModule", "ImageFolder", "load_cifar10_batch",
]
