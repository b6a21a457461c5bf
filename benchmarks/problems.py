"""The three benchmark problems, all built on scikit-learn's digits (1,797 8x8 images, shipped
with the package, no download).

- ``mlp``: a fully connected classifier on the 64 pixels.
- ``cnn``: a small convolutional classifier on the images upsampled to 16x16 (bilinear).
- ``autoencoder``: the classic deep autoencoder problem (Hinton & Salakhutdinov's
  784-1000-500-250-30 network) scaled to digits: 64-512-256-128-16 and its mirror, tanh units,
  a linear code layer and a sigmoid output, trained on the squared reconstruction error.

Every problem has the same fixed split (seed 0, stratified): 20 % test, and 10 % of the rest as
the validation set the learning-rate search uses; the test set is never seen by the search.
Pixels are scaled to [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

PROBLEMS = ("mlp", "cnn", "autoencoder")


@dataclass
class Split:
    """Inputs ``x`` and targets ``y`` (class labels, or the inputs themselves for the autoencoder)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class Problem:
    """A model factory, its loss and its quality metric.

    ``metric`` is test accuracy for the classifiers (higher is better) and the reconstruction
    error for the autoencoder (lower is better); ``target`` is the value the run must reach.
    ``loss_kind`` tells second-order peers which Fisher to build ("cross_entropy" or "mse").
    """

    name: str
    make_model: Callable[[], nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric_name: str
    higher_is_better: bool
    target: float
    loss_kind: str
    train: Split
    val: Split
    test: Split
    train_full: Split

    def reached(self, value: float) -> bool:
        return value >= self.target if self.higher_is_better else value <= self.target


def reconstruction_error(output: torch.Tensor, target: torch.Tensor,
                         reduction: str = "mean") -> torch.Tensor:
    """Squared error summed over the 64 pixels: (N, 64) -> (N,), then averaged ("mean") or
    summed ("sum") over the batch. The ``reduction`` keyword is what asdl's K-FAC calls."""
    per_sample = (output - target).pow(2).sum(dim=1)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _splits(x: torch.Tensor, labels: torch.Tensor, autoencoder: bool):
    idx = torch.arange(len(labels)).numpy()
    y_np = labels.numpy()
    rest, test = train_test_split(idx, test_size=0.2, random_state=0, stratify=y_np)
    train, val = train_test_split(rest, test_size=0.1, random_state=0, stratify=y_np[rest])

    def take(ix):
        ix = torch.as_tensor(ix)
        return Split(x[ix], x[ix] if autoencoder else labels[ix])

    return take(train), take(val), take(test), take(rest)


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 10),
    )


def _cnn(channels: int) -> nn.Module:
    c = channels
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),          # 16x16 -> 8x8
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),      # 8x8 -> 4x4
        nn.Flatten(),
        nn.Linear(2 * c * 16, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def _autoencoder(widths: list[int]) -> nn.Module:
    dims = [64, *widths]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    rev = dims[::-1]
    for i, (a, b) in enumerate(zip(rev[:-1], rev[1:])):
        layers.append(nn.Linear(a, b))
        layers.append(nn.Tanh() if i < len(rev) - 2 else nn.Sigmoid())
    return nn.Sequential(*layers)


def build_problem(name: str, cfg) -> Problem:
    """Build problem ``name`` ("mlp" | "cnn" | "autoencoder") from its config block.

    ``cfg`` needs ``target`` and the model size: ``width`` (mlp), ``channels`` (cnn) or
    ``widths`` (autoencoder encoder widths, input 64 excluded).
    """
    if name not in PROBLEMS:
        raise ValueError(f"problem must be one of {list(PROBLEMS)} (got {name!r})")
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    if name == "cnn":
        x = F.interpolate(x.view(-1, 1, 8, 8), size=(16, 16), mode="bilinear", align_corners=False)
    train, val, test, train_full = _splits(x, labels, autoencoder=name == "autoencoder")
    if name == "mlp":
        width = int(cfg.width)
        return Problem(name, lambda: _mlp(width), F.cross_entropy, "test_acc", True,
                       float(cfg.target), "cross_entropy", train, val, test, train_full)
    if name == "cnn":
        channels = int(cfg.channels)
        return Problem(name, lambda: _cnn(channels), F.cross_entropy, "test_acc", True,
                       float(cfg.target), "cross_entropy", train, val, test, train_full)
    widths = [int(w) for w in cfg.widths]
    return Problem(name, lambda: _autoencoder(widths), reconstruction_error, "test_recon", False,
                   float(cfg.target), "mse", train, val, test, train_full)


@torch.no_grad()
def evaluate(model: nn.Module, problem: Problem, split: Split) -> tuple[float, float]:
    """Return (loss, metric) of ``model`` on ``split``: metric is accuracy or reconstruction error."""
    was_training = model.training
    model.eval()
    out = model(split.x)
    loss = float(problem.loss_fn(out, split.y))
    if problem.higher_is_better:
        metric = float((out.argmax(dim=1) == split.y).float().mean())
    else:
        metric = loss
    model.train(was_training)
    return loss, metric
