"""Smoke test of benchmarks/sketch_error.py: a row per setting, distances measured (never printed constants),
the exact one at zero up to rounding and the CSV written with every draw."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sketch_error_table_and_csv(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/sketch_error.py", "--batch", "16", "--draws", "2",
                          "--threads", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=300).stdout
    rows = list(csv.DictReader(open(tmp_path / "sketch_error.csv")))
    settings = {r["setting"] for r in rows}
    assert len(settings) == 7 and all(name in out for name in settings)
    by = {s: [float(r["distance_percent"]) for r in rows if r["setting"] == s] for s in settings}
    # rank 16 >= 4x4 positions: an exact truncation, equal to exact SENG up to float32 rounding
    assert len(by["authors rule, exact (no sampling)"]) == 1 and by["authors rule, exact (no sampling)"][0] < 1e-3
    assert len(by["ours sketch_size=128"]) == 2
    assert min(by["ours sketch_size=128"]) > max(by["ours sketch_size=65536"])  # a smaller sketch errs more
    assert by["authors s=256, threshold/16"][0] != by["authors s=256, threshold/16"][1]  # two draws differ
