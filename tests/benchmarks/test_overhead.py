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
    lines = [line for line in out.splitlines() if line.startswith("autoencoder")]
    rows = [line.split() for line in lines if line.split()[1] not in ("identities", "fisher=mc")]
    assert [r[1] for r in rows] == ["exact", "update_freq=1", "samples=B/4"]
    assert sum(line.split()[1] == "identities" and "% of the refresh step" in line for line in lines) == 1
    assert sum(line.split()[1] == "fisher=mc" and "% of the empirical refresh step" in line for line in lines) == 1
    assert all(float(r[3]) > 0 for r in rows)
    assert rows[0][5] != "-" and rows[2][5] != "-" and rows[1][5] == "-"  # measured floor; none for update_freq=1


def test_the_unchecked_runner_takes_the_runtime_identities_out_and_nothing_else():
    """The runner that times the identities' cost computes the same directions, without watching a gradient."""
    from benchmarks.overhead import _unchecked
    from lightning_seng import SENG

    grads = []
    for unchecked in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        seng = SENG(model, damping=0.5, update_freq=1)
        if unchecked:
            _unchecked(seng)
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        loss = nn.functional.cross_entropy(model(x), y)
        assert all(layer.watch.active != unchecked for layer in seng.layers.values())
        loss.backward()
        seng.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_op_counter_counts_kernels_by_name_and_leaves_views_out():
    from benchmarks.opcount import OpCounter

    x = torch.randn(4, 3)
    with OpCounter() as counter:
        y = x.view(3, 4).transpose(0, 1)
        (y + 1).sum()
    assert counter.counts == {"add.Tensor": 1, "sum.default": 1}


def test_step_op_counts_cover_a_refresh_and_a_steady_step_between():
    from benchmarks.overhead import count_step_ops

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    counted = count_step_ops(model, lambda: nn.functional.cross_entropy(model(x), y))
    assert counted["tensors"] == 4
    assert "cholesky_inverse.default" not in counted["between"]  # formed once, on the first step after the refresh
    assert sum(counted["refresh"].values()) > sum(counted["between"].values()) > 0


def test_the_resnet_refresh_uses_the_paper_cifar_preset_as_written():
    """The sketch timed by ``--resnet`` is the preset's (read from its YAML), so that the figure follows the recipe."""
    from benchmarks.overhead import paper_cifar_settings

    assert paper_cifar_settings() == dict(damping=2.0, route="threshold", column_sample_size=256, svd_rank=16,
                                          implicit_threshold=700000)


def test_the_moving_damping_runner_moves_it_every_step_and_is_timed_between_refreshes():
    from benchmarks.overhead import moving_damping

    r = moving_damping("autoencoder", 16, rounds=12, warmup=1)
    assert set(r) == {"exact", "moving", "dampings"} and r["exact"] > 0 and r["moving"] > 0
    assert r["dampings"] == 13  # a new λ on every step
