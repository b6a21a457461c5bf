"""The empirical against the Monte-Carlo Fisher on the digits problems, and the 1.5x question, computed.

Inputs, all written by ``benchmarks/compare.py`` under the same protocol (equal tuning trials, every seed):
- ``--fisher DIR``: a run with ``optimizers=[seng,seng_mc]`` (its ``summary.csv``);
- ``--peers DIR``: a run with the other optimizers (SGD, AdamW, K-FAC, ...) on the same problems, schedule and
  epochs (steps to target do not depend on the machine; they are the same whenever the run is repeated).

It writes ``DIR/all/summary.csv`` (the rows of both), runs ``benchmarks/step_time.py`` on it (every optimizer's
step timed round-robin in one process, so that load from other processes hits all alike, and the wall time to
target estimated as epochs to target x steps per epoch x that step time), and prints a markdown table: per problem
and SENG variant, its epochs to target, SGD's and AdamW's, the smaller of their ratios to SENG's (the 1.5x
question: does SENG need at least 1.5x fewer steps than both?), and its estimated wall time against K-FAC's.
A variant that missed the target on some seed has no answer (``-``); where SGD or AdamW missed it, the ratio
against the other bounds the answer from above (``<=``: no, when below 1.5).

    python benchmarks/fisher_report.py --fisher benchmarks/results/fisher/poly --peers benchmarks/results

With ``--large-batch`` the two directories are ``benchmarks/large_batch.py`` runs at one target (``runs.csv``):
per batch size, each SENG variant's median steps to target against SGD's, AdamW's and K-FAC's, and its median
wall time to target against K-FAC's (``step_ms`` there is each run's own, timed in turn, not round-robin).

    python benchmarks/fisher_report.py --large-batch --fisher benchmarks/results/fisher/large_batch_0.74 \
        --peers benchmarks/results/large_batch
"""
from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"seng": "SENG (empirical)", "seng_mc": "SENG (MC Fisher)"}
PEERS = ("sgd", "adamw", "kfac")


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def merge(fisher: Path, peers: Path, out: Path) -> list[dict]:
    """The SENG rows of ``fisher`` and the SGD, AdamW and K-FAC rows of ``peers``, in one summary.csv under ``out``;
    the two runs must agree on each problem's target and epoch budget."""
    ours = [r for r in read(fisher / "summary.csv") if r["optimizer"] in VARIANTS]
    theirs = [r for r in read(peers / "summary.csv") if r["optimizer"] in PEERS]
    budget = {(r["problem"], r["target"], r["epochs"]) for r in ours}
    for r in theirs:
        if (r["problem"], r["target"], r["epochs"]) not in budget and r["problem"] in {p for p, _, _ in budget}:
            raise ValueError(f"{peers}: {r['problem']} has target {r['target']} and {r['epochs']} epochs, unlike "
                             f"{fisher} ({sorted(budget)}): not the same protocol")
    rows = ours + [r for r in theirs if r["problem"] in {p for p, _, _ in budget}]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def number(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def verdicts(rows: list[dict], times: list[dict]) -> list[dict]:
    """Per problem and SENG variant: epochs to target (every seed reached, else NaN), the peers', the steps ratio
    min(SGD, AdamW) / SENG, and the estimated wall time against K-FAC's."""
    def epochs(r: dict) -> float:
        return number(r["epochs_to_target_mean"]) if r["seeds_reached"] == r["seeds"] else math.nan
    by = {(r["problem"], r["optimizer"]): r for r in rows}
    wall = {(t["problem"], t["optimizer"]): number(t["est_wall_to_target_s"]) for t in times}
    out = []
    for (problem, name), r in by.items():
        if name not in VARIANTS:
            continue
        mine = epochs(r)
        sgd, adamw, kfac = (by.get((problem, p)) for p in PEERS)
        peer_epochs = [epochs(p) if p is not None else math.nan for p in (sgd, adamw)]
        reached = [x for x in peer_epochs if not math.isnan(x)]
        # the smaller ratio over the peers that reached the target on every seed; with one that did not, the true
        # minimum is at most that (``bound``): enough to answer no below 1.5
        ratio = min(reached) / mine if reached and not math.isnan(mine) else math.nan
        out.append(dict(problem=problem, variant=VARIANTS[name], settings=r["settings"], epochs=mine,
                        sgd=peer_epochs[0], adamw=peer_epochs[1], ratio=ratio, bound=len(reached) < 2,
                        wall=wall.get((problem, name), math.nan) if not math.isnan(mine) else math.nan,
                        kfac_wall=wall.get((problem, "kfac"), math.nan),
                        kfac_reached=kfac is not None and kfac["seeds_reached"] == kfac["seeds"]))
    return out


def table(results: list[dict]) -> str:
    def cell(x: float, fmt: str = ".1f") -> str:
        return "-" if math.isnan(x) else format(x, fmt)
    lines = ["| problem | SENG | chosen settings | epochs to target | SGD | AdamW | min(SGD, AdamW) / SENG | >= 1.5x | "
             "est. wall s to target | K-FAC's | less wall than K-FAC |", "|" + "---|" * 11]
    for r in results:
        if math.isnan(r["ratio"]):
            yes = "-"
        elif r["bound"]:  # a peer missed the target: the ratio against the other bounds the answer from above
            yes = "no" if r["ratio"] < 1.5 else "-"
        else:
            yes = "yes" if r["ratio"] >= 1.5 else "no"
        ratio = cell(r["ratio"], ".2f") if not r["bound"] or math.isnan(r["ratio"]) else f"<= {r['ratio']:.2f}"
        if math.isnan(r["wall"]):
            less = "-"
        elif not r["kfac_reached"]:
            less = "yes (K-FAC missed the target)"
        else:
            less = "yes" if r["wall"] < r["kfac_wall"] else "no"
        lines.append(f"| {r['problem']} | {r['variant']} | {r['settings']} | {cell(r['epochs'])} | {cell(r['sgd'])} | "
                     f"{cell(r['adamw'])} | {ratio} | {yes} | {cell(r['wall'], '.2f')} | "
                     f"{cell(r['kfac_wall'], '.2f')} | {less} |")
    return "\n".join(lines)


def large_batch(fisher: Path, peers: Path) -> str:
    """The large-batch table: per batch size present in both runs and SENG variant, median steps to target (``-``
    where a seed missed it), the peers' medians, min(SGD, AdamW) / SENG, and wall time against K-FAC's."""
    import statistics

    runs = [r for r in read(fisher / "runs.csv") if r["optimizer"] in VARIANTS]
    runs += [r for r in read(peers / "runs.csv") if r["optimizer"] in PEERS]
    by: dict = {}
    for r in runs:
        by.setdefault((int(r["batch_size"]), r["optimizer"]), []).append(r)

    def median(key, column) -> float:
        rows = by.get(key, [])
        values = [number(r[column]) for r in rows]
        return statistics.median(values) if rows and not any(math.isnan(v) for v in values) else math.nan

    def cell(x: float, fmt: str = "g") -> str:
        return "-" if math.isnan(x) else format(x, fmt)
    lines = ["| batch | SENG | steps to target | SGD | AdamW | K-FAC | min(SGD, AdamW) / SENG | >= 1.5x | wall s | "
             "K-FAC wall s | less wall than K-FAC |", "|" + "---|" * 11]
    batches = sorted({b for b, name in by if name in VARIANTS} & {b for b, name in by if name in PEERS})
    for b in batches:
        for name, label in VARIANTS.items():
            if (b, name) not in by:
                continue
            mine = median((b, name), "steps_to_target")
            sgd, adamw, kfac = (median((b, p), "steps_to_target") for p in PEERS)
            reached = [x for x in (sgd, adamw) if not math.isnan(x)]
            ratio = min(reached) / mine if reached and not math.isnan(mine) else math.nan
            if math.isnan(ratio):
                yes, shown = "-", "-"
            elif len(reached) < 2:
                yes, shown = ("no" if ratio < 1.5 else "-"), f"<= {ratio:.2f}"
            else:
                yes, shown = ("yes" if ratio >= 1.5 else "no"), f"{ratio:.2f}"
            wall, kwall = median((b, name), "wall_to_target_s"), median((b, "kfac"), "wall_to_target_s")
            less = "-" if math.isnan(wall) else ("yes (K-FAC missed)" if math.isnan(kwall) else
                                                  ("yes" if wall < kwall else "no"))
            lines.append(f"| {b} | {label} | {cell(mine)} | {cell(sgd)} | {cell(adamw)} | {cell(kfac)} | {shown} | "
                         f"{yes} | {cell(wall, '.2f')} | {cell(kwall, '.2f')} | {less} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fisher", type=Path, required=True, help="compare.py's out_dir with seng and seng_mc")
    parser.add_argument("--peers", type=Path, required=True, help="compare.py's out_dir with sgd, adamw and kfac")
    parser.add_argument("--schedule", default="poly", help="the schedule both runs used (constant | cosine | poly)")
    parser.add_argument("--rounds", type=int, default=5, help="step_time.py's rounds")
    parser.add_argument("--no-timing", action="store_true", help="reuse DIR/all/step_time.csv")
    parser.add_argument("--large-batch", action="store_true", help="the directories are large_batch.py runs")
    args = parser.parse_args()
    if args.large_batch:
        text = large_batch(args.fisher, args.peers)
        (args.fisher / "fisher.md").write_text(text + "\n")
        print(text)
        return
    out = args.fisher / "all"
    rows = merge(args.fisher, args.peers, out)
    optimizers = sorted({r["optimizer"] for r in rows})
    if not args.no_timing:
        print(f"timing {optimizers} round-robin (benchmarks/step_time.py) ...", flush=True)
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_time.py"), f"out_dir={out}",
                        f"optimizers=[{','.join(optimizers)}]", f"schedule.name={args.schedule}",
                        f"step_time.rounds={args.rounds}", "plots=false"], check=True, cwd=REPO)
    results = verdicts(rows, read(out / "step_time.csv"))
    text = table(results)
    (out / "fisher.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
