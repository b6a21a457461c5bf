"""Smoke test of the benchmark script: the quick config, SGD and SENG only, tiny budgets."""
from collections import Counter

import pytest
from hydra import compose, initialize_config_dir

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def compose_bench(name: str, overrides: list[str]):
    """A benchmark config composed in-process, as the script would see it."""
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "benchmarks" / "conf")):
        return compose(config_name=name, overrides=overrides)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_config_writes_expected_csvs(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--config-name", "quick",
           "optimizers=[sgd,seng]", "problems=[mlp,cnn]", "plots=false", "seeds=[0,1]",
           f"out_dir={tmp_path}", "epochs.mlp=1", "epochs.cnn=1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    summary = _rows(tmp_path / "summary.csv")
    assert [(r["problem"], r["optimizer"]) for r in summary] == [
        ("mlp", "sgd"), ("mlp", "seng"), ("cnn", "sgd"), ("cnn", "seng")]
    for column in ("epochs_to_target_mean", "wall_to_target_s_mean", "final_metric_mean",
                   "step_ms_mean", "peak_rss_mib_mean", "seeds_reached", "lr"):
        assert column in summary[0]

    curves = _rows(tmp_path / "curves.csv")
    # two seeds, epoch 0 (before training) and epoch 1, per problem and optimizer
    assert len(curves) == 4 * 2 * 2
    assert {r["epoch"] for r in curves} == {"0", "1"}

    search = _rows(tmp_path / "search.csv")
    # the same budget for both: trials=2 per problem and optimizer, SENG's over lr x damping
    assert Counter((r["problem"], r["optimizer"]) for r in search) == {
        ("mlp", "sgd"): 2, ("mlp", "seng"): 2, ("cnn", "sgd"): 2, ("cnn", "seng"): 2}
    assert {r["damping"] for r in search if r["optimizer"] == "seng"} == {"0.5", "2"}
    assert {r["damping"] for r in search if r["optimizer"] == "sgd"} == {""}
    assert sum(r["chosen"] == "True" for r in search) == 4
    chosen = {(r["problem"], r["optimizer"]): r["settings"] for r in search if r["chosen"] == "True"}
    assert {(r["problem"], r["optimizer"]): r["settings"] for r in summary} == chosen
    assert (tmp_path / "summary.md").read_text().startswith("| problem |")

    seeds = _rows(tmp_path / "seeds.csv")
    assert [(r["problem"], r["optimizer"], r["seed"]) for r in seeds] == [
        (p, o, s) for p in ("mlp", "cnn") for o in ("sgd", "seng") for s in ("0", "1")]
    assert len((tmp_path / "seeds.md").read_text().splitlines()) == 2 + 8


def test_unequal_trial_budget_is_refused_naming_the_key():
    from benchmarks.compare import _validate

    cfg = compose_bench("quick", ["optimizers=[sgd,seng]", "trials=3"])
    with pytest.raises(ValueError, match=r"optim.sgd.search has 2 grid points, fewer than trials=3"):
        _validate(cfg)


def test_missing_peer_is_skipped_with_install_hint(monkeypatch):
    import importlib.util

    from benchmarks import peers

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec",
                        lambda name: None if name == "asdl" else real_find_spec(name))
    reason = peers.missing_reason("kfac")
    assert reason is not None and "skipping kfac" in reason and ".[bench]" in reason
    assert peers.missing_reason("sgd") is None


def test_seng_stepper_adapts_the_damping_with_lm():
    """``optim.seng.damping_adaptation=lm``: the stepper runs the feedback pass on due steps and λ moves."""
    import torch
    from torch import nn

    from benchmarks.peers import make_stepper
    from lightning_seng import LevenbergMarquardt

    cfg = compose_bench("compare", ["optim.seng.damping_adaptation=lm", "optim.seng.lm_every=1"]).optim.seng
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    stepper = make_stepper("seng", model, nn.functional.cross_entropy, 1e-3, cfg, 0, "cross_entropy", 16)
    assert isinstance(stepper.seng.damping_schedule, LevenbergMarquardt)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(3):
        stepper.train_step(x, y)
    assert "lm_rho" in stepper.seng.stats and stepper.seng.damping < cfg.damping  # tiny steps: ρ ≈ 1, λ lowered
    with pytest.raises(ValueError, match="damping_adaptation.*'constant', 'lm', 'paper_decay'.*'fast'"):
        make_stepper("seng", model, nn.functional.cross_entropy, 1e-3,
                     compose_bench("compare", ["optim.seng.damping_adaptation=fast"]).optim.seng, 0, "cross_entropy", 16)
