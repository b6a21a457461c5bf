"""Learning-rate search for the main job (recipe=digits_mlp), with the same budget for SENG+SGD and SGD.

Every learning rate of ``--lrs`` is trained with both optimizers for every seed of ``--seeds``; each
optimizer's learning rate is the one with the best mean *validation* accuracy (ties: lower validation
loss). The test split is only printed, never used to choose. SENG's other knobs stay at the recipe's
values (no extra search for SENG). Usage::

    python recipes/tune_digits_lr.py                       # the grid recorded in conf/recipe/digits_mlp.yaml
    python recipes/tune_digits_lr.py --lrs 0.01 0.1 --seeds 0 -o trainer.max_epochs=5
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import pytorch_lightning as pl
from hydra import compose, initialize_config_dir

from lightning_seng.recipes.train import build, config_dir, plan_runs


def evaluate(overrides: list[str], seed: int, lr: float) -> dict[str, dict[str, float]]:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"seed={seed}", f"optimizer.lr={lr}", f"baseline.lr={lr}",
                                          "baseline.enabled=true", "trainer.enable_progress_bar=false",
                                          "logger=none"])
    out = {}
    for label, seng_cfg, opt_cfg in plan_runs(cfg):
        module, datamodule, trainer = build(cfg, seng_cfg, opt_cfg)
        trainer.fit(module, datamodule=datamodule)
        val = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        out[label] = {**val, **test}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("-o", "--override", dest="overrides", action="append", default=[],
                        help="a Hydra override applied to every run (repeatable), e.g. -o trainer.max_epochs=10")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    pl.seed_everything(0)

    rows: dict[tuple[str, float], list[dict[str, float]]] = {}
    for lr in args.lrs:
        for seed in args.seeds:
            for label, metrics in evaluate(args.overrides, seed, lr).items():
                rows.setdefault((label, lr), []).append(metrics)
                print(f"{label:>10} lr={lr:<6g} seed={seed} val/acc={metrics['val/acc']:.4f} "
                      f"val/loss={metrics['val/loss']:.4f} test/acc={metrics['test/acc']:.4f}", flush=True)

    mean = lambda runs, key: statistics.fmean(r[key] for r in runs)  # noqa: E731
    header = f"{'optimizer':>10} {'lr':>7} {'val/acc':>8} {'val/loss':>9} {'test/acc':>9}"
    print(f"\n{header}   (means over seeds {args.seeds})")
    best: dict[str, tuple[float, float, float]] = {}
    for (label, lr), runs in rows.items():
        va, vl, ta = mean(runs, "val/acc"), mean(runs, "val/loss"), mean(runs, "test/acc")
        print(f"{label:>10} {lr:>7g} {va:>8.4f} {vl:>9.4f} {ta:>9.4f}")
        if label not in best or (va, -vl) > (best[label][1], -best[label][2]):
            best[label] = (lr, va, vl)
    for label, (lr, va, vl) in best.items():
        print(f"best lr for {label}: {lr:g} (mean val/acc {va:.4f}, val/loss {vl:.4f})")


if __name__ == "__main__":
    main()
