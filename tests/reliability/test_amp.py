"""Mixed precision and loss scaling: curvature stays in float32 under bf16/fp16 autocast, the direction
tracks the float32 run's, and ``seng.step(loss_scale=S)`` undoes a loss scaled by ``S`` exactly.

fp16 + GradScaler is checked here on CPU (torch's CPU autocast and ``GradScaler("cpu")``); the CUDA path
is not verified by these tests (no GPU on the test machine)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG
from tests.reference import dense_direction, per_sample_gradients
from tests.reliability._reference import layer_blocks, rel_err

DAMPING = 0.3


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 5 * 5, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))
        return self.head(torch.tanh(self.ln(self.fc(h.flatten(1)))))


def _data(n=12, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g)


def _direction(model, x, y, autocast_dtype=None, **kwargs):
    seng = SENG(model, damping=DAMPING, update_freq=1, **kwargs)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    seng.step()
    seng.remove()
    return {k: p.grad.clone() for k, p in model.named_parameters()}, seng


def _flat(d):
    return torch.cat([v.reshape(-1).double() for v in d.values()])


@pytest.mark.parametrize("amp_dtype, tol", [(torch.bfloat16, 0.04), (torch.float16, 0.006)])
def test_autocast_keeps_curvature_in_float32(amp_dtype, tol):
    torch.manual_seed(0)
    model = ConvNet()
    x, y = _data()
    ref, _ = _direction(model, x, y)
    got, seng = _direction(model, x, y, autocast_dtype=amp_dtype)
    for layer in seng.layers.values():
        cur = layer.curvature
        assert cur is not None, layer.name
        assert cur.gram.dtype == cur.chol.dtype == torch.float32, layer.name
        assert all(t.dtype == torch.float32 for t in cur.route.tensors.values() if t.is_floating_point())
    assert all(g.dtype == torch.float32 for g in got.values())
    # the whole direction, and every layer's, close to the float32 run's (bf16 keeps 8 mantissa bits)
    assert rel_err(_flat(got), _flat(ref)) < tol
    for k in ref:
        assert rel_err(got[k], ref[k]) < 2.5 * tol, k


def test_autocast_bf16_direction_is_a_descent_direction_close_to_fp32():
    torch.manual_seed(0)
    model = ConvNet()
    x, y = _data()
    ref, _ = _direction(model, x, y)
    got, seng = _direction(model, x, y, autocast_dtype=torch.bfloat16)
    cos = float(_flat(got) @ _flat(ref) / (_flat(got).norm() * _flat(ref).norm()))
    assert cos > 0.995
    assert 0 < seng.stats["cosine"] <= 1


@pytest.mark.parametrize("scale", [2.0 ** 16, 0.25, 3.0])
def test_loss_scale_is_divided_out_exactly(scale):
    torch.manual_seed(0)
    model = ConvNet().double()
    x, y = _data(dtype=torch.float64)
    ref, ref_seng = _direction(model, x, y)
    seng = SENG(model, damping=DAMPING, update_freq=1)
    model.zero_grad(set_to_none=True)
    (F.cross_entropy(model(x), y) * scale).backward()
    for p in model.parameters():
        p.grad.div_(scale)
    seng.step(loss_scale=scale)
    for k, p in model.named_parameters():
        assert rel_err(p.grad, ref[k]) < 1e-10, k
    for name, layer in seng.layers.items():
        assert rel_err(layer.curvature.gram, ref_seng.layers[name].curvature.gram) < 1e-10, name


def test_accumulated_micro_batches_use_last_micro_batch_curvature_and_full_gradient():
    """Two micro-batches, each loss / 2 (``loss_scale = 1/2``): the curvature is the last micro-batch's
    empirical Fisher, the gradient the mean over both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (5, 8)]
    ys = [torch.randint(0, 3, (n,), generator=g) for n in (5, 8)]
    names = [k for k, _ in model.named_parameters()]
    model.zero_grad(set_to_none=True)
    for x, y in zip(xs, ys):
        (F.cross_entropy(model(x), y) / 2).backward()
    total = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ps = per_sample_gradients(model, F.cross_entropy, xs[1], ys[1], names)
    ref = {}
    for block in layer_blocks(model, names):
        ref.update(dense_direction({k: ps[k] for k in block}, {k: total[k] for k in block}, DAMPING, 8 ** -0.5))

    seng = SENG(model, damping=DAMPING, update_freq=1)
    for x, y in zip(xs, ys):
        (F.cross_entropy(model(x), y) / 2).backward()
    seng.step(loss_scale=0.5)
    for k, p in model.named_parameters():
        assert rel_err(p.grad, ref[k]) < 1e-10, k


def _scaler_run(init_scale, steps=3):
    torch.manual_seed(0)
    model = ConvNet()
    x, y = _data()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    history = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scale = scaler.get_scale()
        before = [p.detach().clone() for p in model.parameters()]
        seng.step(loss_scale=scale)
        scaler.step(opt)
        scaler.update()
        history.append((scale, before, [p.detach().clone() for p in model.parameters()]))
    return model, seng, history


def test_fp16_grad_scaler_direction_matches_fp32_on_cpu():
    torch.manual_seed(0)
    model = ConvNet()
    x, y = _data()
    ref, _ = _direction(model, x, y)
    torch.manual_seed(0)
    model = ConvNet()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    seng.step(loss_scale=scaler.get_scale())
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert rel_err(_flat(got), _flat(ref)) < 0.006
    assert all(layer.curvature.gram.dtype == torch.float32 for layer in seng.layers.values())


def test_fp16_overflow_step_is_skipped_by_scaler_and_seng_alike():
    # 2**24 overflows fp16 in backward: the scaler skips the step and halves the scale; SENG counts a
    # non-finite step, commits no curvature, and the next steps train normally.
    model, seng, history = _scaler_run(init_scale=2.0 ** 24, steps=14)
    first_scale, before, after = history[0]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert seng.stats["nonfinite_steps"] >= 1
    skipped = seng.stats["nonfinite_steps"]
    assert history[skipped][0] < first_scale
    assert not all(torch.equal(a, b) for a, b in zip(history[-1][1], history[-1][2]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(layer.curvature is not None for layer in seng.layers.values())


@pytest.mark.parametrize("damping, tol", [(1.0, 1e-6), (1e-2, 1e-4), (1e-3, 1e-3)])
def test_float32_curvature_tracks_float64_down_to_small_damping(damping, tol):
    """The SMW form divides by λ, so float32 round-off grows like eps·‖UUᵀ‖/λ: still within ``tol`` of the
    float64 direction for λ >= 1e-3 (N = 64 > d of the LayerNorm, whose N×N Gram is singular)."""
    def direction(dtype):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 10)).to(dtype)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 20, generator=g).to(dtype), torch.randint(0, 10, (64,), generator=g)
        seng = SENG(model, damping=damping, update_freq=1)
        F.cross_entropy(model(x), y).backward()
        seng.step()
        return {k: p.grad.double() for k, p in model.named_parameters()}

    ref, got = direction(torch.float64), direction(torch.float32)
    for k in ref:
        assert rel_err(got[k], ref[k]) < tol, k


def test_bf16_parameters_get_float32_curvature_and_a_close_direction():
    """Pure bf16 training (parameters in bf16, no autocast): factors and solves in float32, the direction
    written back in bf16 and close to the float32 model's."""
    torch.manual_seed(0)
    model = ConvNet()
    x, y = _data()
    ref, _ = _direction(model, x, y)
    got, seng = _direction(model.to(torch.bfloat16), x.to(torch.bfloat16), y)
    assert all(layer.curvature.gram.dtype == torch.float32 for layer in seng.layers.values())
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in got.values())
    assert rel_err(_flat(got), _flat(ref)) < 0.03
