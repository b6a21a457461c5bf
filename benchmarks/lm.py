"""A byte-level language model on the standard library's own source: SENG (empirical and Monte-Carlo Fisher)
against SGD, AdamW, SOAP, Shampoo, ASDL's K-FAC and ASDL's SENG.

    python benchmarks/lm.py                              # about an hour on two cores (conf/lm.yaml)
    python benchmarks/lm.py --config-name lm_quick       # smoke run, 1-2 minutes
    python benchmarks/lm.py scale=4 out_dir=benchmarks/results/lm_x4   # 4x the steps on 4x the text
    python benchmarks/lm.py optimizers=[sgd,seng] seeds=[0]

Data (benchmarks/lm_data.py): the ``.py`` files of the running Python's standard library (no test suites, no
site-packages), bytes as tokens, split by file (hashed paths) into train, validation and test. Training reads
``steps x scale x batch_size x (context + 1)`` bytes of the train split (one pass' worth) and draws windows at
random offsets; validation and test are fixed sets of consecutive windows (``data.val_bytes``,
``data.test_bytes``).

Model (benchmarks/lm_model.py): a pre-norm causal decoder of torch modules (``nn.MultiheadAttention`` with a
causal mask, learned positions, untied head). SENG covers every parameter exactly; what ASDL's K-FAC and
SENG cover is printed at the start and written to ``coverage.md``.

Protocol, as benchmarks/tuning.py and compare.py:
1. Tuning with an equal budget: every optimizer gets exactly ``trials`` trials over its own ``search`` grid,
   each trained with seed ``search_seed`` for the same number of steps and the same learning-rate
   ``schedule`` (a fraction of the run as its unit: ``warmup_epochs: 0.05`` is 5 % of the steps), evaluated
   on the validation split every ``eval_every`` steps. The chosen trial has the least mean validation loss
   over the evaluations (the area under the curve); a diverged trial is chosen only if all diverged.
2. Final runs: the chosen settings for every seed in ``seeds`` (initialisation, batches, sketches),
   evaluated on validation along the way and on test at the end. Every seed is reported.

Measured per run: validation bits per byte after every ``eval_every`` steps, the steps and training wall time
(forward, backward, preconditioning, update; evaluation excluded) to the first evaluation at or below
``target_bpb``, the final validation and test bits per byte, and ms per step; the step-time ratio to SGD is
each run's ms per step over the median of SGD's final runs (runs one after another in one process with
``threads`` torch threads: read ratios, not absolutes).

Outputs in ``out_dir``: ``runs/*.json`` (one per finished run, written as it finishes; with ``resume=true`` a
run whose JSON holds the same settings is read back instead of trained again, so an interrupted run loses
at most the run in progress), ``trials.csv``, ``seeds.csv``, ``curves.csv``, ``lm.md`` (tables: every seed,
then mean ± std and ratios), ``coverage.md`` and ``lm.png`` (validation bits per byte against steps and
against wall time).

Scaling up: ``scale`` multiplies the steps, the evaluation interval and the training text together (the
stdlib holds about 11 MB of training text on Python 3.11, which bounds one pass at about scale 20 with the
default batch); ``model.*`` and ``batch_size`` change the network and batch (the target then needs a new
value: pick one the fastest optimizers reach in about half the run).
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import lr_schedule  # noqa: E402
from benchmarks.lm_data import TextSplit, digest, load_splits, random_windows, tiled_windows  # noqa: E402
from benchmarks.lm_model import ByteLM, bits_per_byte, lm_loss  # noqa: E402
from benchmarks.peers import OPTIMIZERS, available, make_stepper  # noqa: E402
from benchmarks.report import COLORS, LABELS, write_csv  # noqa: E402
from benchmarks.tuning import describe, grid_edge, trial_points, with_knobs  # noqa: E402

TRIAL_COLUMNS = ["optimizer", "trial", "settings", "score_bpb", "final_val_bpb", "steps_to_target", "diverged",
                 "failure", "chosen"]
SEED_COLUMNS = ["optimizer", "settings", "grid_edge", "seed", "target_bpb", "steps_to_target",
                "wall_to_target_s", "final_val_bpb", "test_bpb", "step_ms", "vs_sgd", "diverged"]
CURVE_COLUMNS = ["optimizer", "seed", "step", "wall_s", "train_bpb", "val_bpb"]


@dataclass
class LMRun:
    """One training run: evaluations after ``steps[i]`` steps and ``wall_s[i]`` training seconds; index 0 is
    the model before training. ``train_bpb[i]`` is the mean training loss since the previous evaluation."""

    optimizer: str
    settings: str
    seed: int
    kind: str                                   # "trial" or "final"
    fingerprint: str = ""
    steps: list[int] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    train_bpb: list[float] = field(default_factory=list)
    val_bpb: list[float] = field(default_factory=list)
    test_bpb: float = math.nan
    diverged: bool = False
    failure: str = ""

    def to_target(self, target: float) -> tuple[int | None, float | None]:
        """(steps, wall seconds) at the first evaluation at or below ``target`` bits per byte."""
        for s, w, v in zip(self.steps, self.wall_s, self.val_bpb):
            if v <= target:
                return s, w
        return None, None

    @property
    def step_ms(self) -> float:
        return 1000.0 * self.wall_s[-1] / self.steps[-1] if self.steps[-1] else math.nan

    @property
    def score(self) -> float:
        """Mean validation bits per byte over the evaluations after step 0; +inf if the run diverged."""
        values = self.val_bpb[1:]
        if self.diverged or not values or not all(math.isfinite(v) for v in values):
            return math.inf
        return sum(values) / len(values)


def total_steps(cfg: DictConfig) -> int:
    return int(cfg.steps) * int(cfg.scale)


def data_budgets(cfg: DictConfig) -> DictConfig:
    """The data block with ``train_bytes``: one pass' worth of windows for the run's steps."""
    train_bytes = total_steps(cfg) * int(cfg.batch_size) * (int(cfg.model.context) + 1)
    return OmegaConf.create(dict(OmegaConf.to_container(cfg.data, resolve=True), train_bytes=train_bytes))


def make_model(cfg: DictConfig) -> ByteLM:
    m = cfg.model
    return ByteLM(int(m.layers), int(m.width), int(m.heads), int(m.context))


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: tuple[torch.Tensor, torch.Tensor], chunk: int = 64) -> float:
    """Bits per byte of ``model`` over every window (mean over all predicted bytes)."""
    was_training = model.training
    model.eval()
    x, y = windows
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        total += float(lm_loss(model(x[i:i + chunk]), y[i:i + chunk], reduction="sum"))
    model.train(was_training)
    return bits_per_byte(total / y.numel())


def fingerprint(cfg: DictConfig, optimizer: str, point: dict, seed: int, kind: str, corpus: str) -> str:
    """What makes two runs the same: model, data, budget, schedule, the optimizer's block and knobs, seed."""
    keys = dict(model=OmegaConf.to_container(cfg.model), data=OmegaConf.to_container(data_budgets(cfg)),
                steps=total_steps(cfg), batch_size=int(cfg.batch_size), eval_every=int(cfg.eval_every),
                scale=int(cfg.scale), schedule=OmegaConf.to_container(cfg.schedule),
                block=OmegaConf.to_container(with_knobs(cfg.optim[optimizer], point)), point=point,
                optimizer=optimizer, seed=seed, kind=kind, corpus=corpus, torch=torch.__version__,
                threads=int(cfg.threads))
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def train_run(optimizer: str, point: dict, seed: int, kind: str, train: TextSplit,
              val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor] | None,
              cfg: DictConfig) -> LMRun:
    """Train a fresh model with ``optimizer`` at ``point`` for ``steps x scale`` steps, the learning rate
    following ``cfg.schedule``, evaluating on ``val`` every ``eval_every x scale`` steps (and on ``test`` at
    the end, if given). Stops at a non-finite loss or a failed step (counted as diverged)."""
    steps = total_steps(cfg)
    every = int(cfg.eval_every) * int(cfg.scale)
    batch, context = int(cfg.batch_size), int(cfg.model.context)
    run = LMRun(optimizer, describe(point), seed, kind)
    torch.manual_seed(seed)
    model = make_model(cfg)
    # ASDL's peers average their curvature over every predicted byte: data_size = batch x positions
    stepper = make_stepper(optimizer, model, lm_loss, float(point["lr"]),
                           with_knobs(cfg.optim[optimizer], point), seed, "cross_entropy", batch * context)
    scheduler = lr_schedule.attach(stepper.opt, cfg.schedule, steps, 1.0)
    batches = torch.Generator().manual_seed(seed)
    run.steps.append(0)
    run.wall_s.append(0.0)
    run.train_bpb.append(math.nan)
    run.val_bpb.append(evaluate(model, val))
    wall, done, losses = 0.0, 0, []
    model.train()
    while done < steps:
        x, y = random_windows(train, batch, context, batches)
        start = time.perf_counter()
        try:
            loss = stepper.train_step(x, y)
        except (ValueError, RuntimeError) as err:  # blown-up weights make K-FAC's sampling or a Cholesky fail
            run.failure = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            loss = math.nan
        if math.isfinite(loss):
            scheduler.step()
        wall += time.perf_counter() - start
        done += 1
        losses.append(loss)
        if not math.isfinite(loss):
            run.diverged = True
        if done % every == 0 or done == steps or run.diverged:
            run.steps.append(done)
            run.wall_s.append(wall)
            run.train_bpb.append(bits_per_byte(sum(losses) / len(losses)))
            run.val_bpb.append(math.nan if run.diverged else evaluate(model, val))
            losses = []
            print(f"    {optimizer:9s} {kind:5s} seed={seed} {run.settings:24s} step {done:5d}/{steps}  "
                  f"train {run.train_bpb[-1]:.3f}  val {run.val_bpb[-1]:.3f} bpb  {wall:7.1f}s"
                  + (f"  diverged {run.failure}" if run.diverged else ""), flush=True)
        if run.diverged:
            break
    if test is not None and not run.diverged:
        run.test_bpb = evaluate(model, test)
    return run


def _run_path(out_dir: Path, run_key: str) -> Path:
    return out_dir / "runs" / f"{run_key}.json"


def cached_run(optimizer: str, point: dict, seed: int, kind: str, index: int, splits, cfg: DictConfig,
               corpus: str) -> LMRun:
    """``train_run``, or the finished run's JSON when ``resume`` is on and its fingerprint matches; every
    finished run is written to ``out_dir/runs`` at once."""
    out_dir = Path(cfg.out_dir)
    key = f"{optimizer}_{kind}{index}"
    path = _run_path(out_dir, key)
    fp = fingerprint(cfg, optimizer, point, seed, kind, corpus)
    if cfg.resume and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fp:
            print(f"    {optimizer:9s} {kind:5s} seed={seed} {describe(point):24s} read back from {path}", flush=True)
            return LMRun(**saved)
    train, val, test = splits
    run = train_run(optimizer, point, seed, kind, train, val, test if kind == "final" else None, cfg)
    run.fingerprint = fp
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(run)))
    tmp.replace(path)
    return run


def coverage_report(cfg: DictConfig, optimizers: list[str]) -> str:
    """Which parameters each curvature method covers on this model, as Markdown."""
    model = make_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    lines = [f"Model: {int(cfg.model.layers)} layers, width {int(cfg.model.width)}, context "
             f"{int(cfg.model.context)}: {total:,} parameters.", ""]
    if "seng" in optimizers or "seng_mc" in optimizers:
        from lightning_seng import SENG

        seng = SENG(model, log_coverage=False)
        table = seng.coverage()
        seng.remove()
        lines += ["lightning_seng.SENG:", "", "```", str(table), "```", ""]
    asdl_kinds = {"kfac": "K-FAC (asdl, KfacGradientMaker)", "asdl_seng": "SENG (asdl, SengGradientMaker)"}
    for name in (n for n in optimizers if n in asdl_kinds):
        model = make_model(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            maker = make_stepper(name, model, lm_loss, 0.0, with_knobs(cfg.optim[name], {"lr": 0.0}), 0,
                                 "cross_entropy", int(cfg.batch_size) * int(cfg.model.context)).maker
        covered = {id(p) for p in maker.module_dict.parameters()}
        plain = [n for n, p in model.named_parameters() if id(p) not in covered]
        share = sum(p.numel() for p in model.parameters() if id(p) in covered) / total
        lines += [f"{asdl_kinds[name]}: curvature on {100 * share:.1f} % of the parameters, layers "
                  f"{', '.join(n.replace('/', '.') for n in maker.module_dict.keys())}; plain gradient for "
                  f"{', '.join(plain)} (each attention's out_proj is left out on purpose: its hooks never "
                  f"fire).", ""]
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return (values[0], 0.0) if len(values) == 1 else (statistics.fmean(values), statistics.stdev(values))


def _pm(mean: float, std: float, spec: str) -> str:
    return "—" if not math.isfinite(mean) else f"{mean:{spec}} ± {std:{spec}}"


def seed_rows(finals: dict[str, list[LMRun]], edges: dict[str, str], target: float) -> list[dict]:
    """One row per final run; ``vs_sgd`` is its ms per step over the median of SGD's final runs."""
    sgd = [r.step_ms for r in finals.get("sgd", []) if math.isfinite(r.step_ms)]
    sgd_ms = statistics.median(sgd) if sgd else math.nan
    rows = []
    for name, runs in finals.items():
        for r in runs:
            steps, wall = r.to_target(target)
            rows.append(dict(optimizer=name, settings=r.settings, grid_edge=edges.get(name, ""), seed=r.seed,
                             target_bpb=target, steps_to_target=steps, wall_to_target_s=wall,
                             final_val_bpb=r.val_bpb[-1], test_bpb=r.test_bpb, step_ms=r.step_ms,
                             vs_sgd=r.step_ms / sgd_ms, diverged=r.diverged))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per optimizer: seeds reached, mean ± std of steps and wall time to target (over the seeds that reached
    it), of the final validation and test loss and of the step-time ratio to SGD."""
    out = []
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == name]
        reached = [r for r in mine if r["steps_to_target"] is not None]
        s = dict(optimizer=name, settings=mine[0]["settings"], grid_edge=mine[0]["grid_edge"], seeds=len(mine),
                 seeds_reached=len(reached))
        for key in ("steps_to_target", "wall_to_target_s"):
            s[key] = _mean_std([r[key] for r in reached])
        for key in ("final_val_bpb", "test_bpb", "step_ms", "vs_sgd"):
            s[key] = _mean_std([r[key] for r in mine])
        out.append(s)
    return out


def claim_lines(summary: list[dict], factor: float = 1.5) -> list[str]:
    """For each SENG arm: did it reach the target on every seed in at least ``factor``x fewer steps than both
    SGD and AdamW (a peer that missed on a seed counts as slower), and in less wall time than K-FAC?"""
    by = {s["optimizer"]: s for s in summary}
    if not all(k in by for k in ("sgd", "adamw", "kfac")):
        return []
    lines = []
    for arm in ("seng", "seng_mc", "asdl_seng"):
        s = by.get(arm)
        if s is None:
            continue
        label = LABELS.get(arm, arm)
        if s["seeds_reached"] < s["seeds"]:
            lines.append(f"- {label}: no — reached the target on {s['seeds_reached']}/{s['seeds']} seeds.")
            continue

        def slower(peer: dict, key: str, times: float) -> bool:
            return peer["seeds_reached"] < peer["seeds"] or peer[key][0] >= times * s[key][0]

        steps_ok = all(slower(by[p], "steps_to_target", factor) for p in ("sgd", "adamw"))
        wall_ok = by["kfac"]["seeds_reached"] < by["kfac"]["seeds"] or \
            by["kfac"]["wall_to_target_s"][0] > s["wall_to_target_s"][0]
        lines.append(f"- {label}: {'yes' if steps_ok and wall_ok else 'no'} — ≥ {factor:g}x fewer steps than "
                     f"SGD and AdamW: {'yes' if steps_ok else 'no'}; less wall time than K-FAC: "
                     f"{'yes' if wall_ok else 'no'}.")
    return lines


def markdown(rows: list[dict], summary: list[dict], cfg: DictConfig, corpus: str, n_train: int) -> str:
    target = float(cfg.target_bpb)
    lines = [f"Byte-level LM on the standard library (Python {sys.version.split()[0]}, corpus {corpus}, "
             f"{n_train:,} training bytes), {total_steps(cfg)} steps of batch {int(cfg.batch_size)} x "
             f"{int(cfg.model.context)}, {int(cfg.trials)} tuning trials per optimizer, target validation "
             f"{target:g} bits per byte. '—': never reached.", "",
             "| optimizer | chosen settings | seed | steps to target | wall s to target | final val bpb | "
             "test bpb | ms / step | × SGD step |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        edge = f" (grid edge: {r['grid_edge']})" if r["grid_edge"] else ""
        lines.append(f"| {LABELS.get(r['optimizer'], r['optimizer'])} | {r['settings']}{edge} | {r['seed']} | "
                     f"{'—' if r['steps_to_target'] is None else r['steps_to_target']} | "
                     f"{'—' if r['wall_to_target_s'] is None else format(r['wall_to_target_s'], '.1f')} | "
                     f"{_fmt(r['final_val_bpb'], '.3f')} | {_fmt(r['test_bpb'], '.3f')} | "
                     f"{_fmt(r['step_ms'], '.0f')} | {_fmt(r['vs_sgd'], '.2f')} |")
    lines += ["", "| optimizer | reached | steps to target | wall s to target | final val bpb | test bpb | "
              "× SGD step |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {LABELS.get(s['optimizer'], s['optimizer'])} | {s['seeds_reached']}/{s['seeds']} | "
                     f"{_pm(*s['steps_to_target'], '.0f')} | {_pm(*s['wall_to_target_s'], '.1f')} | "
                     f"{_pm(*s['final_val_bpb'], '.3f')} | {_pm(*s['test_bpb'], '.3f')} | "
                     f"{_pm(*s['vs_sgd'], '.2f')} |")
    claims = claim_lines(summary)
    if claims:
        lines += ["", "≥ 1.5x fewer steps to target than both SGD and AdamW, and less wall time than K-FAC "
                  "(means over seeds):"] + claims
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


def plot(finals: dict[str, list[LMRun]], path: Path, cfg: DictConfig) -> None:
    """Validation bits per byte against steps (left) and training wall time (right): mean over seeds, band
    min-max, dashed line at the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for name, runs in finals.items():
        n = min(len(r.val_bpb) for r in runs)
        if n < 2:
            continue
        cols = [[r.val_bpb[i] for r in runs] for i in range(n)]
        mean = [sum(c) / len(c) for c in cols]
        steps = runs[0].steps[:n]
        wall = [sum(r.wall_s[i] for r in runs) / len(runs) for i in range(n)]
        label = f"{LABELS.get(name, name)} ({runs[0].settings})"
        for ax, xs in zip(axes, (steps, wall)):
            ax.plot(xs, mean, color=COLORS.get(name), label=label, lw=1.8)
            if len(runs) > 1:
                ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], color=COLORS.get(name),
                                alpha=0.15, lw=0)
    for ax, xlabel in zip(axes, ("optimizer steps", "training wall time (s)")):
        ax.axhline(float(cfg.target_bpb), color="black", ls="--", lw=1, label=f"target {float(cfg.target_bpb):g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation bits per byte")
        ax.set_ylim(top=8.2)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    n_seeds = max(len(r) for r in finals.values())
    fig.suptitle(f"byte-level LM on the Python standard library: mean over {n_seeds} seed(s), band = min-max",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _validate(cfg: DictConfig) -> None:
    for name in cfg.optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizers must be drawn from {list(OPTIMIZERS)} (got {name!r})")
        trial_points(name, cfg.optim[name].search, int(cfg.trials), int(cfg.search_seed))
    for key in ("scale", "steps", "batch_size", "eval_every"):
        if int(cfg[key]) < 1:
            raise ValueError(f"{key} must be a positive integer (got {cfg[key]!r})")
    if not cfg.seeds:
        raise ValueError("seeds must hold at least one seed (got [])")
    if not 0.0 < float(cfg.target_bpb) < 8.0:
        raise ValueError(f"target_bpb must be in (0, 8) bits per byte (got {cfg.target_bpb!r})")
    lr_schedule.check_schedule(cfg.schedule)


def run(cfg: DictConfig) -> dict:
    """The whole benchmark described by ``cfg``; returns the per-seed rows and the summary."""
    _validate(cfg)
    torch.set_num_threads(int(cfg.threads))
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = load_splits(data_budgets(cfg))
    corpus = digest(splits["train"].files + splits["validation"].files + splits["test"].files)
    context = int(cfg.model.context)
    train = splits["train"]
    val, test = tiled_windows(splits["validation"], context), tiled_windows(splits["test"], context)
    print(f"corpus {corpus}: train {len(train):,} bytes from {len(train.files)} files, validation "
          f"{val[1].numel():,} predicted bytes from {len(splits['validation'].files)} files, test "
          f"{test[1].numel():,} from {len(splits['test'].files)} files", flush=True)
    optimizers = available(cfg.optimizers)
    coverage = coverage_report(cfg, optimizers)
    (out_dir / "coverage.md").write_text(coverage)
    print(coverage, flush=True)
    trial_rows, finals, edges = [], {}, {}
    for name in optimizers:
        t0 = time.perf_counter()
        points = trial_points(name, cfg.optim[name].search, int(cfg.trials), int(cfg.search_seed))
        trials = [cached_run(name, p, int(cfg.search_seed), "trial", i, (train, val, test), cfg, corpus)
                  for i, p in enumerate(points)]
        best = min(range(len(trials)), key=lambda i: trials[i].score)
        edges[name] = grid_edge(points, points[best])
        for i, t in enumerate(trials):
            steps, _ = t.to_target(float(cfg.target_bpb))
            trial_rows.append(dict(optimizer=name, trial=i, settings=t.settings, score_bpb=t.score,
                                   final_val_bpb=t.val_bpb[-1], steps_to_target=steps, diverged=t.diverged,
                                   failure=t.failure, chosen=i == best))
        finals[name] = [cached_run(name, points[best], int(seed), "final", i, (train, val, test), cfg, corpus)
                        for i, seed in enumerate(cfg.seeds)]
        print(f"[lm] {name:9s} {describe(points[best]):24s} final val "
              f"{[round(r.val_bpb[-1], 3) for r in finals[name]]} bpb, steps to target "
              f"{[r.to_target(float(cfg.target_bpb))[0] for r in finals[name]]}  "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
        write_csv(out_dir / "trials.csv", TRIAL_COLUMNS, trial_rows, ignore_extra=True)
    rows = seed_rows(finals, edges, float(cfg.target_bpb))
    summary = summarize(rows)
    write_csv(out_dir / "seeds.csv", SEED_COLUMNS, rows, ignore_extra=True)
    write_csv(out_dir / "curves.csv", CURVE_COLUMNS,
              [dict(optimizer=r.optimizer, seed=r.seed, step=s, wall_s=w, train_bpb=t, val_bpb=v)
               for runs in finals.values() for r in runs
               for s, w, t, v in zip(r.steps, r.wall_s, r.train_bpb, r.val_bpb)], ignore_extra=True)
    table = markdown(rows, summary, cfg, corpus, len(train))
    (out_dir / "lm.md").write_text(table)
    if cfg.plots and finals:
        plot(finals, out_dir / "lm.png", cfg)
    print(table, flush=True)
    return dict(trials=trial_rows, seeds=rows, summary=summary)


@hydra.main(version_base="1.3", config_path="conf", config_name="lm")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg), flush=True)
    run(cfg)


if __name__ == "__main__":
    main()
