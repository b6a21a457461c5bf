"""A generated classification problem large enough for the large-batch regime: a random teacher
network labels Gaussian inputs, a wider student MLP learns it. Nothing is downloaded.

    x ~ N(0, I_dim),   label = argmax_k teacher(x)_k,
    teacher = Linear(dim, teacher_width) -> tanh -> Linear(teacher_width, classes),

with the teacher's weights drawn N(0, 1/fan_in) from ``data.seed``. A fraction ``label_noise``
of the labels (train, validation and test alike) is replaced by a uniform random class, so the
best reachable accuracy is about ``1 - label_noise * (classes - 1) / classes``. The student is
``Linear(dim, width) -> ReLU -> (Linear(width, width) -> ReLU) x (depth - 1) -> Linear(width,
classes)`` with PyTorch's default initialisation, trained on the cross-entropy.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from benchmarks.problems import Split


def _check(cfg) -> None:
    for key in ("n_train", "n_val", "n_test", "dim", "classes", "teacher_width"):
        if int(cfg[key]) < 1:
            raise ValueError(f"data.{key} must be a positive integer (got {cfg[key]!r})")
    if not 0.0 <= float(cfg.label_noise) < 1.0:
        raise ValueError(f"data.label_noise must be in [0, 1) (got {cfg.label_noise!r})")


@torch.no_grad()
def make_splits(cfg) -> tuple[Split, Split, Split]:
    """(train, validation, test) drawn from one teacher; ``cfg`` is the ``data`` config block."""
    _check(cfg)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    dim, classes, width = int(cfg.dim), int(cfg.classes), int(cfg.teacher_width)
    w1 = torch.randn(dim, width, generator=gen) / dim ** 0.5
    w2 = torch.randn(width, classes, generator=gen) / width ** 0.5
    sizes = [int(cfg.n_train), int(cfg.n_val), int(cfg.n_test)]
    x = torch.randn(sum(sizes), dim, generator=gen)
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    noisy = torch.rand(len(y), generator=gen) < float(cfg.label_noise)
    y[noisy] = torch.randint(classes, (int(noisy.sum()),), generator=gen)
    parts = torch.split(torch.arange(len(y)), sizes)
    return tuple(Split(x[ix], y[ix]) for ix in parts)


def make_student(dim: int, classes: int, width: int, depth: int) -> nn.Module:
    """The MLP every optimizer trains (``depth`` hidden layers of ``width`` ReLU units)."""
    if depth < 1:
        raise ValueError(f"model.depth must be >= 1 (got {depth!r})")
    layers: list[nn.Module] = [nn.Linear(dim, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)
