"""What the main job reports of its runs: ms per training step after warm-up, validation curves, divergence,
one table, one plot.

Both runs of the main job (SENG+SGD and SGD) are timed the same way: :class:`StepTimer` measures every
training step (``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, SENG, optimizer step)
and leaves out the steps of each run's first epoch, which carry the one-time start-up (first calls into
torch and Lightning, allocator warm-up). ``ms/step`` is the median over the remaining epochs of each epoch's
mean step time, and the ratio is the quotient of two such figures.

A run *diverged* when a training batch's loss is not finite (NaN or ±Inf): :class:`DivergenceMonitor` records the
first such batch, warns once (through Lightning's rank-zero warning, which the progress bar prints above itself),
and the table gains a column ``diverged at`` and a line per diverged run naming its last finite validation.
A loss that grows but stays finite is not marked: the test accuracy and loss show it.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

VAL_METRICS = ("val/loss", "val/acc")


class StepTimer(Callback):
    """Seconds of each training step, from ``on_train_batch_start`` to ``on_train_batch_end``, per epoch.

    ``ms_per_step`` is the median over the counted epochs of the epoch's mean step time: the mean counts
    curvature refreshes at their real rate, the median keeps one epoch slowed by other processes on a shared
    machine from moving the figure.

    Args:
        warmup_epochs: the first ``warmup_epochs`` epochs this fit runs are not counted (a resumed fit's
            first epoch is its warm-up too).
        clock: seconds as a float; :func:`time.perf_counter` by default.
    """

    def __init__(self, warmup_epochs: int = 1, clock: Callable[[], float] = time.perf_counter) -> None:
        self.warmup_epochs = warmup_epochs
        self.clock = clock
        self.epoch_step_seconds: list[list[float]] = []  # one list per counted epoch
        self._epochs_started = 0
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epochs_started += 1
        if self._epochs_started > self.warmup_epochs:
            self.epoch_step_seconds.append([])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._start = self.clock()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._epochs_started > self.warmup_epochs and self._start is not None:
            self.epoch_step_seconds[-1].append(self.clock() - self._start)
        self._start = None

    @property
    def ms_per_step(self) -> float:
        """Median over the counted epochs of the mean step time, in milliseconds; NaN when none was counted."""
        means = [sum(steps) / len(steps) for steps in self.epoch_step_seconds if steps]
        return 1000.0 * statistics.median(means) if means else math.nan


class ValidationCurve(Callback):
    """``val/loss`` and ``val/acc`` after each validation run of a fit (sanity checks left out)."""

    def __init__(self, metrics: tuple[str, ...] = VAL_METRICS) -> None:
        self.curves: dict[str, list[float]] = {key: [] for key in metrics}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key, values in self.curves.items():
            value = trainer.callback_metrics.get(key)
            values.append(math.nan if value is None else float(value))


@dataclass(frozen=True)
class Divergence:
    """Where a run's training loss first was not finite: ``batch`` counts the fit's training batches from 1,
    ``epoch`` its epochs from 1 (the table's ``epochs`` counts the same way)."""

    batch: int
    epoch: int

    def __str__(self) -> str:
        return f"epoch {self.epoch} (batch {self.batch})"


class DivergenceMonitor(Callback):
    """Finds the first training batch whose loss is NaN or ±Inf, without a host sync per step.

    Each batch folds ``isfinite(loss)`` into a device tensor holding the first bad batch number (``-1``: none
    yet); it is read at the end of each epoch and of the fit (a fit may stop inside an epoch), and the first
    read that finds one warns once (rank zero) naming the run.

    Args:
        label: the run's name in the warning (``"SENG+SGD"``).
    """

    def __init__(self, label: str = "") -> None:
        self.label = label
        self.divergence: Divergence | None = None
        self._batches = 0
        self._epoch_starts: list[int] = []  # the first batch number of each epoch
        self._first_bad: torch.Tensor | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_starts.append(self._batches + 1)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._batches += 1
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if self.divergence is not None or not isinstance(loss, torch.Tensor):
            return
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.int64, device=loss.device)
        bad = (self._first_bad < 0) & ~torch.isfinite(loss.detach()).all()
        self._first_bad = torch.where(bad, self._batches, self._first_bad)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read()

    def _read(self) -> None:
        if self.divergence is not None or self._first_bad is None:
            return
        first = int(self._first_bad)
        if first >= 0:
            epoch = sum(start <= first for start in self._epoch_starts) or 1
            self.divergence = Divergence(batch=first, epoch=epoch)
            rank_zero_warn(f"{self.label or 'run'}: the training loss is not finite from {self.divergence} on: "
                           "the run diverged (the results table marks it)")


@dataclass
class RunResult:
    """One run of the main job: ``metrics`` (test metrics, ``epochs``, ``optimizer.lr``, ``ms_per_step``),
    ``val_curve`` (``{metric: value after each epoch}``) and ``divergence`` (``None``: the training loss stayed
    finite)."""

    metrics: dict[str, float]
    val_curve: dict[str, list[float]] = field(default_factory=dict)
    divergence: Divergence | None = None

    def last_finite_validation(self) -> tuple[int, dict[str, float]] | None:
        """``(epoch from 1, {metric: value})`` of the last validation whose metrics are all finite; ``None``
        when there is none."""
        epochs = max((len(v) for v in self.val_curve.values()), default=0)
        for epoch in range(epochs, 0, -1):
            values = {k: v[epoch - 1] for k, v in self.val_curve.items() if len(v) >= epoch}
            if values and all(math.isfinite(x) for x in values.values()):
                return epoch, values
        return None

    def divergence_note(self) -> str:
        """One line for a diverged run: where the loss stopped being finite and its last finite validation."""
        if self.divergence is None:
            return ""
        last = self.last_finite_validation()
        tail = ("no finite validation" if last is None else f"last finite validation after epoch {last[0]}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in last[1].items()))
        return f"training loss not finite from {self.divergence} on; {tail}"


def _cell(value: float | None, fmt: str, non_finite: bool = False) -> str:
    """``-`` for a value not measured (``None``, or NaN when ``non_finite`` is false); with ``non_finite``,
    NaN and ±Inf are shown as they are (a test loss of ``nan`` is a result, not a gap)."""
    if value is None or (math.isnan(value) and not non_finite):
        return "-"
    return format(value, fmt)


def format_table(results: Mapping[str, RunResult], baseline: str | None = None) -> str:
    """One row per run: test accuracy and loss, epochs, learning rate, ms/step and, with a ``baseline`` run,
    each run's ms/step divided by the baseline's (column ``x <baseline>``). When a run diverged, a column
    ``diverged at`` (``-`` for the others) and, below the table, one line per diverged run
    (:meth:`RunResult.divergence_note`)."""
    rows = [["run", "test/acc", "test/loss", "epochs", "lr", "ms/step"]]
    for label, result in results.items():
        m = result.metrics
        rows.append([label, _cell(m.get("test/acc"), ".4f", True), _cell(m.get("test/loss"), ".4f", True),
                     _cell(m.get("epochs"), ".0f"), _cell(m.get("optimizer.lr"), ".4g"),
                     _cell(m.get("ms_per_step"), ".2f")])
    if baseline is not None:
        base_ms = results[baseline].metrics.get("ms_per_step", math.nan)
        rows[0].append(f"x {baseline}")
        for row, result in zip(rows[1:], results.values()):
            ratio = result.metrics.get("ms_per_step", math.nan) / base_ms if base_ms > 0 else math.nan
            row.append(_cell(ratio, ".2f"))
    diverged = {label: result for label, result in results.items() if result.divergence is not None}
    if diverged:
        rows[0].append("diverged at")
        for row, result in zip(rows[1:], results.values()):
            row.append(str(result.divergence) if result.divergence is not None else "-")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines += [f"{label} diverged: {result.divergence_note()}" for label, result in diverged.items()]
    return "\n".join(lines)


def plot_val_curves(results: Mapping[str, RunResult], path: str | Path, title: str = "") -> Path:
    """A PNG with one panel per validation metric, one line per run; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(key for result in results.values() for key in result.val_curve))
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(5 * max(len(keys), 1), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, result in results.items():
            values = result.val_curve.get(key, [])
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
