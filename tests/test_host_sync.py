"""``SENG.step`` never reads a tensor back to the host between refreshes (a GPU user would wait on every
``.item()``, ``bool(tensor)`` and ``.tolist()``); a refresh reads a bounded number of scalars. Counted as
``aten._local_scalar_dense`` calls under a ``TorchDispatchMode``, which every such read goes through.

Where all gradients are in host memory the fused step reads its non-finite flag, which waits for nothing there
(``fused.HOST_READ_DEVICES``); these tests take the path of every other device, with that tuple emptied."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_seng import SENG, fused


@pytest.fixture(autouse=True)
def device_path(monkeypatch):
    monkeypatch.setattr(fused, "HOST_READ_DEVICES", ())


class ScalarReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 5 * 5, 9)
        self.ln = nn.LayerNorm(9)
        self.seq = nn.Linear(9, 6)
        self.extra = nn.Parameter(torch.ones(6))  # the root's own parameter: the generic route

    def forward(self, x):
        h = torch.tanh(self.norm(self.conv(x))).flatten(1)
        h = self.ln(torch.tanh(self.fc(h)))
        return self.seq(h.unsqueeze(1).expand(-1, 3, -1)).mean(1) * self.extra


def _reads(seng, model, x, y, nan=False):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    if nan:
        model.fc.weight.grad[0, 0] = float("nan")
    with ScalarReads() as mode:
        seng.step()
    return mode.count


@pytest.mark.parametrize("options", [dict(), dict(route="explicit", sketch_size=20), dict(route="gram"),
                                     dict(route="implicit", svd_rank=2, sketch_size=3), dict(curvature_samples=5),
                                     dict(skip_nonfinite=False), dict(damping=lambda step, epoch: 0.5 / (1 + step))],
                         ids=["auto", "explicit-sketch", "gram", "implicit-sketch", "curvature-samples", "keep-nan",
                              "damping-per-step"])
def test_no_scalar_reads_between_refreshes_and_few_on_refresh_steps(options):
    torch.manual_seed(0)
    model = Net()
    seng = SENG(model, **{"damping": 0.5, "update_freq": 3, **options})
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 6, (8,))
    counts = [_reads(seng, model, x, y) for _ in range(6)]
    layers = len(seng.layers)
    assert counts[1:3] == [0, 0] and counts[4:6] == [0, 0], counts
    # a refresh: is the gradient finite, the non-finite count; per layer: is UUᵀ finite, the Cholesky status, and
    # for the generic route on the root (``extra``) its checks of the recomputed outputs
    assert counts[0] <= 2 + 3 * layers and counts[3] <= 2 + 3 * layers, counts


def test_a_nan_between_refreshes_is_handled_on_the_device_and_counted_when_stats_are_read():
    torch.manual_seed(0)
    model = Net()
    seng = SENG(model, damping=0.5, update_freq=3)
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 6, (8,))
    _reads(seng, model, x, y)
    assert _reads(seng, model, x, y, nan=True) == 0
    assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters())
    assert seng.stats["nonfinite_steps"] == 1 and seng.nonfinite_steps == 1


def test_a_refresh_reads_a_fixed_number_of_scalars_whatever_the_number_of_layers():
    """Layers sharing N are factorised in one batched Cholesky whose status is read once: the refresh reads
    as many scalars for 2 layers as for 8 (whether the gradient is finite, that status, at most the non-finite
    count)."""
    x, y = torch.randn(8, 6), torch.randint(0, 6, (8,))
    counts = []
    for depth in (1, 7):
        torch.manual_seed(0)
        model = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(6, 6), nn.Tanh())], nn.Linear(6, 6))
        seng = SENG(model, damping=0.5, update_freq=3)
        counts.append(_reads(seng, model, x, y))
    assert counts[0] == counts[1] <= 3, counts
