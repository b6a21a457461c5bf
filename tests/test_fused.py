"""The fused step between refreshes (``lightning_seng/fused.py``): the same directions as the per-layer path and as
the dense reference, the same non-finite guard, a plan rebuilt whenever what it holds changes, and one function
that ``torch.compile(fullgraph=True)`` traces whole."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.opcount import OpCounter
from lightning_seng import SENG, fused, sketch
from lightning_seng.layers import linear
from lightning_seng.schedules import ExponentialDamping

from .reference import dense_direction, per_sample_gradients


class Mixed(nn.Module):
    """Explicit routes (conv with and without bias, BatchNorm), plain Linear Gram routes, a parameter of the root
    (generic), and an attention layer (its own path)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, bias=False)
        self.fc = nn.Linear(3 * 4 * 4, 40)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(40, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        h = self.conv2(torch.tanh(self.bn(self.conv(x))))
        h = torch.tanh(self.fc(h.flatten(1)))
        t = h.view(h.shape[0], 5, 8)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.out(t.flatten(1)) * self.scale


def mlp():
    return nn.Sequential(nn.Linear(6, 30), nn.Tanh(), nn.Linear(30, 30), nn.Tanh(), nn.Linear(30, 3, bias=False))


def _pair(make, dtype, **options):
    torch.manual_seed(0)
    model = make().to(dtype)
    twin = copy.deepcopy(model)
    fused_seng = SENG(model, log_coverage=False, **options)
    plain_seng = SENG(twin, log_coverage=False, **options)
    plain_seng._step_plan = lambda *args: None  # the per-layer path, as before the fused step
    return (model, fused_seng), (twin, plain_seng)


def _inputs(make, dtype, n=6, step=0):
    g = torch.Generator().manual_seed(100 + step)
    shape = (n, 6) if make is mlp else (n, 2, 6, 6)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _run(pairs, make, dtype, steps, before_step=None):
    worst = 0.0
    used = 0
    for step in range(steps):
        x, y = _inputs(make, dtype, step=step)
        for model, seng in pairs:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            if before_step is not None:
                before_step(model, step)
            seng.step()
        (m1, s1), (m2, _) = pairs
        used += s1._plan is not None and not s1.will_refresh
        for p, q in zip(m1.parameters(), m2.parameters()):
            worst = max(worst, ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30)).item())
    return worst, used


@pytest.mark.parametrize("make", [mlp, Mixed], ids=["mlp", "mixed"])
@pytest.mark.parametrize("options", [dict(), dict(relative_damping=True), dict(damping=ExponentialDamping(0.3, 0.9)),
                                     dict(batch_shortcut=False)], ids=["constant", "relative", "schedule", "no-shortcut"])
def test_the_fused_step_gives_the_per_layer_directions_in_float64(make, options):
    options = {"damping": 0.3, "update_freq": 3, **options}
    pairs = _pair(make, torch.float64, **options)
    worst, used = _run(pairs, make, torch.float64, 8)
    assert used >= 4  # the plan served the steps between refreshes
    assert worst < 1e-12


def test_the_fused_step_matches_the_dense_reference():
    """Between refreshes, per layer: (UᵀU + λI)^{-1} g with U's rows the refresh step's per-sample gradients over
    √N (mean loss), from torch.func, and g this step's gradient, against what the plan wrote."""
    torch.manual_seed(1)
    model = mlp().double()
    names = [n for n, _ in model.named_parameters()]
    seng = SENG(model, damping=0.3, update_freq=5, log_coverage=False)
    x0, y0 = _inputs(mlp, torch.float64, step=0)
    per_sample = per_sample_gradients(model, F.cross_entropy, x0, y0, names)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x0), y0).backward()
    seng.step()  # the refresh
    for step in (1, 2):
        x, y = _inputs(mlp, torch.float64, step=step)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters()}
        seng.step()
        assert seng._plan is not None and not seng._plan.rest
        for module in ("0", "2", "4"):
            keys = [n for n in names if n.startswith(module + ".")]
            want = dense_direction({k: per_sample[k] for k in keys}, {k: g[k] for k in keys}, 0.3, x0.shape[0] ** -0.5)
            for k in keys:
                torch.testing.assert_close(dict(model.named_parameters())[k].grad, want[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("on_device", [False, True], ids=["host-read", "device-guard"])
def test_a_nan_between_refreshes_zeroes_every_gradient(on_device, monkeypatch):
    """On the CPU the flag is read (it waits for nothing) and the gradients are zeroed only when it is set; the path
    any other device takes, the guard on the device with no host read, is forced here by emptying
    ``HOST_READ_DEVICES``."""
    if on_device:
        monkeypatch.setattr(fused, "HOST_READ_DEVICES", ())
    pairs = _pair(Mixed, torch.float64, damping=0.3, update_freq=4)

    def poison(model, step):
        if step == 2:
            model.fc.weight.grad[0, 0] = float("nan")
        if step == 5:
            model.out.bias.grad[1] = float("inf")
    _run(pairs, Mixed, torch.float64, 3, poison)
    (model, seng), _ = pairs
    assert all(torch.equal(p.grad, torch.zeros_like(p.grad)) for p in model.parameters())
    _run(pairs, Mixed, torch.float64, 3)
    assert seng.nonfinite_steps == 1
    assert seng._plan.host_readable is not on_device
    # a step between refreshes: one host read (the flag) on the CPU, none on the device path
    x, y = _inputs(Mixed, torch.float64, step=9)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    assert not seng.will_refresh
    with OpCounter() as counter:
        seng.step()
    assert counter.host_reads == (0 if on_device else 1)


@pytest.mark.parametrize("make", [mlp, Mixed], ids=["mlp", "mixed"])
@pytest.mark.parametrize("watched", [False, True], ids=["from-grad", "watched"])
def test_plain_linear_layers_on_their_gram_route(make, watched, monkeypatch):
    """Every plain Linear applied from G and X (no U built for the plan: ``SMALL_U = 0``, which also sends the
    convolutions' blocks one by one): the Linear rows of a solve group stacked at once (the MLP) or added among
    the convolutions' (mixed: one N), U g' from ``.grad`` (``rowsum(G ∘ (X Wᵀ + 1 bᵀ))``) or, for a watched layer,
    from the batch, beside layers whose U g' is not; a Linear without bias; both factor orientations."""
    monkeypatch.setattr(fused, "SMALL_U", 0)
    calls = []
    if watched:
        monkeypatch.setattr(linear, "MIN_SAVING", 0)
        real = sketch.batch_u_dot
        monkeypatch.setattr(sketch, "batch_u_dot", lambda *args: calls.append(1) or real(*args))
    pairs = _pair(make, torch.float64, damping=0.3, update_freq=3)
    worst, used = _run(pairs, make, torch.float64, 8)
    (_, seng), _ = pairs
    assert used >= 4
    assert len(seng._plan.linears) == 3 if make is mlp else 2
    assert worst < 1e-12
    assert bool(calls) is watched  # the MLP's middle layer and the mixed model's fc: their batch form is cheaper


@pytest.mark.parametrize("watchable", [False, True])
def test_the_forward_hooks_idle_between_refreshes_when_no_layer_can_be_watched(watchable, monkeypatch):
    """Layers this small save nothing by keeping their batch: after the first refresh the layers' forward hooks
    return at once between refreshes (``_forward`` runs on refresh steps only) and still capture on refreshes;
    where a layer may be watched, they run on every step."""
    if watchable:
        monkeypatch.setattr(linear, "MIN_SAVING", 0)
    torch.manual_seed(0)
    model = mlp().double()
    seng = SENG(model, damping=0.3, update_freq=3, log_coverage=False)
    calls, refreshed = [], []
    real = seng._forward
    monkeypatch.setattr(seng, "_forward", lambda *args: calls.append(seng.step_count) or real(*args))
    for step in range(7):
        x, y = _inputs(mlp, torch.float64, step=step)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        before = [layer.curvature for layer in seng.layers.values()]
        seng.step()
        refreshed.append(all(layer.curvature is not cur for layer, cur in zip(seng.layers.values(), before)))
    assert sorted(set(calls)) == (list(range(7)) if watchable else [0, 3, 6])
    assert refreshed == [True, False, False, True, False, False, True]
    assert seng._observing is watchable


@pytest.mark.parametrize("with_rest", [False, True])
def test_the_device_guard_clears_nan_and_inf_and_leaves_finite_gradients_exact(with_rest):
    grads = [torch.tensor([1.5, float("nan"), -2.0]), torch.tensor([[float("inf"), 3.0]]), torch.tensor([-0.0, 7.0])]
    found = torch.ones(1)
    fused.clear_nonfinite_(grads, found)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    x = torch.randn(1000, dtype=torch.float32) * torch.logspace(-40, 38, 1000)
    kept = [x.clone(), x.double()]
    fused.clear_nonfinite_(kept, torch.zeros(1))
    assert torch.equal(kept[0], x) and torch.equal(kept[1], x.double())


@pytest.mark.parametrize("make", [mlp, Mixed], ids=["mlp", "mixed"])
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_a_damping_that_moves_every_step_keeps_the_plan_and_the_per_layer_directions(make, relative):
    """λ = 0.3·0.5^step (times each layer's tr(K)/N under ``relative_damping``): between refreshes the plan stays
    the same object (its scales and the solves' diagonals written in place, the solves through each curvature's
    eigendecomposition), and the directions are the per-layer path's in float64."""
    pairs = _pair(make, torch.float64, damping=ExponentialDamping(0.3, 0.5, steps_per_epoch=1), update_freq=4,
                  relative_damping=relative)
    (model, seng), _ = pairs
    plans, dampings = [], []
    worst = 0.0
    for step in range(8):
        x, y = _inputs(make, torch.float64, step=step)
        refresh = seng.will_refresh
        dampings.append(seng.damping)
        for m, s in pairs:
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            s.step()
        plans.append(None if refresh else seng._plan)
        (m1, _), (m2, _) = pairs
        for p, q in zip(m1.parameters(), m2.parameters()):
            worst = max(worst, ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30)).item())
    assert len(set(dampings)) == 8
    assert plans[1] is plans[2] is plans[3] is not None and plans[5] is plans[6] is plans[7] is not plans[3]
    assert plans[3].fixed_damping is None and any(d is not None for d in plans[3].solve_diagonals)
    assert worst < 1e-12


def test_the_plan_is_rebuilt_when_what_it_holds_changes():
    (model, seng), _ = _pair(mlp, torch.float64, damping=0.3, update_freq=3)
    plans = []

    def step(i):
        x, y = _inputs(mlp, torch.float64, step=i)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        seng.step()
        plans.append(seng._plan)
    for i in range(3):
        step(i)
    assert plans[1] is plans[2] is not None  # kept between refreshes
    step(3)  # a refresh: new curvatures
    step(4)
    assert plans[4] is not plans[2]
    model[2].weight.requires_grad_(False)  # the trainable set changed: the layer has no usable curvature
    step(5)
    assert plans[5] is not plans[4]
    assert not any(p is model[2].weight for p in plans[5].params)
    model[2].weight.requires_grad_(True)
    seng.remove()
    assert seng._plan is None


@pytest.mark.parametrize("moving", [False, True], ids=["constant", "per-step-schedule"])
def test_one_function_traces_whole_with_fullgraph(moving):
    """``fused.step_tensors`` under ``torch.compile(fullgraph=True)``: no graph break (fullgraph raises on one),
    the same directions as eagerly, and a recompile neither for new gradients nor after a refresh, nor, under a
    damping that moves every step (the solves through the eigendecomposition), for a new damping."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fused.step_tensors, fullgraph=True, backend="aot_eager")
    model = Mixed().double()
    seng = SENG(model, damping=ExponentialDamping(0.3, 0.5, steps_per_epoch=1) if moving else 0.3, update_freq=3,
                log_coverage=False)
    twin = copy.deepcopy(model)
    for step in range(7):
        x, y = _inputs(Mixed, torch.float64, step=step)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        plan = seng._step_plan([(n, p) for n, p in model.named_parameters() if p.grad is not None], seng.damping) \
            if not seng.will_refresh else None
        if plan is None:
            seng.step()
            continue
        grads = [p.grad for p in plan.params] + [p.grad for p in plan.rest_params]
        eager = [g.clone() for g in grads]
        compiled(*plan.arguments(grads), guard=True)
        fused.step_tensors(*plan.arguments(eager), guard=True)
        for a, b in zip(grads, eager):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        seng.step_count += 1
        for layer in seng.layers.values():
            layer.release()
    assert counters["stats"]["unique_graphs"] == 1


def test_compile_step_is_validated_and_runs():
    with pytest.raises(ValueError, match="compile_step must be one of .*reduce-overhead.*'fast'"):
        SENG(mlp(), compile_step="fast", log_coverage=False)
    with pytest.raises(ValueError, match="compile_step must be True, False or a torch.compile mode"):
        SENG(mlp(), compile_step=1, log_coverage=False)
    assert SENG(mlp(), compile_step=True, log_coverage=False).compile_step == "default"


def test_the_parameters_with_a_gradient_are_named_parameters_after_any_change_to_the_model():
    """``SENG._with_grad`` keeps the module walk between steps: it must still give ``named_parameters()``'s names
    and order (shared parameters once) after a module is added, replaced, or a parameter put in place of another."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.body = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.body(self.emb(x)))

    model = Tied()
    seng = SENG(model, log_coverage=False)

    def check():
        model(torch.randint(0, 7, (5,))).sum().backward()
        want = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        got = seng._with_grad()
        assert [n for n, _ in got] == [n for n, _ in want]
        assert all(a is b for (_, a), (_, b) in zip(got, want))
    check()
    model.body.append(nn.Linear(4, 4))  # a module added inside a child
    check()
    model.body[0] = nn.Linear(4, 4)  # a module put in place of another
    check()
    model.body[2].weight = nn.Parameter(torch.randn(4, 4))  # a parameter put in place of another
    check()
    model.extra = nn.Parameter(torch.ones(()))  # a parameter of the root (no gradient: not listed)
    check()


def test_a_parameter_deleted_and_another_added_in_one_module_is_seen():
    class Scales(nn.Module):  # multiplies by each of its parameters, whatever their names
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))

        def forward(self, x):
            for p in self._parameters.values():
                x = x * p
            return x

    model = nn.Sequential(nn.Linear(3, 3), Scales())
    seng = SENG(model, log_coverage=False)
    model(torch.randn(4, 3)).sum().backward()
    seng._with_grad()
    del model[1].b  # the same number of parameters in that module, under another name
    model[1].c = nn.Parameter(torch.ones(3))
    model.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    want = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    assert [n for n, _ in seng._with_grad()] == [n for n, _ in want]
