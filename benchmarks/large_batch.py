"""Steps to target against batch size: the large-batch regime, where a second-order method is
expected to keep its per-step progress after SGD's curve has flattened.

    python benchmarks/large_batch.py                                   # conf/large_batch.yaml
    python benchmarks/large_batch.py batch_sizes=[256,4096] seeds=[0]  # a smaller run

Problem: benchmarks/teacher.py (a generated teacher-network classification, ``data.n_train``
samples, at least 20 steps per epoch at the largest batch; checked). For every batch size B and
optimizer:

1. Tuning, the same budget for all: ``trials`` trials drawn from the optimizer's own ``search``
   grid (benchmarks/tuning.py: lr for all, damping for SENG and K-FAC). The learning-rate values
   are scaled by (B / ``ref_batch``) ** ``lr_scaling`` for every optimizer alike, so one grid
   follows the batch size. Each trial trains with seed ``search_seed`` and is evaluated on the
   validation split at the steps of a geometric grid (``evals_per_octave`` points per doubling);
   it stops at the first evaluation at or past ``target``. The chosen trial has the fewest steps
   to target (ties and misses: the best validation accuracy seen).
2. Final runs: the chosen settings for every seed in ``seeds``, evaluated on the test split,
   stopping at the target. Reported per seed: steps and training wall time (forward, backward,
   preconditioning, update; no evaluation) to the target.

The step budget is ``min(budget_epochs * steps_per_epoch, max_steps)``. SENG builds its
curvature from ``min(B, optim.seng.curvature_samples_max)`` samples of the refresh batch
(``curvature_samples``). The learning-rate ``schedule`` is the same for every optimizer.

Outputs in ``out_dir``: trials.csv (every trial), runs.csv (every final run), curves.csv (the
evaluations of every final run), large_batch.md (tables) and large_batch.png (steps and wall
time to target against batch size, median over seeds).
"""
from __future__ import annotations

import csv
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import lr_schedule  # noqa: E402
from benchmarks.peers import OPTIMIZERS, available, make_stepper  # noqa: E402
from benchmarks.problems import Split  # noqa: E402
from benchmarks.report import COLORS, LABELS, write_csv  # noqa: E402
from benchmarks.teacher import make_splits, make_student  # noqa: E402
from benchmarks.tuning import describe, grid_edge, parse, trial_points, with_knobs  # noqa: E402

TRIAL_COLUMNS = ["batch_size", "optimizer", "trial", "settings", "lr", "damping",
                 "curvature_samples", "steps_to_target", "wall_to_target_s", "best_val_acc",
                 "steps_run", "diverged", "chosen"]
RUN_COLUMNS = ["batch_size", "optimizer", "settings", "grid_edge", "curvature_samples", "seed",
               "steps_to_target", "wall_to_target_s", "best_test_acc", "steps_run", "diverged",
               "step_ms"]
CURVE_COLUMNS = ["batch_size", "optimizer", "seed", "step", "wall_s", "test_acc"]


@dataclass
class Run:
    """The evaluations of one run: after ``steps[i]`` steps and ``wall_s[i]`` seconds of
    training, accuracy ``acc[i]`` on the monitored split."""

    steps: list[int] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)
    diverged: bool = False
    steps_run: int = 0
    train_s: float = 0.0

    def to_target(self, target: float) -> tuple[int | None, float | None]:
        """(steps, wall seconds) at the first evaluation at or past ``target``."""
        i = first_reaching(self.acc, target)
        return (None, None) if i is None else (self.steps[i], self.wall_s[i])

    @property
    def best(self) -> float:
        finite = [a for a in self.acc if math.isfinite(a)]
        return max(finite) if finite else math.nan

    @property
    def step_ms(self) -> float:
        return 1000.0 * self.train_s / self.steps_run if self.steps_run else math.nan


def first_reaching(values: list[float], target: float) -> int | None:
    """Index of the first value >= ``target``, None if there is none."""
    for i, v in enumerate(values):
        if v >= target:
            return i
    return None


def steps_to_target(steps: list[int], values: list[float], target: float) -> int | None:
    """Steps at the first evaluation at or past ``target`` (None if never): steps-to-target of
    a curve evaluated after ``steps[i]`` steps with value ``values[i]``."""
    i = first_reaching(values, target)
    return None if i is None else steps[i]


def eval_steps(max_steps: int, per_octave: int) -> list[int]:
    """The steps after which a run is evaluated: round(2 ** (k / per_octave)) for k = 0, 1, ...,
    deduplicated, up to and including ``max_steps``."""
    points, k = set(), 0
    while True:
        s = round(2.0 ** (k / per_octave))
        if s >= max_steps:
            break
        points.add(s)
        k += 1
    points.add(max_steps)
    return sorted(points)


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: Split) -> float:
    was_training = model.training
    model.eval()
    acc = float((model(split.x).argmax(dim=1) == split.y).float().mean())
    model.train(was_training)
    return acc


def curvature_samples(batch_size: int, cfg: DictConfig) -> int | None:
    """SENG's ``curvature_samples`` at this batch size: None (all) up to the cap, then the cap."""
    cap = cfg.optim.seng.get("curvature_samples_max")
    return None if cap is None or batch_size <= int(cap) else int(cap)


def scaled(point: dict, batch_size: int, cfg: DictConfig) -> dict:
    """The trial's knobs with the learning rate scaled to this batch size."""
    factor = (batch_size / float(cfg.ref_batch)) ** float(cfg.lr_scaling)
    return {**point, "lr": point["lr"] * factor}


def train_to_target(optimizer: str, point: dict, seed: int, batch_size: int, train: Split,
                    monitor: Split, cfg: DictConfig) -> Run:
    """Train a fresh student with ``optimizer`` at ``point`` and batch ``batch_size``, evaluate
    on ``monitor`` at the geometric step grid, stop at the target, the step budget or a
    non-finite loss."""
    steps_per_epoch = len(train) // batch_size
    max_steps = min(int(cfg.budget_epochs) * steps_per_epoch, int(cfg.max_steps))
    checkpoints = eval_steps(max_steps, int(cfg.evals_per_octave))
    target = float(cfg.target)
    block = with_knobs(cfg.optim[optimizer], point)
    if optimizer in ("seng", "seng_mc"):
        block = OmegaConf.merge(block, {"curvature_samples": curvature_samples(batch_size, cfg)})
        block.pop("curvature_samples_max", None)
    torch.manual_seed(seed)
    model = make_student(int(cfg.data.dim), int(cfg.data.classes), int(cfg.model.width),
                         int(cfg.model.depth))
    stepper = make_stepper(optimizer, model, F.cross_entropy, float(point["lr"]), block, seed,
                           "cross_entropy", batch_size)
    scheduler = lr_schedule.attach(stepper.opt, cfg.schedule, steps_per_epoch,
                                   max_steps / steps_per_epoch)
    shuffle = torch.Generator().manual_seed(seed)
    run = Run(steps=[0], wall_s=[0.0], acc=[accuracy(model, monitor)])
    order, b, next_eval = None, steps_per_epoch, 0
    model.train()
    while run.steps_run < max_steps:
        start = time.perf_counter()
        stop = checkpoints[next_eval]
        while run.steps_run < stop:
            if b == steps_per_epoch:
                order, b = torch.randperm(len(train), generator=shuffle), 0
            idx = order[b * batch_size:(b + 1) * batch_size]
            b += 1
            try:
                loss = stepper.train_step(train.x[idx], train.y[idx])
            except (ValueError, RuntimeError):
                loss = math.nan  # K-FAC's sampling or Cholesky fails on blown-up weights
            run.steps_run += 1
            if not math.isfinite(loss):
                run.diverged = True
                break
            scheduler.step()
        run.train_s += time.perf_counter() - start
        if run.diverged:
            break
        run.steps.append(run.steps_run)
        run.wall_s.append(run.train_s)
        run.acc.append(accuracy(model, monitor))
        next_eval += 1
        if run.acc[-1] >= target:
            break
    return run


def _trial_key(run: Run, target: float) -> tuple[float, float]:
    steps, _ = run.to_target(target)
    return (math.inf if steps is None else steps, -run.best if math.isfinite(run.best) else 0.0)


def _median(values: list) -> float:
    return statistics.median(values) if values else math.nan


def _validate(cfg: DictConfig, n_train: int) -> None:
    for name in cfg.optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizers must be drawn from {list(OPTIMIZERS)} (got {name!r})")
        trial_points(name, cfg.optim[name].search, int(cfg.trials), int(cfg.search_seed))
    if not cfg.batch_sizes or any(int(b) < 1 for b in cfg.batch_sizes):
        raise ValueError(f"batch_sizes must be a non-empty list of positive integers "
                         f"(got {list(cfg.batch_sizes)!r})")
    largest = max(int(b) for b in cfg.batch_sizes)
    if n_train // largest < int(cfg.min_steps_per_epoch):
        raise ValueError(f"data.n_train={n_train} leaves {n_train // largest} steps per epoch at "
                         f"batch size {largest}; at least min_steps_per_epoch="
                         f"{cfg.min_steps_per_epoch} are required")
    if not cfg.seeds:
        raise ValueError("seeds must hold at least one seed (got [])")
    if not 0.0 < float(cfg.target) <= 1.0:
        raise ValueError(f"target must be an accuracy in (0, 1] (got {cfg.target!r})")
    lr_schedule.check_schedule(cfg.schedule)


def summarize(runs: list[dict], batch_sizes: list[int], optimizers: list[str]) -> list[dict]:
    """Per batch size and optimizer: how many seeds reached the target, and the median steps and
    wall seconds to target over the seeds (nan unless every seed reached it)."""
    rows = []
    for bs in batch_sizes:
        for name in optimizers:
            mine = [r for r in runs if r["batch_size"] == bs and r["optimizer"] == name]
            if not mine:
                continue
            reached = [r for r in mine if r["steps_to_target"] is not None]
            complete = len(reached) == len(mine)
            rows.append(dict(
                batch_size=bs, optimizer=name, settings=mine[0]["settings"],
                grid_edge=mine[0].get("grid_edge", ""), seeds=len(mine), seeds_reached=len(reached),
                steps_median=_median([r["steps_to_target"] for r in reached]) if complete else math.nan,
                wall_median=_median([r["wall_to_target_s"] for r in reached]) if complete else math.nan,
                step_ms=_median([r["step_ms"] for r in mine])))
    return rows


def bend_points(summary: list[dict], reference: str = "sgd", other: str = "seng",
                ratio: float = 1.5) -> dict:
    """Where ``other``'s curve leaves ``reference``'s: per batch size the ratio reference steps /
    other steps, and the smallest batch size from which that ratio stays >= ``ratio`` (None if
    it never does). Also each optimizer's largest batch size within 2x of perfect scaling from
    the smallest batch (steps(B) * B <= 2 * steps(B0) * B0)."""
    by = {(r["optimizer"], r["batch_size"]): r for r in summary}
    sizes = sorted({r["batch_size"] for r in summary})
    ratios = {}
    for bs in sizes:
        a, b = by.get((reference, bs)), by.get((other, bs))
        if a and b and math.isfinite(a["steps_median"]) and math.isfinite(b["steps_median"]):
            ratios[bs] = a["steps_median"] / b["steps_median"]
    bend = None
    for bs in reversed(sizes):
        if ratios.get(bs, 0.0) >= ratio:
            bend = bs
        else:
            break
    scaling = {}
    for name in {r["optimizer"] for r in summary}:
        base = by.get((name, sizes[0]))
        if not base or not math.isfinite(base["steps_median"]):
            scaling[name] = None
            continue
        good = [bs for bs in sizes if (name, bs) in by
                and math.isfinite(by[(name, bs)]["steps_median"])
                and by[(name, bs)]["steps_median"] * bs <= 2 * base["steps_median"] * sizes[0]]
        scaling[name] = max(good) if good else None
    return dict(ratios=ratios, bend=bend, ratio=ratio, scaling=scaling)


def claims(summary: list[dict], factor: float = 1.5) -> list[str]:
    """Per batch size: does SENG reach the target in at least ``factor``x fewer steps than both
    SGD and AdamW, and in less wall time than K-FAC (medians over seeds; a peer whose seeds did
    not all reach the target counts as slower)?"""
    by = {(r["optimizer"], r["batch_size"]): r for r in summary}
    lines = []
    for bs in sorted({r["batch_size"] for r in summary}):
        seng = by.get(("seng", bs))
        peers = [by.get((n, bs)) for n in ("sgd", "adamw", "kfac")]
        if seng is None or None in peers:
            continue
        if not math.isfinite(seng["steps_median"]):
            lines.append(f"- batch {bs}: no — SENG missed the target on a seed.")
            continue
        sgd, adamw, kfac = peers
        steps_ok = all(not math.isfinite(p["steps_median"])
                       or p["steps_median"] >= factor * seng["steps_median"] for p in (sgd, adamw))
        wall_ok = not math.isfinite(kfac["wall_median"]) or kfac["wall_median"] > seng["wall_median"]
        lines.append(f"- batch {bs}: {'yes' if steps_ok and wall_ok else 'no'} — ≥ {factor:g}x "
                     f"fewer steps than SGD and AdamW: {'yes' if steps_ok else 'no'}; less wall "
                     f"time than K-FAC: {'yes' if wall_ok else 'no'}.")
    return lines


def _fmt(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else "—"


def markdown(summary: list[dict], runs: list[dict], bends: dict, cfg: DictConfig) -> str:
    """The tables of the README: medians per point with SENG's ratios, then every seed."""
    by = {(r["optimizer"], r["batch_size"]): r for r in summary}
    lines = [f"Target: test accuracy ≥ {float(cfg.target):g}. Median over {len(cfg.seeds)} "
             f"seed(s); '—': a seed missed the target within the budget.", "",
             "| batch | optimizer | chosen settings (lr scaled) | reached | steps to target | "
             "wall s to target | ms / step | SGD steps / its steps | AdamW steps / its steps |",
             "|---|---|---|---|---|---|---|---|---|"]

    def ratio(peer: str, row: dict) -> str:
        p = by.get((peer, row["batch_size"]))
        if not p or not (math.isfinite(p["steps_median"]) and math.isfinite(row["steps_median"])):
            return "—"
        return f"{p['steps_median'] / row['steps_median']:.2f}"

    for r in summary:
        edge = f" (grid edge: {r['grid_edge']})" if r.get("grid_edge") else ""
        lines.append(
            f"| {r['batch_size']} | {LABELS.get(r['optimizer'], r['optimizer'])} | "
            f"{r['settings']}{edge} | {r['seeds_reached']}/{r['seeds']} | "
            f"{_fmt(r['steps_median'], 'g')} | {_fmt(r['wall_median'], '.2f')} | "
            f"{r['step_ms']:.1f} | {ratio('sgd', r)} | {ratio('adamw', r)} |")
    lines += ["", "| batch | optimizer | seed | steps to target | wall s to target | "
              "best test acc | steps run |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        reached = r["steps_to_target"] is not None
        lines.append(f"| {r['batch_size']} | {LABELS.get(r['optimizer'], r['optimizer'])} | "
                     f"{r['seed']} | {r['steps_to_target'] if reached else '—'} | "
                     f"{format(r['wall_to_target_s'], '.2f') if reached else '—'} | "
                     f"{r['best_test_acc']:.4f} | {r['steps_run']} |")
    lines += ["", "SGD steps / SENG steps per batch size: " + (", ".join(
        f"{bs}: {v:.2f}" for bs, v in sorted(bends["ratios"].items())) or "none comparable") + ".",
        (f"SENG needs ≥ {bends['ratio']:g}x fewer steps than SGD from batch size {bends['bend']} "
         f"up." if bends["bend"] is not None else
         f"SENG's steps never stay ≥ {bends['ratio']:g}x below SGD's up to the largest batch."),
        "Largest batch size within 2x of perfect scaling from the smallest batch: " + ", ".join(
            f"{LABELS.get(n, n)} {'—' if v is None else v}"
            for n, v in sorted(bends["scaling"].items())) + "."]
    verdicts = claims(summary)
    if verdicts:
        lines += ["", "SENG ≥ 1.5x fewer steps than both SGD and AdamW, and less wall time than "
                  "K-FAC:"] + verdicts
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, cfg: DictConfig) -> None:
    """Steps to target (left) and wall seconds to target (right) against batch size, log-log,
    median over seeds; a point whose seeds did not all reach the target is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    names = list(dict.fromkeys(r["optimizer"] for r in summary))
    for name in names:
        mine = [r for r in summary if r["optimizer"] == name]
        missed = [str(r["batch_size"]) for r in mine if not math.isfinite(r["steps_median"])]
        label = LABELS.get(name, name) + (f" (not shown: a seed missed at batch {', '.join(missed)})"
                                          if missed else "")
        for ax, key in zip(axes, ("steps_median", "wall_median")):
            pts = [(r["batch_size"], r[key]) for r in mine if math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=COLORS.get(name), label=label)
    sizes = sorted({r["batch_size"] for r in summary})
    sgd = {r["batch_size"]: r["steps_median"] for r in summary if r["optimizer"] == "sgd"}
    if sizes[0] in sgd and math.isfinite(sgd[sizes[0]]):
        axes[0].plot(sizes, [sgd[sizes[0]] * sizes[0] / b for b in sizes], color="grey", ls=":",
                     lw=1, label="perfect scaling from SGD's smallest batch")
    for ax, label in zip(axes, ("steps to target (median over seeds)",
                                "training wall s to target (median, one thread)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"teacher-student MLP, {int(cfg.data.n_train)} training samples: test accuracy ≥ "
                 f"{float(cfg.target):g}; every point tuned with {int(cfg.trials)} trials",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _read_csv(path: Path) -> list[dict]:
    def number(v: str):
        if v == "":
            return None
        if v in ("True", "False"):
            return v == "True"
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    with open(path, newline="") as f:
        return [{k: v if k in ("settings", "optimizer", "grid_edge") else number(v)
                 for k, v in row.items()} for row in csv.DictReader(f)]


def rerender(cfg: DictConfig) -> dict:
    """Rebuild large_batch.md and large_batch.png of a finished run from its trials.csv and
    runs.csv (``python benchmarks/large_batch.py rerender=true out_dir=...``), with the grid
    edges recomputed from the trials."""
    out_dir = Path(cfg.out_dir)
    trials = _read_csv(out_dir / "trials.csv")
    runs = _read_csv(out_dir / "runs.csv")
    for r in runs:
        r["settings"] = r["settings"] or ""
        mine = [t for t in trials
                if t["batch_size"] == r["batch_size"] and t["optimizer"] == r["optimizer"]]
        points = [parse(t["settings"]) for t in mine]
        chosen = next(parse(t["settings"]) for t in mine if t["chosen"])
        r["grid_edge"] = grid_edge(points, chosen)
    batch_sizes = sorted({r["batch_size"] for r in runs})
    optimizers = list(dict.fromkeys(r["optimizer"] for r in runs))
    return _report(runs, batch_sizes, optimizers, cfg)


def _report(run_rows: list[dict], batch_sizes: list[int], optimizers: list[str],
            cfg: DictConfig) -> dict:
    out_dir = Path(cfg.out_dir)
    summary = summarize(run_rows, batch_sizes, optimizers)
    bends = bend_points(summary)
    table = markdown(summary, run_rows, bends, cfg)
    (out_dir / "large_batch.md").write_text(table)
    if cfg.plots:
        plot(summary, out_dir / "large_batch.png", cfg)
    print(table)
    return dict(runs=run_rows, summary=summary, bends=bends)


def run(cfg: DictConfig) -> dict:
    if cfg.get("rerender"):
        return rerender(cfg)
    torch.set_num_threads(int(cfg.threads))
    train, val, test = make_splits(cfg.data)
    _validate(cfg, len(train))
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    optimizers = available(cfg.optimizers)
    target = float(cfg.target)
    batch_sizes = [int(b) for b in cfg.batch_sizes]
    trial_rows, run_rows, curve_rows = [], [], []
    for bs in batch_sizes:
        for name in optimizers:
            t0 = time.perf_counter()
            points = [scaled(p, bs, cfg) for p in trial_points(
                name, cfg.optim[name].search, int(cfg.trials), int(cfg.search_seed))]
            trials = [train_to_target(name, p, int(cfg.search_seed), bs, train, val, cfg)
                      for p in points]
            best = min(range(len(trials)), key=lambda i: _trial_key(trials[i], target))
            samples = curvature_samples(bs, cfg) if name in ("seng", "seng_mc") else None
            for i, (p, t) in enumerate(zip(points, trials)):
                steps, wall = t.to_target(target)
                trial_rows.append(dict(batch_size=bs, optimizer=name, trial=i,
                                       settings=describe(p), lr=p["lr"],
                                       damping=p.get("damping"), curvature_samples=samples,
                                       steps_to_target=steps, wall_to_target_s=wall,
                                       best_val_acc=t.best, steps_run=t.steps_run,
                                       diverged=t.diverged, chosen=i == best))
            for seed in cfg.seeds:
                r = train_to_target(name, points[best], int(seed), bs, train, test, cfg)
                steps, wall = r.to_target(target)
                run_rows.append(dict(batch_size=bs, optimizer=name,
                                     settings=describe(points[best]),
                                     grid_edge=grid_edge(points, points[best]),
                                     curvature_samples=samples,
                                     seed=int(seed), steps_to_target=steps,
                                     wall_to_target_s=wall, best_test_acc=r.best,
                                     steps_run=r.steps_run, diverged=r.diverged,
                                     step_ms=r.step_ms))
                curve_rows += [dict(batch_size=bs, optimizer=name, seed=int(seed), step=s,
                                    wall_s=w, test_acc=a)
                               for s, w, a in zip(r.steps, r.wall_s, r.acc)]
            mine = [r for r in run_rows if r["batch_size"] == bs and r["optimizer"] == name]
            print(f"[batch {bs:5d}] {name:6s} {describe(points[best]):32s} steps to target "
                  f"{[r['steps_to_target'] for r in mine]}  "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
            write_csv(out_dir / "trials.csv", TRIAL_COLUMNS, trial_rows)
            write_csv(out_dir / "runs.csv", RUN_COLUMNS, run_rows)
            write_csv(out_dir / "curves.csv", CURVE_COLUMNS, curve_rows)
    return dict(trials=trial_rows, **_report(run_rows, batch_sizes, optimizers, cfg))


@hydra.main(version_base="1.3", config_path="conf", config_name="large_batch")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg), flush=True)
    run(cfg)


if __name__ == "__main__":
    main()
