"""Tables and plots of a comparison run: one PNG per problem, one Markdown table for all."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"seng": "#d62728", "sgd": "#1f77b4", "adamw": "#2ca02c", "kfac": "#9467bd",
          "shampoo": "#ff7f0e", "soap": "#8c564b", "seng_mc": "#e377c2", "asdl_seng": "#17becf"}
LABELS = {"seng": "SENG", "sgd": "SGD+momentum", "adamw": "AdamW", "kfac": "K-FAC (asdl)",
          "shampoo": "Shampoo (pytorch-optimizer ScalableShampoo)", "soap": "SOAP (pytorch-optimizer)",
          "seng_mc": "SENG (MC Fisher)", "asdl_seng": "SENG (asdl)"}
METRIC_LABELS = {"test_acc": "test accuracy", "test_recon": "test reconstruction error"}


def write_csv(path: Path, columns: list[str], rows: list[dict], ignore_extra: bool = False) -> None:
    """``rows`` under ``columns``: floats to 6 significant digits, ``None`` as an empty cell; keys beyond
    ``columns`` raise unless ``ignore_extra``."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore" if ignore_extra else "raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})


def _band(runs, attr: str):
    """Mean, min and max over seeds of a per-epoch series, truncated to the shortest run."""
    series = [getattr(r, attr) for r in runs]
    n = min(len(s) for s in series)
    cols = [[s[i] for s in series] for i in range(n)]
    mean = [sum(c) / len(c) for c in cols]
    return mean, [min(c) for c in cols], [max(c) for c in cols]


def plot_problem(problem, runs_by_opt: dict, path: Path) -> None:
    """2x2 figure: training loss and test metric, against epochs and against training wall time.
    Lines are the mean over seeds, bands the min-max range; the dashed line is the target."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    metric_label = METRIC_LABELS.get(problem.metric_name, problem.metric_name)
    for name, runs in runs_by_opt.items():
        color = COLORS.get(name)
        label = f"{LABELS.get(name, name)} ({runs[0].settings or f'lr={runs[0].lr:.3g}'})"
        wall, _, _ = _band(runs, "wall_s")
        epochs = list(range(len(wall)))
        for row, attr in enumerate(("train_loss", "eval_metric")):
            mean, lo, hi = _band(runs, attr)
            for col, xs in enumerate((epochs, wall)):
                ax = axes[row, col]
                ax.plot(xs, mean, color=color, label=label, lw=1.8)
                if len(runs) > 1:
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
    for col in range(2):
        axes[0, col].set_yscale("log")
        axes[0, col].set_ylabel("training loss (epoch mean)")
        axes[1, col].set_ylabel(metric_label)
        axes[1, col].axhline(problem.target, color="black", ls="--", lw=1,
                             label=f"target {problem.target:g}")
        axes[1, col].set_xlabel("epoch" if col == 0 else "training wall time (s)")
        axes[0, col].set_xlabel("epoch" if col == 0 else "training wall time (s)")
    if problem.higher_is_better:
        lo = min(problem.target - 0.1, 0.8)
        for col in range(2):
            axes[1, col].set_ylim(lo, 1.0)
    else:
        for col in range(2):
            axes[1, col].set_yscale("log")
    _clip_wall_axis(axes[:, 1], runs_by_opt)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    handles, labels = axes[1, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
    n_seeds = len(next(iter(runs_by_opt.values())))
    fig.suptitle(f"{problem.name}: mean over {n_seeds} seed(s), band = min-max", fontsize=12)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _clip_wall_axis(axes, runs_by_opt: dict) -> None:
    """When one optimizer's runs take more than twice as long as every other's, end the
    wall-time axes at 1.1x the second slowest so the others stay readable, and say so."""
    finals = sorted(((max(r.wall_s[-1] for r in runs), name)
                     for name, runs in runs_by_opt.items()), reverse=True)
    if len(finals) < 2 or finals[0][0] <= 2 * finals[1][0]:
        return
    (slowest, name), (second, _) = finals[0], finals[1]
    for ax in axes:
        ax.set_xlim(0, 1.1 * second)
        ax.set_title(f"axis clipped: {LABELS.get(name, name)} runs to {slowest:.0f} s",
                     fontsize=9)


def _pm(mean: float, std: float, fmt: str) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:{fmt}} ± {std:{fmt}}"


def summary_markdown(summaries: list[dict], cfg) -> str:
    """The README table: one row per problem and optimizer, then SENG's ratios per problem."""
    lines = [
        "| problem | optimizer | chosen settings | reached | epochs to target | wall s to target | "
        "final metric | ms / step | peak RSS added (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        edge = f" (grid edge: {s['grid_edge']})" if s.get("grid_edge") else ""
        target = f"{s['metric_name']} {'≥' if s['metric_name'] == 'test_acc' else '≤'} {s['target']:g}"
        lines.append(
            f"| {s['problem']} ({target}) | {LABELS.get(s['optimizer'], s['optimizer'])} | "
            f"{s.get('settings') or format(s['lr'], '.3g')}{edge} | "
            f"{s['seeds_reached']}/{s['seeds']} | "
            f"{_pm(s['epochs_to_target_mean'], s['epochs_to_target_std'], '.1f')} | "
            f"{_pm(s['wall_to_target_s_mean'], s['wall_to_target_s_std'], '.2f')} | "
            f"{_pm(s['final_metric_mean'], s['final_metric_std'], '.4f')} | "
            f"{_pm(s['step_ms_mean'], s['step_ms_std'], '.1f')} | "
            f"{_pm(s['peak_rss_mib_mean'], s['peak_rss_mib_std'], '.1f')} |")
    ratios = _ratios(summaries)
    if ratios:
        lines += ["", "| problem | peer | peer epochs / SENG epochs | peer wall s / SENG wall s |",
                  "|---|---|---|---|"]
        lines += ratios
    claims = claim_lines(summaries)
    if claims:
        lines += ["", "SENG ≥ 1.5x fewer epochs than both SGD and AdamW, and less wall time than "
                  "K-FAC (means over seeds):"] + claims
    return "\n".join(lines) + "\n"


def claim_lines(summaries: list[dict], factor: float = 1.5) -> list[str]:
    """Per problem, whether SENG reached the target in at least ``factor``x fewer epochs than
    both SGD and AdamW and in less wall time than K-FAC (means over seeds; a peer that missed
    the target on a seed counts as slower than SENG only if SENG reached it on every seed)."""
    by_problem: dict[str, dict[str, dict]] = {}
    for s in summaries:
        by_problem.setdefault(s["problem"], {})[s["optimizer"]] = s
    lines = []
    for problem, opts in by_problem.items():
        seng = opts.get("seng")
        if seng is None or not all(k in opts for k in ("sgd", "adamw", "kfac")):
            continue
        if seng["seeds_reached"] < seng["seeds"]:
            lines.append(f"- {problem}: no — SENG reached the target on "
                         f"{seng['seeds_reached']}/{seng['seeds']} seeds.")
            continue

        def missed(peer: dict) -> bool:
            return peer["seeds_reached"] < peer["seeds"]

        epochs_ok = all(missed(opts[p]) or opts[p]["epochs_to_target_mean"]
                        >= factor * seng["epochs_to_target_mean"] for p in ("sgd", "adamw"))
        kfac = opts["kfac"]
        wall_ok = missed(kfac) or kfac["wall_to_target_s_mean"] > seng["wall_to_target_s_mean"]
        verdict = "yes" if epochs_ok and wall_ok else "no"
        lines.append(f"- {problem}: {verdict} — ≥ {factor:g}x fewer epochs than SGD and AdamW: "
                     f"{'yes' if epochs_ok else 'no'}; less wall time than K-FAC: "
                     f"{'yes' if wall_ok else 'no'}.")
    return lines


def seeds_markdown(rows: list[dict]) -> str:
    """Every final run, one row per problem, optimizer and seed ("—": target never reached)."""
    lines = ["| problem | optimizer | chosen settings | seed | epochs to target | "
             "steps to target | wall s to target | final metric | ms / step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reached = r["epochs_to_target"] != ""
        lines.append(
            f"| {r['problem']} | {LABELS.get(r['optimizer'], r['optimizer'])} | "
            f"{r['settings']} | {r['seed']} | "
            f"{r['epochs_to_target'] if reached else '—'} | "
            f"{r['steps_to_target'] if reached else '—'} | "
            f"{format(float(r['wall_to_target_s']), '.2f') if reached else '—'} | "
            f"{float(r['final_metric']):.4f} | {float(r['step_ms']):.1f} |")
    return "\n".join(lines) + "\n"


def _ratios(summaries: list[dict]) -> list[str]:
    rows = []
    by_problem: dict[str, dict[str, dict]] = {}
    for s in summaries:
        by_problem.setdefault(s["problem"], {})[s["optimizer"]] = s
    for problem, opts in by_problem.items():
        seng = opts.get("seng")
        if seng is None:
            continue
        for name, s in opts.items():
            if name == "seng":
                continue
            rows.append(f"| {problem} | {LABELS.get(name, name)} | "
                        f"{_ratio(s, seng, 'epochs_to_target_mean')} | "
                        f"{_ratio(s, seng, 'wall_to_target_s_mean')} |")
    return rows


def _ratio(peer: dict, seng: dict, key: str) -> str:
    """Peer / SENG of a to-target mean, only when both reached the target on every seed."""
    complete = (peer["seeds_reached"] == peer["seeds"] and seng["seeds_reached"] == seng["seeds"])
    if not complete:
        return "n/a (a seed missed the target)"
    a, b = peer[key], seng[key]
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def runs_from_curves(path: Path) -> dict:
    """Rebuild per-run records from a curves.csv: {problem: {optimizer: [RunResult, ...]}}."""
    import csv

    from benchmarks.compare import RunResult

    runs: dict = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            key = (row["optimizer"], int(row["seed"]))
            by_opt = runs.setdefault(row["problem"], {})
            seeds = by_opt.setdefault(row["optimizer"], {})
            run = seeds.get(key)
            if run is None:
                run = seeds[key] = RunResult(row["problem"], row["optimizer"], int(row["seed"]),
                                             float(row["lr"]), row.get("settings", ""))
            run.train_loss.append(float(row["train_loss"]))
            run.eval_loss.append(float(row["test_loss"]))
            run.eval_metric.append(float(row["test_metric"]))
            run.wall_s.append(float(row["wall_s"]))
            run.steps.append(int(row["steps"]))
    return {p: {o: list(s.values()) for o, s in by_opt.items()} for p, by_opt in runs.items()}


def summaries_from_csv(path: Path) -> list[dict]:
    """Rows of a summary.csv with their numbers parsed back."""
    import csv

    text_keys = {"problem", "optimizer", "metric_name", "settings", "grid_edge"}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (v if k in text_keys else (int(v) if k in ("seeds", "seeds_reached", "epochs")
                                             else float(v)))
             for k, v in row.items()} for row in rows]


def _fill_grid_edges(summaries: list[dict], search_csv: Path) -> None:
    """Set each summary's ``grid_edge`` from the trials in search.csv (see tuning.grid_edge)."""
    import csv

    from benchmarks.tuning import grid_edge, parse

    with open(search_csv, newline="") as f:
        trials = list(csv.DictReader(f))
    for s in summaries:
        mine = [t for t in trials if (t["problem"], t["optimizer"]) == (s["problem"], s["optimizer"])]
        chosen = [parse(t["settings"]) for t in mine if t["chosen"] == "True"]
        if chosen:
            s["grid_edge"] = grid_edge([parse(t["settings"]) for t in mine], chosen[0])


def main(argv: list[str] | None = None) -> None:
    """Redraw summary.md and the PNGs of a finished run from its CSVs (problem settings from
    compare.yaml):
    ``python benchmarks/report.py [RESULTS_DIR]``."""
    import sys

    from omegaconf import OmegaConf

    from benchmarks.problems import build_problem

    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0] if argv else "benchmarks/results")
    cfg = OmegaConf.load(Path(__file__).parent / "conf" / "compare.yaml")
    summaries = summaries_from_csv(out_dir / "summary.csv")
    if (out_dir / "search.csv").exists():
        _fill_grid_edges(summaries, out_dir / "search.csv")
    (out_dir / "summary.md").write_text(summary_markdown(summaries, cfg))
    print(f"wrote {out_dir / 'summary.md'}")
    for problem_name, runs_by_opt in runs_from_curves(out_dir / "curves.csv").items():
        problem = build_problem(problem_name, cfg.problem[problem_name])
        plot_problem(problem, runs_by_opt, out_dir / f"{problem_name}.png")
        print(f"wrote {out_dir / f'{problem_name}.png'}")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
