"""The language-model benchmark: its data split, its model's starting loss and coverage, and every arm's quick
path."""
import inspect
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from benchmarks import lm
from benchmarks.lm_data import (file_hash, load_splits, random_windows, read_split, source_files, split_files,
                                stdlib_root, tiled_windows)
from benchmarks.lm_model import ByteLM, bits_per_byte, lm_loss
from benchmarks.peers import missing_reason
from benchmarks.report import LABELS

ROOT = Path(__file__).resolve().parents[2]


def _quick(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "benchmarks" / "conf")):
        return compose(config_name="lm_quick", overrides=overrides)


def test_the_split_is_by_file_disjoint_complete_and_the_same_on_every_call():
    files = source_files()
    assert files and all(f.endswith(".py") for f in files)
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.split("/")[:-1])
    first = split_files(files, 0.05, 0.05)
    again = split_files(source_files(), 0.05, 0.05)
    assert first == again
    sets = {name: set(names) for name, names in first.items()}
    assert not (sets["train"] & sets["validation"] or sets["train"] & sets["test"]
                or sets["validation"] & sets["test"])
    assert set().union(*sets.values()) == set(files)
    # a hashed split: each held-out split is a small share of the files, and its order is the hash order
    assert 0.02 < len(first["validation"]) / len(files) < 0.1
    assert first["test"] == sorted(first["test"], key=file_hash)


def test_a_split_reads_only_its_budget_from_its_own_files():
    files = split_files(source_files(), 0.05, 0.05)
    split = read_split("validation", files["validation"], 5000)
    assert len(split) == 5000
    first = (stdlib_root() / split.files[0]).read_bytes() + b"\n"
    assert bytes(split.data[:min(len(first), 5000)].tolist()) == first[:5000]
    assert set(split.files) <= set(files["validation"])


def test_windows_predict_the_next_byte():
    files = split_files(source_files(), 0.05, 0.05)
    split = read_split("train", files["train"], 4000)
    x, y = random_windows(split, 3, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    tx, ty = tiled_windows(split, 64)
    assert tx.shape == (3999 // 64, 64) and torch.equal(tx.flatten()[1:], ty.flatten()[:-1])


def test_the_untrained_model_predicts_about_8_bits_per_byte():
    torch.manual_seed(0)
    model = ByteLM(layers=2, width=64, heads=2, context=32)
    files = split_files(source_files(), 0.05, 0.05)
    x, y = tiled_windows(read_split("validation", files["validation"], 4096), 32)
    with torch.no_grad():
        bpb = bits_per_byte(float(lm_loss(model(x), y)))
    assert abs(bpb - 8.0) < 0.1


def test_seng_covers_every_parameter_of_the_model_exactly():
    from lightning_seng import SENG

    model = ByteLM(layers=2, width=32, heads=2, context=16)
    seng = SENG(model, log_coverage=False)
    x = torch.randint(256, (4, 16))
    lm_loss(model(x), torch.randint(256, (4, 16))).backward()
    seng.step()
    table = seng.coverage()
    seng.remove()
    assert "curvature on 100.0 %" in str(table)


def test_the_mc_arm_runs_or_says_why_not():
    from lightning_seng import SENG

    reason = missing_reason("seng_mc")
    if "fisher" in inspect.signature(SENG).parameters:
        assert reason is None
    else:
        assert "no `fisher` argument" in reason


def test_every_arm_runs_its_quick_path_and_writes_a_json_per_run(tmp_path, capsys):
    cfg = _quick([f"out_dir={tmp_path}", "steps=4", "eval_every=2", "plots=false", "model.layers=1",
                  "model.width=32", "model.context=32", "data.val_bytes=2048", "data.test_bytes=2048"])
    result = lm.run(cfg)
    names = [n for n in cfg.optimizers if missing_reason(n) is None]
    assert [r["optimizer"] for r in result["seeds"]] == names
    for row in result["seeds"]:
        assert not row["diverged"], row
        assert math.isfinite(row["final_val_bpb"]) and math.isfinite(row["test_bpb"])
    saved = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    assert saved == sorted(f"{n}_{k}0.json" for n in names for k in ("trial", "final"))
    run = json.loads((tmp_path / "runs" / "sgd_final0.json").read_text())
    assert run["steps"] == [0, 2, 4] and len(run["val_bpb"]) == 3
    table = (tmp_path / "lm.md").read_text()
    assert "× SGD step" in table
    assert all(f"| {LABELS[n]} |" in table for n in names), table  # every arm that can run here (asdl: `bench`)
    # a second run reads every finished run back instead of training it again
    capsys.readouterr()
    again = lm.run(cfg)
    assert capsys.readouterr().out.count("read back from") == 2 * len(names)
    assert again["seeds"] == result["seeds"]


def test_load_splits_sizes_the_training_text_to_the_run():
    cfg = _quick(["steps=3", "batch_size=2", "model.context=16"])
    splits = load_splits(lm.data_budgets(cfg))
    assert len(splits["train"]) == 3 * 2 * 17
    assert not set(splits["train"].files) & set(splits["validation"].files)
