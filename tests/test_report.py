"""The main job's report: step times after warm-up (on a fake clock), validation curves, the table and the plot."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

import torch

from lightning_seng.recipes.report import (Divergence, DivergenceMonitor, RunResult, StepTimer, ValidationCurve, format_table,
                                   plot_val_curves)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_epochs(timer: StepTimer, clock: FakeClock, seconds_per_epoch: list[list[float]]) -> None:
    """Drive ``timer``'s hooks as Lightning does; each step takes the given seconds on ``clock``."""
    for steps in seconds_per_epoch:
        timer.on_train_epoch_start(None, None)
        for i, seconds in enumerate(steps):
            timer.on_train_batch_start(None, None, None, i)
            clock.now += seconds
            timer.on_train_batch_end(None, None, None, None, i)
            clock.now += 0.5  # time between steps (data loading, validation) is not a step's


def test_step_timer_leaves_out_the_warmup_epoch():
    clock = FakeClock()
    timer = StepTimer(warmup_epochs=1, clock=clock)
    run_epochs(timer, clock, [[1.0, 0.5], [0.002, 0.004], [0.003, 0.003]])
    assert timer.ms_per_step == pytest.approx(3.0)


def test_step_timer_is_the_median_of_epoch_means_so_one_slow_epoch_does_not_move_it():
    clock = FakeClock()
    timer = StepTimer(warmup_epochs=1, clock=clock)
    run_epochs(timer, clock, [[1.0], [0.002, 0.002], [0.5, 0.5], [0.002, 0.002]])
    assert timer.ms_per_step == pytest.approx(2.0)


def test_step_timer_counts_refresh_steps_at_their_rate_within_an_epoch():
    clock = FakeClock()
    timer = StepTimer(warmup_epochs=0, clock=clock)
    run_epochs(timer, clock, [[0.010, 0.001, 0.001, 0.001, 0.001]])
    assert timer.ms_per_step == pytest.approx(2.8)


def test_step_timer_reports_nan_when_the_run_has_only_warmup_epochs():
    clock = FakeClock()
    timer = StepTimer(warmup_epochs=1, clock=clock)
    run_epochs(timer, clock, [[0.001, 0.001]])
    assert math.isnan(timer.ms_per_step)


def test_validation_curve_records_each_validation_and_skips_the_sanity_check():
    curve = ValidationCurve()
    for sanity, loss, acc in [(True, 9.0, 0.0), (False, 1.0, 0.5), (False, 0.5, 0.75)]:
        trainer = SimpleNamespace(sanity_checking=sanity, callback_metrics={"val/loss": loss, "val/acc": acc})
        curve.on_validation_end(trainer, None)
    assert curve.curves == {"val/loss": [1.0, 0.5], "val/acc": [0.5, 0.75]}


def _results() -> dict[str, RunResult]:
    curve = {"val/loss": [1.0, 0.5], "val/acc": [0.6, 0.8]}
    return {
        "SENG+SGD": RunResult({"test/acc": 0.975, "test/loss": 0.07, "epochs": 10, "optimizer.lr": 0.05,
                               "ms_per_step": 3.0}, curve),
        "SGD": RunResult({"test/acc": 0.97, "test/loss": 0.08, "epochs": 10, "optimizer.lr": 0.05,
                          "ms_per_step": 2.0}, curve),
    }


def test_table_has_one_row_per_run_and_the_ratio_of_ms_per_step_to_the_baseline():
    lines = format_table(_results(), baseline="SGD").splitlines()
    assert lines[0].split() == ["run", "test/acc", "test/loss", "epochs", "lr", "ms/step", "x", "SGD"]
    assert lines[1].split() == ["SENG+SGD", "0.9750", "0.0700", "10", "0.05", "3.00", "1.50"]
    assert lines[2].split() == ["SGD", "0.9700", "0.0800", "10", "0.05", "2.00", "1.00"]


def test_table_without_a_baseline_has_no_ratio_column_and_shows_unmeasured_times_as_a_dash():
    results = {"SENG+SGD": RunResult({"test/acc": 0.9, "test/loss": 0.3, "epochs": 1, "optimizer.lr": 0.1,
                                      "ms_per_step": math.nan})}
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["run", "test/acc", "test/loss", "epochs", "lr", "ms/step"]
    assert lines[1].split()[-1] == "-"


def test_plot_writes_a_png(tmp_path):
    path = plot_val_curves(_results(), tmp_path / "val_curves.png", title="digits")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _monitor_epochs(monitor: DivergenceMonitor, losses_per_epoch: list[list[float]]) -> None:
    """Drive ``monitor``'s hooks as Lightning does, with each batch's loss as ``outputs["loss"]``."""
    for losses in losses_per_epoch:
        monitor.on_train_epoch_start(None, None)
        for i, loss in enumerate(losses):
            monitor.on_train_batch_end(None, None, {"loss": torch.tensor(loss)}, None, i)
        monitor.on_train_epoch_end(None, None)


def test_divergence_monitor_names_the_first_batch_and_epoch_of_a_non_finite_loss():
    monitor = DivergenceMonitor("SENG+SGD")
    with pytest.warns(UserWarning, match=r"SENG\+SGD: the training loss is not finite from epoch 2 \(batch 5\)"):
        _monitor_epochs(monitor, [[2.0, 1.5, 1.0], [0.9, math.nan, 0.8], [math.inf, math.nan, math.nan]])
    assert monitor.divergence == Divergence(batch=5, epoch=2)


def test_divergence_monitor_counts_an_infinite_loss_and_leaves_a_finite_run_unmarked(recwarn):
    finite, infinite = DivergenceMonitor(), DivergenceMonitor()
    _monitor_epochs(finite, [[2.0, 1e30], [1e-30, 0.5]])
    assert finite.divergence is None and not recwarn.list
    with pytest.warns(UserWarning):
        _monitor_epochs(infinite, [[2.0, -math.inf]])
    assert infinite.divergence == Divergence(batch=2, epoch=1)


def test_divergence_monitor_reads_the_flag_when_the_fit_stops_inside_an_epoch():
    monitor = DivergenceMonitor()
    monitor.on_train_epoch_start(None, None)
    for i, loss in enumerate([1.0, 0.5]):
        monitor.on_train_batch_end(None, None, {"loss": torch.tensor(loss)}, None, i)
    monitor.on_train_epoch_end(None, None)
    monitor.on_train_epoch_start(None, None)
    monitor.on_train_batch_end(None, None, {"loss": torch.tensor(math.nan)}, None, 0)  # max_steps reached here
    with pytest.warns(UserWarning):
        monitor.on_train_end(None, None)
    assert monitor.divergence == Divergence(batch=3, epoch=2)


def test_divergence_monitor_warns_once():
    monitor = DivergenceMonitor()
    with pytest.warns(UserWarning) as record:
        _monitor_epochs(monitor, [[math.nan], [math.nan], [math.nan]])
    assert len(record) == 1 and monitor.divergence == Divergence(batch=1, epoch=1)


def _diverged() -> dict[str, RunResult]:
    results = _results()
    results["SENG+SGD"] = RunResult({"test/acc": 0.1, "test/loss": math.nan, "epochs": 10, "optimizer.lr": 0.05,
                                     "ms_per_step": 3.0},
                                    {"val/loss": [1.0, 0.4, math.nan], "val/acc": [0.6, 0.9, 0.1]},
                                    Divergence(batch=40, epoch=3))
    return results


def test_table_marks_a_diverged_run_with_where_it_diverged_and_shows_its_loss_as_nan():
    lines = format_table(_diverged(), baseline="SGD").splitlines()
    assert lines[0].split()[-3:] == ["SGD", "diverged", "at"]
    assert lines[1].split() == ["SENG+SGD", "0.1000", "nan", "10", "0.05", "3.00", "1.50", "epoch", "3", "(batch", "40)"]
    assert lines[2].split()[-1] == "-"


def test_table_names_the_last_finite_validation_of_a_diverged_run():
    last = format_table(_diverged(), baseline="SGD").splitlines()[-1]
    assert last == ("SENG+SGD diverged: training loss not finite from epoch 3 (batch 40) on; "
                    "last finite validation after epoch 2: val/loss 0.4000, val/acc 0.9000")


def test_table_of_runs_that_did_not_diverge_has_no_divergence_column():
    assert "diverged" not in format_table(_results(), baseline="SGD")
