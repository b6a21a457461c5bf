"""How hard SENG is to tune: its final validation metric on a learning-rate x damping grid.

    python benchmarks/sensitivity.py                        # grid and problems from compare.yaml
    python benchmarks/sensitivity.py sensitivity.problems=[cnn] schedule.name=constant

Every cell is one training run of compare.py's ``train_run`` (train split -> validation split,
seed ``sensitivity.seed``, the problem's epoch budget, the configured learning-rate
``schedule``, SENG's other settings from ``optim.seng``). SENG's step is roughly g/λ in
directions without curvature, so the effective step size is about lr/λ: expect a ridge along
the diagonals of the grid. Outputs in ``out_dir``: sensitivity.csv (one row per cell, with the
area-under-the-curve score compare.py tunes on) and sensitivity_<problem>.png (heatmap of the
final validation metric; a cell marked "div" diverged).
"""
from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.compare import search_score, train_run  # noqa: E402
from benchmarks.problems import build_problem  # noqa: E402
from benchmarks.report import METRIC_LABELS  # noqa: E402

COLUMNS = ["problem", "lr", "damping", "lr_over_damping", "seed", "diverged",
           "val_final_metric", "val_best_metric", "val_score", "val_epochs_to_target",
           "metric_name", "target", "schedule", "epochs"]


def _validate(cfg: DictConfig) -> None:
    sens = cfg.sensitivity
    for key in ("lr", "damping"):
        values = list(sens[key])
        if not values or any(float(v) <= 0 for v in values):
            raise ValueError(f"sensitivity.{key} must be a non-empty list of positive values "
                             f"(got {values!r})")
    if not sens.problems:
        raise ValueError("sensitivity.problems must name at least one problem (got [])")


def sweep(problem, cfg: DictConfig) -> list[dict]:
    """One run per (lr, damping) cell; rows in lr-major order."""
    rows = []
    seed = int(cfg.sensitivity.seed)
    for lr in cfg.sensitivity.lr:
        for damping in cfg.sensitivity.damping:
            point = {"lr": float(lr), "damping": float(damping)}
            t0 = time.perf_counter()
            run = train_run(problem, "seng", point, seed, problem.train, problem.val, cfg)
            reached = run.epochs_to_target(problem)
            finite = [v for v in run.eval_metric[1:] if math.isfinite(v)]
            best = (max(finite) if problem.higher_is_better else min(finite)) if finite else math.nan
            rows.append(dict(problem=problem.name, lr=point["lr"], damping=point["damping"],
                             lr_over_damping=point["lr"] / point["damping"], seed=seed,
                             diverged=run.diverged, val_final_metric=run.eval_metric[-1],
                             val_best_metric=best, val_score=search_score(run, problem),
                             val_epochs_to_target="" if reached is None else reached,
                             metric_name=problem.metric_name, target=problem.target,
                             schedule=str(cfg.schedule.name), epochs=int(cfg.epochs[problem.name])))
            print(f"[{problem.name}] lr={lr:<6g} damping={damping:<6g} "
                  f"final {problem.metric_name} {run.eval_metric[-1]:.4f}"
                  f"{'  diverged' if run.diverged else ''}  ({time.perf_counter() - t0:.1f}s)",
                  flush=True)
    return rows


def plot_heatmap(rows: list[dict], path: Path, damping_label: str = "damping λ") -> None:
    """Heatmap of the final validation metric: damping on x, lr on y, values written in cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({r["lr"] for r in rows})
    dampings = sorted({r["damping"] for r in rows})
    cell = {(r["lr"], r["damping"]): r for r in rows}
    first = rows[0]
    higher = first["metric_name"] == "test_acc"
    grid = [[math.nan if cell[(lr, d)]["diverged"] else cell[(lr, d)]["val_final_metric"]
             for d in dampings] for lr in lrs]
    fig, ax = plt.subplots(figsize=(1.3 * len(dampings) + 2.5, 1.0 * len(lrs) + 1.8))
    cmap = plt.get_cmap("viridis" if higher else "viridis_r").copy()
    cmap.set_bad("#bbbbbb")
    image = ax.imshow(grid, cmap=cmap, origin="lower", aspect="auto",
                      vmin=0.0 if higher else None, vmax=1.0 if higher else None)
    for i, lr in enumerate(lrs):
        for j, d in enumerate(dampings):
            r = cell[(lr, d)]
            reached = r["val_epochs_to_target"] != ""
            text = "div" if r["diverged"] else f"{r['val_final_metric']:.3f}" + ("*" if reached else "")
            value = grid[i][j]
            light = math.isfinite(value) and (value < 0.6 if higher else False)
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if light else "black")
    ax.set_xticks(range(len(dampings)), [f"{d:g}" for d in dampings])
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_xlabel(damping_label)
    ax.set_ylabel("learning rate")
    label = METRIC_LABELS.get(first["metric_name"], first["metric_name"]).replace("test", "validation")
    fig.colorbar(image, ax=ax, label=f"final {label}")
    ax.set_title(f"SENG on {first['problem']}: final {label} after {first['epochs']} epochs "
                 f"({first['schedule']} lr)\n* = reached the target {first['target']:g} "
                 f"on validation; grey = diverged", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: DictConfig) -> list[dict]:
    _validate(cfg)
    torch.set_num_threads(int(cfg.threads))
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in cfg.sensitivity.problems:
        problem = build_problem(name, cfg.problem[name])
        problem_rows = sweep(problem, cfg)
        rows += problem_rows
        if cfg.plots:
            adaptive = cfg.optim.seng.get("damping_adaptation", "constant") == "lm"
            plot_heatmap(problem_rows, out_dir / f"sensitivity_{name}.png",
                         "initial damping λ₀ (Levenberg–Marquardt)" if adaptive else "damping λ")
    with open(out_dir / "sensitivity.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return rows


@hydra.main(version_base="1.3", config_path="conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
