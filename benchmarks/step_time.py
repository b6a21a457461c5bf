"""Per-step cost of every optimizer, measured round-robin so that load from other processes on a
shared machine hits all optimizers alike.

    python benchmarks/step_time.py                    # reads benchmarks/results/summary.csv
    python benchmarks/step_time.py step_time.rounds=5 step_time.steps=20

For each problem, every optimizer (with the settings compare.py chose, read from
``summary.csv``) gets a model of its own; then ``rounds`` times, each optimizer in turn runs
``steps`` training steps (``step_time`` block of conf/compare.yaml) (a multiple of the curvature refresh interval, so refresh steps count at
their real rate) on batches of ``batch_size``. The reported time is the median over rounds of the
mean step time, with the min and max, and the wall time to target that step time implies with
the epochs compare.py measured; written to ``step_time.csv`` and ``step_time.md`` beside
summary.csv. The learning rate follows ``schedule`` as in compare.py (the steps of all rounds
count as one run); a model that blows up (non-finite loss, or a failed factorisation) is rebuilt
and that round is left out (counted in ``rounds_restarted``).
"""
from __future__ import annotations

import csv
import math
import statistics
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import lr_schedule  # noqa: E402
from benchmarks.peers import make_stepper, missing_reason  # noqa: E402
from benchmarks.problems import build_problem  # noqa: E402
from benchmarks.report import LABELS  # noqa: E402
from benchmarks.tuning import parse, with_knobs  # noqa: E402

COLUMNS = ["problem", "optimizer", "lr", "steps_per_round", "rounds", "step_ms_median",
           "step_ms_min", "step_ms_max", "vs_sgd", "epochs_to_target_mean",
           "est_wall_to_target_s", "rounds_restarted"]


def read_summary(summary_csv: Path) -> dict[tuple[str, str], dict]:
    with open(summary_csv, newline="") as f:
        return {(r["problem"], r["optimizer"]): r for r in csv.DictReader(f)}


def time_problem(problem, summary: dict, cfg: DictConfig) -> list[dict]:
    """Round-robin step times of every optimizer in ``summary`` on ``problem``, and the wall time
    to target they imply: ``est_wall_to_target_s = epochs_to_target_mean x steps per epoch x
    step_ms_median`` (an estimate from the measured epochs and these steadier step times)."""
    points = {key: parse(row["settings"]) if row.get("settings") else {"lr": float(row["lr"])}
              for key, row in summary.items()}
    lrs = {key: point["lr"] for key, point in points.items()}
    batch_size = int(cfg.batch_size)
    steps, rounds = int(cfg.step_time.steps), int(cfg.step_time.rounds)
    data = problem.train_full
    n_batches = len(data) // batch_size

    def build(name: str):
        torch.manual_seed(0)
        model = problem.make_model()
        stepper = make_stepper(name, model, problem.loss_fn, lrs[(problem.name, name)],
                               with_knobs(cfg.optim[name], points[(problem.name, name)]),
                               0, problem.loss_kind, batch_size)
        return stepper, lr_schedule.attach(stepper.opt, cfg.schedule, n_batches,
                                           int(cfg.epochs[problem.name]))

    steppers, orders = {}, {}
    for name in cfg.optimizers:
        if (problem.name, name) not in summary or missing_reason(name) is not None:
            continue
        steppers[name] = build(name)
        orders[name] = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in steppers}
    restarts = {name: 0 for name in steppers}
    for r in range(rounds + 1):  # round 0 warms up (first-call allocations, lazy inits)
        for name in steppers:
            start = time.perf_counter()
            try:
                for s in range(steps):
                    b = (r * steps + s) % n_batches
                    idx = orders[name][b * batch_size:(b + 1) * batch_size]
                    stepper, scheduler = steppers[name]
                    if not math.isfinite(stepper.train_step(data.x[idx], data.y[idx])):
                        raise FloatingPointError("non-finite loss")
                    scheduler.step()
            except (ValueError, RuntimeError, FloatingPointError):
                # A model that blows up (K-FAC's Cholesky then fails) is started afresh and
                # this round is left out.
                steppers[name] = build(name)
                restarts[name] += 1
                continue
            if r > 0:
                times[name].append(1000.0 * (time.perf_counter() - start) / steps)
    sgd = statistics.median(times["sgd"]) if "sgd" in times else float("nan")
    rows = []
    for name, ts in times.items():
        if not ts:
            print(f"{problem.name} {name}: every round blew up; no step time", flush=True)
            continue
        med = statistics.median(ts)
        epochs = float(summary[(problem.name, name)]["epochs_to_target_mean"])
        rows.append(dict(problem=problem.name, optimizer=name, lr=lrs[(problem.name, name)],
                         steps_per_round=steps, rounds=rounds, step_ms_median=med,
                         step_ms_min=min(ts), step_ms_max=max(ts), vs_sgd=med / sgd,
                         epochs_to_target_mean=epochs,
                         est_wall_to_target_s=epochs * n_batches * med / 1000.0,
                         rounds_restarted=restarts[name]))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| problem | optimizer | ms / step (median) | min – max | × SGD | "
             "est. wall s to target | rounds left out |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        est = r["est_wall_to_target_s"]
        lines.append(f"| {r['problem']} | {LABELS.get(r['optimizer'], r['optimizer'])} | "
                     f"{r['step_ms_median']:.1f} | {r['step_ms_min']:.1f} – {r['step_ms_max']:.1f} | "
                     f"{r['vs_sgd']:.2f} | {'—' if est != est else f'{est:.2f}'} | "
                     f"{r['rounds_restarted']} |")
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path="conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.threads))
    out_dir = Path(cfg.out_dir)
    summary = read_summary(out_dir / "summary.csv")
    rows = []
    for problem_name in cfg.problems:
        rows += time_problem(build_problem(problem_name, cfg.problem[problem_name]), summary, cfg)
    with open(out_dir / "step_time.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    table = markdown(rows)
    (out_dir / "step_time.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
