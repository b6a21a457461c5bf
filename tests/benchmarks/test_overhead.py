"""Smoke test of benchmarks/overhead.py: the floor runner does the products it claims, and the table has a
row per configuration with the measured floor beside the Linear-only models (never the times themselves)."""

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from benchmarks.overhead import FloorProducts, _linear_only

ROOT = Path(__file__).resolve().parents[2]


def test_floor_products_take_the_cheaper_u_g_per_layer():
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))
    floor = FloorProducts(model, n=32, batch=128)
    # 128 * (784 + 512) < 784 * 512: from the batch; 128 * (512 + 10) > 512 * 10: from the gradient
    assert [t["from_batch"] for t in floor.layers] == [True, False]
    w = floor.layers[1]["W"].clone()
    floor.run()
    t = floor.layers[1]
    assert torch.allclose(t["W"], 2.0 * w - 2.0 * (t["G"] * t["v"][:, None]).T @ t["X"], rtol=1e-4, atol=1e-4)


def test_only_models_made_of_linear_layers_get_a_measured_floor():
    assert _linear_only(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert not _linear_only(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)))


def test_overhead_table_has_a_row_per_configuration_and_the_measured_floor():
    out = subprocess.run([sys.executable, "benchmarks/overhead.py", "--rounds", "2", "--warmup", "1",
                          "--models", "autoencoder", "--batch-size", "32"], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=300).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("autoencoder")]
    assert [r[1] for r in rows] == ["exact", "update_freq=1", "samples=B/4"]
    assert all(float(r[3]) > 0 for r in rows)
    assert rows[0][5] != "-" and rows[2][5] != "-" and rows[1][5] == "-"  # measured floor; none for update_freq=1
