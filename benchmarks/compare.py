"""Convergence and cost of SENG against SGD, AdamW, K-FAC, Shampoo and SOAP on scikit-learn's
digits (an MLP, a small CNN on 16x16 upsampled digits, and a deep autoencoder).

    python benchmarks/compare.py                      # the full run (16 minutes on one thread of a shared 2-core machine)
    python benchmarks/compare.py --config-name quick  # smoke run, under a minute
    python benchmarks/compare.py problems=[mlp] optimizers=[seng,sgd] seeds=[0]

Protocol, the same for every optimizer:
1. Tuning with an equal budget: every optimizer gets exactly ``trials`` trials over its own knobs
   (its ``search`` block: the learning rate for all, the damping for SENG and K-FAC, the weight
   decay where the recipe has one; see benchmarks/tuning.py). Each trial trains on the train
   split with seed ``search_seed`` and the same epoch budget and learning-rate ``schedule`` as
   the final runs. The chosen trial has the best area under the validation curve (mean
   validation accuracy over the epochs; mean log reconstruction error for the autoencoder), see
   ``search_score``. Diverged runs (non-finite loss) are never chosen unless every trial diverged.
2. Final runs: the chosen settings on train+validation, evaluated on the test split after
   every epoch, for every seed in ``seeds`` (the seed sets the initialisation, the batch order
   and the curvature sampling). Every seed is reported (seeds.csv, seeds.md), and the mean and
   standard deviation beside them (summary.csv, summary.md).

The learning-rate schedule (``schedule.name``: constant, cosine or poly, with an optional linear
warm-up; benchmarks/lr_schedule.py) is set every iteration and is the same for every optimizer.

Measured per run: the test metric and training loss after each epoch; training wall time (the
optimizer steps only: forward, backward, preconditioning, update; evaluation excluded);
milliseconds per step; and the peak resident memory the run added, as Linux's VmHWM (reset
through /proc/self/clear_refs before the run) minus VmRSS at the start of the run, after a
garbage collection and malloc_trim. Wall times come from one process on a shared machine with
``threads`` torch threads: read them as ratios, not absolutes.

Outputs in ``out_dir``: curves.csv (one row per epoch), search.csv (one row per trial), seeds.csv
and seeds.md (one row per final run), summary.csv, summary.md (mean ± std and ratios) and one PNG
per problem.
"""
from __future__ import annotations

import csv
import ctypes
import gc
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import lr_schedule  # noqa: E402
from benchmarks.peers import OPTIMIZERS, available, make_stepper  # noqa: E402
from benchmarks.problems import Problem, Split, build_problem, evaluate  # noqa: E402
from benchmarks.report import plot_problem, seeds_markdown, summary_markdown  # noqa: E402
from benchmarks.tuning import describe, grid_edge, parse, trial_points, with_knobs  # noqa: E402

CURVE_COLUMNS = ["problem", "optimizer", "seed", "lr", "settings", "epoch", "steps", "wall_s",
                 "train_loss", "test_loss", "test_metric", "metric_name"]
SEARCH_COLUMNS = ["problem", "optimizer", "trial", "settings", "lr", "damping", "weight_decay",
                  "diverged", "val_score", "val_epochs_to_target", "val_final_metric", "chosen",
                  "failure"]
SEED_COLUMNS = ["problem", "optimizer", "settings", "seed", "metric_name", "target",
                "epochs_to_target", "steps_to_target", "wall_to_target_s", "final_metric",
                "step_ms", "peak_rss_mib"]
SUMMARY_COLUMNS = ["problem", "optimizer", "settings", "grid_edge", "lr", "metric_name", "target", "seeds",
                   "seeds_reached", "epochs_to_target_mean", "epochs_to_target_std",
                   "wall_to_target_s_mean", "wall_to_target_s_std", "final_metric_mean",
                   "final_metric_std", "step_ms_mean", "step_ms_std", "peak_rss_mib_mean",
                   "peak_rss_mib_std", "epochs"]


@dataclass
class RunResult:
    """Per-epoch records of one training run; index 0 is the model before training."""

    problem: str
    optimizer: str
    seed: int
    lr: float
    settings: str = ""
    train_loss: list[float] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    eval_metric: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    diverged: bool = False
    failure: str = ""
    peak_rss_mib: float = float("nan")

    def epochs_to_target(self, problem: Problem) -> int | None:
        for epoch, value in enumerate(self.eval_metric):
            if problem.reached(value):
                return epoch
        return None

    @property
    def step_ms(self) -> float:
        return 1000.0 * self.wall_s[-1] / self.steps[-1] if self.steps[-1] else float("nan")


class PeakMemory:
    """Peak resident memory added by a block, in MiB.

    Linux: VmHWM after the block minus VmRSS before it, with the high-water mark reset by writing
    "5" to /proc/self/clear_refs. Elsewhere: the growth of ru_maxrss (a lifetime high-water mark,
    so later, smaller runs read 0)."""

    def __enter__(self):
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.use_proc = _proc_status("VmRSS") is not None
        if self.use_proc:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.use_proc = False
        self.start = _proc_status("VmRSS") if self.use_proc else _maxrss_kib()
        return self

    def __exit__(self, *exc):
        end = _proc_status("VmHWM") if self.use_proc else _maxrss_kib()
        self.mib = max(end - self.start, 0) / 1024.0
        return False


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def train_run(problem: Problem, optimizer: str, point: dict, seed: int, train: Split,
              held_out: Split, cfg: DictConfig) -> RunResult:
    """Train a fresh model with ``optimizer`` at the trial settings ``point`` ({knob: value},
    see benchmarks/tuning.py) for ``cfg.epochs[problem]`` epochs, the learning rate following
    ``cfg.schedule`` every iteration, and evaluate it on ``held_out`` after every epoch."""
    epochs = int(cfg.epochs[problem.name])
    batch_size = int(cfg.batch_size)
    lr = float(point["lr"])
    result = RunResult(problem.name, optimizer, seed, lr, describe(point))
    with PeakMemory() as mem:
        torch.manual_seed(seed)
        model = problem.make_model()
        stepper = make_stepper(optimizer, model, problem.loss_fn, lr,
                               with_knobs(cfg.optim[optimizer], point), seed,
                               problem.loss_kind, batch_size)
        shuffle = torch.Generator().manual_seed(seed)
        n_batches = len(train) // batch_size  # drop_last: every step sees batch_size samples
        scheduler = lr_schedule.attach(stepper.opt, cfg.schedule, n_batches, epochs)
        loss0, metric0 = evaluate(model, problem, held_out)
        result.train_loss.append(float(problem.loss_fn(model(train.x), train.y).detach()))
        result.eval_loss.append(loss0)
        result.eval_metric.append(metric0)
        result.wall_s.append(0.0)
        result.steps.append(0)
        wall, steps = 0.0, 0
        model.train()
        for epoch in range(epochs):
            stepper.set_epoch(epoch)
            order = torch.randperm(len(train), generator=shuffle)
            losses = []
            start = time.perf_counter()
            for b in range(n_batches):
                idx = order[b * batch_size:(b + 1) * batch_size]
                try:
                    loss = stepper.train_step(train.x[idx], train.y[idx])
                except (ValueError, RuntimeError) as err:
                    # Blown-up weights make K-FAC's Monte-Carlo sampling or its Cholesky fail:
                    # recorded as a divergence, with the message kept for search.csv.
                    result.failure = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                    print(f"  {problem.name} {optimizer} lr={lr:g} seed={seed}: step failed, "
                          f"counted as diverged ({result.failure})", flush=True)
                    loss = math.nan
                losses.append(loss)
                if not math.isfinite(loss):
                    break
                scheduler.step()
            wall += time.perf_counter() - start
            steps += len(losses)
            train_loss = sum(losses) / len(losses)
            eval_loss, metric = evaluate(model, problem, held_out)
            result.train_loss.append(train_loss)
            result.eval_loss.append(eval_loss)
            result.eval_metric.append(metric)
            result.wall_s.append(wall)
            result.steps.append(steps)
            if not (math.isfinite(train_loss) and math.isfinite(eval_loss)):
                result.diverged = True
                break
    result.peak_rss_mib = mem.mib
    return result


def search_score(run: RunResult, problem: Problem) -> float:
    """Area under the validation curve, lower is better: the mean over epochs 1..E of minus the
    accuracy (classifiers) or of the log reconstruction error (autoencoder). It rewards reaching
    a good value early and keeping it, and is far less noisy than the first epoch that crosses
    the target on a 144-image validation set. Diverged runs score +inf."""
    values = run.eval_metric[1:]
    if run.diverged or not values or not all(math.isfinite(v) for v in values):
        return math.inf
    if problem.higher_is_better:
        return -sum(values) / len(values)
    return sum(math.log(max(v, 1e-12)) for v in values) / len(values)


def search(problem: Problem, optimizer: str, cfg: DictConfig) -> tuple[dict, list[dict]]:
    """Run the optimizer's ``cfg.trials`` trials on train -> validation; return the chosen
    settings ({knob: value}) and one row per trial for search.csv."""
    points = trial_points(optimizer, cfg.optim[optimizer].search, int(cfg.trials),
                          int(cfg.search_seed))
    runs = [train_run(problem, optimizer, point, int(cfg.search_seed), problem.train,
                      problem.val, cfg) for point in points]
    best = min(range(len(runs)), key=lambda i: search_score(runs[i], problem))
    rows = []
    for i, (point, run) in enumerate(zip(points, runs)):
        reached = run.epochs_to_target(problem)
        rows.append(dict(problem=problem.name, optimizer=optimizer, trial=i,
                         settings=run.settings, lr=point["lr"],
                         damping=point.get("damping", ""),
                         weight_decay=point.get("weight_decay", ""),
                         diverged=run.diverged, val_score=search_score(run, problem),
                         val_epochs_to_target="" if reached is None else reached,
                         val_final_metric=run.eval_metric[-1], chosen=i == best,
                         failure=run.failure))
    return points[best], rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return values[0], 0.0
    return statistics.fmean(values), statistics.stdev(values)


def summarize(problem: Problem, optimizer: str, runs: list[RunResult], cfg: DictConfig) -> dict:
    """Mean and sample standard deviation over seeds. Epochs and wall time to target average the
    seeds that reached the target (``seeds_reached`` says how many did)."""
    to_target = [r.epochs_to_target(problem) for r in runs]
    reached = [(r, e) for r, e in zip(runs, to_target) if e is not None]
    ep_mean, ep_std = _mean_std([e for _, e in reached])
    wall_mean, wall_std = _mean_std([r.wall_s[e] for r, e in reached])
    final_mean, final_std = _mean_std([r.eval_metric[-1] for r in runs])
    step_mean, step_std = _mean_std([r.step_ms for r in runs])
    mem_mean, mem_std = _mean_std([r.peak_rss_mib for r in runs])
    return dict(problem=problem.name, optimizer=optimizer, settings=runs[0].settings,
                lr=runs[0].lr, metric_name=problem.metric_name, target=problem.target, seeds=len(runs),
                seeds_reached=len(reached), epochs_to_target_mean=ep_mean,
                epochs_to_target_std=ep_std, wall_to_target_s_mean=wall_mean,
                wall_to_target_s_std=wall_std, final_metric_mean=final_mean,
                final_metric_std=final_std, step_ms_mean=step_mean, step_ms_std=step_std,
                peak_rss_mib_mean=mem_mean, peak_rss_mib_std=mem_std,
                epochs=int(cfg.epochs[problem.name]))


def seed_row(problem: Problem, run: RunResult) -> dict:
    """One final run as a row of seeds.csv: epochs, steps and wall time to the target (empty
    when the run never reached it), the final metric, ms per step and peak memory."""
    e = run.epochs_to_target(problem)
    return dict(problem=run.problem, optimizer=run.optimizer, settings=run.settings,
                seed=run.seed, metric_name=problem.metric_name, target=problem.target,
                epochs_to_target="" if e is None else e,
                steps_to_target="" if e is None else run.steps[e],
                wall_to_target_s="" if e is None else run.wall_s[e],
                final_metric=run.eval_metric[-1], step_ms=run.step_ms,
                peak_rss_mib=run.peak_rss_mib)


def _curve_rows(problem: Problem, run: RunResult) -> list[dict]:
    return [dict(problem=run.problem, optimizer=run.optimizer, seed=run.seed, lr=run.lr,
                 settings=run.settings, epoch=e, steps=run.steps[e], wall_s=run.wall_s[e],
                 train_loss=run.train_loss[e], test_loss=run.eval_loss[e],
                 test_metric=run.eval_metric[e], metric_name=problem.metric_name)
            for e in range(len(run.eval_metric))]


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})


def _validate(cfg: DictConfig) -> None:
    for name in cfg.optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizers must be drawn from {list(OPTIMIZERS)} (got {name!r})")
        # raises, naming the key, on an unknown knob or a grid smaller than the trial budget
        trial_points(name, cfg.optim[name].search, int(cfg.trials), int(cfg.search_seed))
    if not cfg.seeds:
        raise ValueError("seeds must hold at least one seed (got [])")
    lr_schedule.check_schedule(cfg.schedule)


def run(cfg: DictConfig) -> dict[str, list[dict]]:
    """Run the whole comparison described by ``cfg`` and write its outputs to ``cfg.out_dir``."""
    _validate(cfg)
    torch.set_num_threads(int(cfg.threads))
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    available_names = available(cfg.optimizers)
    curves, searches, seed_rows, summaries = [], [], [], []
    for problem_name in cfg.problems:
        problem = build_problem(problem_name, cfg.problem[problem_name])
        runs_by_opt: dict[str, list[RunResult]] = {}
        for optimizer in available_names:
            t0 = time.perf_counter()
            point, rows = search(problem, optimizer, cfg)
            searches.extend(rows)
            runs = [train_run(problem, optimizer, point, int(seed), problem.train_full,
                              problem.test, cfg) for seed in cfg.seeds]
            runs_by_opt[optimizer] = runs
            for r in runs:
                curves.extend(_curve_rows(problem, r))
                seed_rows.append(seed_row(problem, r))
            summary = summarize(problem, optimizer, runs, cfg)
            summary["grid_edge"] = grid_edge([parse(r["settings"]) for r in rows], point)
            summaries.append(summary)
            print(f"[{problem.name:11s}] {optimizer:7s} {describe(point):28s} "
                  f"reached {summary['seeds_reached']}/{summary['seeds']}  "
                  f"epochs->target {summary['epochs_to_target_mean']:.1f}  "
                  f"final {problem.metric_name} {summary['final_metric_mean']:.4f}  "
                  f"{summary['step_ms_mean']:.1f} ms/step  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
        if runs_by_opt and cfg.plots:
            plot_problem(problem, runs_by_opt, out_dir / f"{problem.name}.png")
        _write_csv(out_dir / "curves.csv", CURVE_COLUMNS, curves)
        _write_csv(out_dir / "search.csv", SEARCH_COLUMNS, searches)
        _write_csv(out_dir / "seeds.csv", SEED_COLUMNS, seed_rows)
        _write_csv(out_dir / "summary.csv", SUMMARY_COLUMNS, summaries)
    table = summary_markdown(summaries, cfg)
    (out_dir / "summary.md").write_text(table)
    per_seed = seeds_markdown(seed_rows)
    (out_dir / "seeds.md").write_text(per_seed)
    print(table)
    print(per_seed)
    return dict(curves=curves, search=searches, seeds=seed_rows, summary=summaries)


@hydra.main(version_base="1.3", config_path="conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg), flush=True)
    run(cfg)


if __name__ == "__main__":
    main()
