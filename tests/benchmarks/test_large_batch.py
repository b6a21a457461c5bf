"""Steps to target against batch size: the pure helpers on known curves, and a tiny full run."""
import csv
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from benchmarks.large_batch import (bend_points, claims, eval_steps, grid_edge,
                                    steps_to_target, summarize)
from benchmarks.teacher import make_splits
from tests.benchmarks.test_compare import compose_bench

ROOT = Path(__file__).resolve().parents[2]


def test_steps_to_target_is_the_first_evaluation_at_or_past_the_target():
    steps = [0, 1, 2, 4, 8, 16, 32]
    acc = [0.1, 0.3, 0.5, 0.79, 0.8, 0.7, 0.9]
    assert steps_to_target(steps, acc, 0.8) == 8
    assert steps_to_target(steps, acc, 0.85) == 32
    assert steps_to_target(steps, acc, 0.95) is None


def test_eval_steps_are_geometric_and_end_at_the_budget():
    assert eval_steps(16, 1) == [1, 2, 4, 8, 16]
    assert eval_steps(20, 2) == [1, 2, 3, 4, 6, 8, 11, 16, 20]


def _summary(steps: dict) -> list[dict]:
    runs = [dict(batch_size=bs, optimizer=name, settings="", seed=0, steps_to_target=s,
                 wall_to_target_s=1.0, step_ms=1.0)
            for (name, bs), s in steps.items()]
    return summarize(runs, sorted({bs for _, bs in steps}), ["sgd", "seng"])


def test_bend_is_where_the_sgd_over_seng_ratio_stays_above_the_threshold():
    summary = _summary({("sgd", 64): 1000, ("sgd", 256): 300, ("sgd", 1024): 200, ("sgd", 4096): 180,
                        ("seng", 64): 1000, ("seng", 256): 250, ("seng", 1024): 100, ("seng", 4096): 60})
    bends = bend_points(summary)
    assert bends["ratios"] == {64: 1.0, 256: 1.2, 1024: 2.0, 4096: 3.0}
    assert bends["bend"] == 1024
    # within 2x of perfect scaling from batch 64 (steps * B <= 2 * 1000 * 64)
    assert bends["scaling"] == {"sgd": 256, "seng": 1024}


def test_the_claim_needs_fewer_steps_than_both_first_order_peers_and_less_wall_than_kfac():
    def run(name, steps, wall):
        return dict(batch_size=512, optimizer=name, settings="", seed=0, steps_to_target=steps,
                    wall_to_target_s=wall, step_ms=1.0)

    summary = summarize([run("sgd", 300, 1.0), run("adamw", 150, 1.0), run("kfac", 90, 2.0),
                         run("seng", 100, 1.5)], [512], ["sgd", "adamw", "kfac", "seng"])
    assert claims(summary) == ["- batch 512: yes — ≥ 1.5x fewer steps than SGD and AdamW: yes; "
                               "less wall time than K-FAC: yes."]
    summary[1]["steps_median"] = 149  # AdamW 1.49x SENG's steps: no longer enough
    assert claims(summary)[0].startswith("- batch 512: no — ≥ 1.5x fewer steps than SGD and AdamW: no;")


def test_grid_edge_names_the_knobs_chosen_at_an_end_of_their_values():
    points = [{"lr": lr, "damping": d} for lr in (0.1, 0.3, 0.9) for d in (0.5, 2.0)]
    assert grid_edge(points, {"lr": 0.1, "damping": 2.0}) == "lr low"
    assert grid_edge(points, {"lr": 0.9, "damping": 0.5}) == "lr high"
    assert grid_edge(points, {"lr": 0.3, "damping": 0.5}) == ""  # two dampings: both are ends


def test_a_point_with_a_missed_seed_has_no_median():
    runs = [dict(batch_size=64, optimizer="sgd", settings="", seed=s, steps_to_target=v,
                 wall_to_target_s=None if v is None else 1.0, step_ms=1.0)
            for s, v in ((0, 100), (1, None))]
    (row,) = summarize(runs, [64], ["sgd"])
    assert row["seeds_reached"] == 1 and math.isnan(row["steps_median"])


def test_teacher_data_is_reproducible_and_label_noise_is_applied():
    cfg = OmegaConf.create(dict(seed=3, n_train=4000, n_val=100, n_test=100, dim=8, classes=4,
                                teacher_width=16, label_noise=0.0))
    train, val, test = make_splits(cfg)
    again, _, _ = make_splits(cfg)
    assert len(train) == 4000 and len(val) == len(test) == 100
    assert (train.y == again.y).all() and len(set(train.y.tolist())) == 4
    noisy, _, _ = make_splits(OmegaConf.merge(cfg, {"label_noise": 0.5}))
    changed = float((noisy.y != train.y).float().mean())
    assert changed == pytest.approx(0.5 * 3 / 4, abs=0.05)


TINY = ["batch_sizes=[16,64]", "seeds=[0,1]", "trials=2", "max_steps=30", "budget_epochs=2",
        "target=0.3", "data.n_train=1280", "data.n_val=256", "data.n_test=256", "model.width=16",
        "optimizers=[sgd,seng]", "optim.sgd.search.lr=[0.1,0.3]",
        "optim.seng.search.lr=[0.1]", "optim.seng.search.damping=[0.5,2.0]",
        "optim.seng.curvature_samples_max=32"]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_run_tunes_every_point_equally_and_writes_every_seed(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "large_batch.py"), *TINY, f"out_dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = _rows(tmp_path / "trials.csv")
    assert Counter((r["batch_size"], r["optimizer"]) for r in trials) == {
        ("16", "sgd"): 2, ("16", "seng"): 2, ("64", "sgd"): 2, ("64", "seng"): 2}
    # the lr grid follows the batch size: (64 / 256) ** 0.5 = 0.5
    assert {r["lr"] for r in trials if r["batch_size"] == "64" and r["optimizer"] == "sgd"} == {
        "0.05", "0.15"}
    # SENG's curvature is built from min(B, 32) samples
    assert {r["batch_size"]: r["curvature_samples"] for r in trials if r["optimizer"] == "seng"} == {
        "16": "", "64": "32"}
    runs = _rows(tmp_path / "runs.csv")
    assert [(r["batch_size"], r["optimizer"], r["seed"]) for r in runs] == [
        ("16", "sgd", "0"), ("16", "sgd", "1"), ("16", "seng", "0"), ("16", "seng", "1"),
        ("64", "sgd", "0"), ("64", "sgd", "1"), ("64", "seng", "0"), ("64", "seng", "1")]
    for r in runs:  # a run that reached the target stopped at that evaluation
        if r["steps_to_target"]:
            assert r["steps_run"] == r["steps_to_target"]
    assert (tmp_path / "large_batch.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "large_batch.md").read_text()
    assert "| batch | optimizer | seed |" in table
    (tmp_path / "large_batch.md").unlink()
    again = subprocess.run([*cmd, "rerender=true"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "large_batch.md").read_text() == table


def test_too_few_steps_per_epoch_at_the_largest_batch_is_refused():
    from benchmarks.large_batch import _validate

    cfg = compose_bench("large_batch", [*TINY, "batch_sizes=[16,128]"])
    with pytest.raises(ValueError, match=r"data.n_train=1280 leaves 10 steps per epoch at batch size 128"):
        _validate(cfg, 1280)
