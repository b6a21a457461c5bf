"""Round-robin check of the main job's ms/step: the same runs, interleaved, several times.

    python benchmarks/main_job_timing.py                      # 5 rounds of the default main job
    python benchmarks/main_job_timing.py --rounds 3 trainer.max_epochs=4

``python -m lightning_seng.train`` runs SENG+SGD, then SGD, once each, and reports each run's mean training
step after its first epoch (:class:`lightning_seng.recipes.report.StepTimer`). Here the same runs (same config and
overrides) alternate ``rounds`` times, SENG+SGD then SGD in each round, so that load from other processes
on a shared machine falls on both alike. Printed: per run, the median over rounds of ms/step with the min
and max, and the ratio of the medians, to hold against the ratio the main job printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_seng.recipes.report import StepTimer  # noqa: E402
from lightning_seng.recipes.train import build, config_dir, plan_runs  # noqa: E402

QUIET = ["trainer.enable_progress_bar=false", "logger=none"]


def round_robin(overrides: list[str], rounds: int) -> dict[str, list[float]]:
    """``{label: [ms/step of each round]}`` for the runs of the main job under ``overrides``."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*QUIET, *overrides])
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for label, seng_cfg, optimizer_cfg in plan_runs(cfg):
            timer = StepTimer()
            module, datamodule, trainer = build(cfg, seng_cfg, optimizer_cfg, callbacks=[timer])
            trainer.fit(module, datamodule=datamodule)
            times.setdefault(label, []).append(timer.ms_per_step)
    return times


def table(times: dict[str, list[float]]) -> str:
    """Median, min and max ms/step per run and the ratio of each median to the last run's (the baseline)."""
    labels = list(times)
    base = statistics.median(times[labels[-1]])
    lines = [f"{'run':<10} {'ms/step (median)':>16} {'min':>7} {'max':>7} {'x ' + labels[-1]:>8}"]
    for label, ms in times.items():
        median = statistics.median(ms)
        lines.append(f"{label:<10} {median:>16.2f} {min(ms):>7.2f} {max(ms):>7.2f} {median / base:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m lightning_seng.train")
    args = parser.parse_args(argv)
    times = round_robin(args.overrides, args.rounds)
    print(f"Round-robin, {args.rounds} rounds; ms/step: median over epochs 2.. of the mean training step, per fit")
    print(table(times))


if __name__ == "__main__":
    main()
