"""SENG's lr x damping sensitivity sweep, in the quick config."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.test_compare import compose_bench

ROOT = Path(__file__).resolve().parents[2]


def test_sweep_writes_one_row_per_cell_and_the_heatmap(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "sensitivity.py"), "--config-name", "quick",
           "sensitivity.lr=[0.03,0.1]", "sensitivity.damping=[0.5,2.0,8.0]", "epochs.mlp=1",
           f"out_dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "sensitivity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["lr"], r["damping"]) for r in rows] == [
        ("0.03", "0.5"), ("0.03", "2"), ("0.03", "8"), ("0.1", "0.5"), ("0.1", "2"), ("0.1", "8")]
    assert all(0.0 <= float(r["val_final_metric"]) <= 1.0 for r in rows)
    assert float(rows[0]["lr_over_damping"]) == 0.06
    png = tmp_path / "sensitivity_mlp.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_non_positive_grid_value_is_refused_naming_the_key():
    from benchmarks.sensitivity import _validate

    cfg = compose_bench("quick", ["sensitivity.damping=[0.0,1.0]"])
    with pytest.raises(ValueError, match=r"sensitivity.damping must be a non-empty list of positive values"):
        _validate(cfg)
