"""``relative_damping``: each layer's damping is ``λ·tr(UUᵀ)/N``. Float64, against a dense solve per layer built
from per-sample gradients (``torch.func``), with that layer's damping computed from them independently."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG, ExponentialDamping
from tests.reference import dense_direction, per_sample_gradients, rel_err

DAMPING = 0.3


class Net(nn.Module):
    """Layers whose gradients differ in scale: a conv, a LayerNorm, two Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.fc(torch.tanh(self.conv(x)).flatten(1)))))


def _data(seed, n=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def _reference(model, x, y, grads, damping):
    """Per module: (UᵀU + λ_l I)^{-1} g with U = per-sample gradients / √N and λ_l = damping · tr(UUᵀ)/N."""
    names = [k for k, _ in model.named_parameters()]
    ps = per_sample_gradients(model, F.cross_entropy, x, y, names)
    n = x.shape[0]
    out, scales = {}, {}
    for module in ("conv", "fc", "norm", "head"):
        keys = [k for k in names if k.startswith(module + ".")]
        U = torch.cat([ps[k].reshape(n, -1) for k in keys], dim=1) / n ** 0.5
        scales[module] = float((U @ U.T).trace()) / n
        out.update(dense_direction({k: ps[k] for k in keys}, {k: grads[k] for k in keys},
                                   damping * scales[module], n ** -0.5))
    return out, scales


def _step(model, seng, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    seng.step()
    return grads


def test_each_layer_is_damped_by_the_mean_eigenvalue_of_its_gram():
    torch.manual_seed(0)
    model = Net().double()
    seng = SENG(model, damping=DAMPING, update_freq=1, relative_damping=True)
    x, y = _data(0)
    grads = _step(model, seng, x, y)
    ref, scales = _reference(model, x, y, grads, DAMPING)
    for k, p in model.named_parameters():
        assert rel_err(p.grad, ref[k]) < 1e-10, k
    # the layers' scales differ by orders of magnitude, which is the point
    assert max(scales.values()) / min(scales.values()) > 10
    for module, scale in scales.items():
        assert seng.layers[module].curvature.scale == pytest.approx(scale, rel=1e-10)


def test_between_refreshes_the_stale_factors_keep_their_damping_without_refactorising():
    torch.manual_seed(0)
    model = Net().double()
    seng = SENG(model, damping=DAMPING, update_freq=10, relative_damping=True)
    x0, y0 = _data(0)
    _step(model, seng, x0, y0)
    ref_model = Net().double()
    ref_model.load_state_dict(model.state_dict())
    chols = {name: layer.curvature.chol for name, layer in seng.layers.items()}
    x1, y1 = _data(1)
    grads = _step(model, seng, x1, y1)
    assert all(seng.layers[name].curvature.chol is chol for name, chol in chols.items())
    # the reference: U from the refresh batch (at the weights the refresh saw), g from this step
    ref, _ = _reference(ref_model, x0, y0, grads, DAMPING)
    for k, p in model.named_parameters():
        assert rel_err(p.grad, ref[k]) < 1e-10, k


def test_a_damping_schedule_scales_every_layer_alike():
    torch.manual_seed(0)
    model = Net().double()
    schedule = ExponentialDamping(DAMPING, rate=0.5, period=1)
    seng = SENG(model, damping=schedule, update_freq=10, relative_damping=True)
    x0, y0 = _data(0)
    _step(model, seng, x0, y0)
    ref_model = Net().double()
    ref_model.load_state_dict(model.state_dict())
    seng.set_epoch(1)  # λ halves; the layers keep their scales and solve through the eigendecomposition
    x1, y1 = _data(1)
    grads = _step(model, seng, x1, y1)
    ref, _ = _reference(ref_model, x0, y0, grads, DAMPING * 0.5)
    for k, p in model.named_parameters():
        assert rel_err(p.grad, ref[k]) < 1e-9, k


def test_the_scales_survive_a_state_dict_round_trip():
    torch.manual_seed(0)
    model = Net().double()
    seng = SENG(model, damping=DAMPING, update_freq=10, relative_damping=True)
    _step(model, seng, *_data(0))
    state = seng.state_dict()
    seng.remove()  # one SENG per model: the second attaches after the first is removed
    other = SENG(model, damping=DAMPING, update_freq=10, relative_damping=True)
    other.load_state_dict(state)
    assert {n: l.curvature.scale for n, l in other.layers.items()} == \
        {n: l.curvature.scale for n, l in seng.layers.items()}


def test_relative_damping_must_be_a_bool():
    with pytest.raises(ValueError, match=r"relative_damping must be True or False \(got 'yes'\)"):
        SENG(nn.Linear(2, 2), relative_damping="yes")
