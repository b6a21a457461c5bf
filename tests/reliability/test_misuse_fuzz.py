"""Misuse fuzzer: random architectures under random usages that the layer routes do not foresee (hooks on
parameters, gradient accumulation, extra loss terms that reach parameters outside the modules' calls, gradient
clipping, a ``loss_reduction`` that does not match the loss). Whatever happens, every layer is **exact or
announced**: either its direction matches the dense float64 reference (``(UᵀU + λI)^{-1}·.grad`` with ``U`` from
``torch.func`` per-sample gradients of the last micro-batch's per-sample losses), or it gets ``g / (1 + λ)`` and a
WARNING named it."""

import logging
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG
from tests.reference import dense_direction, per_sample_gradients, rel_err

N_CASES = 48
DAMPING = 0.3


class TwoOutputs(nn.Module):
    """A custom module (generic route) returning ``(h, tanh(h))``."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        h = x @ self.weight
        return h, torch.tanh(h)


class Net(nn.Module):
    def __init__(self, rng, d_in, classes):
        super().__init__()
        d = rng.choice([5, 7])
        layers = [nn.Linear(d_in, d)]
        if rng.random() < 0.5:
            layers.append(nn.LayerNorm(d))
        self.body = nn.Sequential(*layers)
        self.custom = TwoOutputs(d) if rng.random() < 0.5 else None
        self.head = nn.Linear(d, classes, bias=rng.random() < 0.7)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        if self.custom is not None:
            a, b = self.custom(h)
            h = a * b if self.custom.weight.shape[0] % 2 else a + b
        return self.head(h)


def _usage(rng):
    return dict(
        hook=rng.choice([None, "tensor", "tensor-late", "post-accumulate", "post-accumulate-layer"]),
        micro_batches=rng.choice([1, 1, 2]),
        extra=rng.choice([None, None, "l2-in-loss", "weight-outside", "input-gradient", "jacobian"]),
        clip=rng.random() < 0.25,
        reduction=rng.choice(["mean", "sum"]),
        setting_matches=rng.random() < 0.75,
    )


def _double(p):
    p.grad.mul_(2.0)


def _case(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    d_in, classes = rng.choice([(4, 3), (6, 5)])
    model = Net(rng, d_in, classes).double()
    usage = _usage(rng)
    n = rng.choice([5, 8])
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g))
               for _ in range(usage["micro_batches"])]
    return rng, model, usage, batches


def _hooked_param(rng, model):
    params = [(k, p) for k, p in model.named_parameters()]
    return params[rng.randrange(len(params))]


@pytest.mark.parametrize("seed", range(N_CASES))
def test_every_layer_is_exact_or_announced(seed, caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    rng, model, usage, batches = _case(seed)
    setting = usage["reduction"] if usage["setting_matches"] else {"mean": "sum", "sum": "mean"}[usage["reduction"]]
    hook = usage["hook"]
    if hook == "tensor":  # registered before SENG: SENG's accumulator pre-hook sees its result
        _, p = _hooked_param(rng, model)
        p.register_hook(lambda grad: 2.0 * grad)
    seng = SENG(model, damping=DAMPING, update_freq=1, loss_reduction=setting)
    if hook == "tensor-late":
        _, p = _hooked_param(rng, model)
        p.register_hook(lambda grad: 2.0 * grad)
    elif hook == "post-accumulate":
        _, p = _hooked_param(rng, model)
        p.register_post_accumulate_grad_hook(_double)
    elif hook == "post-accumulate-layer":  # every parameter of one module: a whole layer rescaled
        for p in rng.choice([model.body[0], model.head]).parameters():
            p.register_post_accumulate_grad_hook(_double)

    def per_sample_losses(out, y):
        return F.cross_entropy(out, y, reduction="none")

    k = len(batches)
    model.zero_grad()
    for x, y in batches:
        xr = x.clone().requires_grad_(usage["extra"] == "input-gradient")
        losses = per_sample_losses(model(xr), y)
        loss = losses.mean() if usage["reduction"] == "mean" else losses.sum()
        if usage["extra"] == "l2-in-loss":
            loss = loss + 1e-2 * model.head.weight.square().sum()
        elif usage["extra"] == "weight-outside":
            loss = loss + 1e-2 * F.linear(x[:, :model.body[0].in_features], model.body[0].weight).square().mean()
        elif usage["extra"] == "jacobian":  # a vmap(jacrev(model)) term: forwards inside torch.func transforms
            loss = loss + 1e-2 * torch.func.vmap(torch.func.jacrev(model))(x).square().sum()
        elif usage["extra"] == "input-gradient":
            (gx,) = torch.autograd.grad(loss, xr, create_graph=True)
            loss = loss + gx.square().sum()
        seng.observe_loss(loss / k)
        (loss / k).backward()
    if usage["clip"]:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-2)
    before = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    seng.step(loss_scale=1.0 / k)
    after = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    seng.remove()

    x, y = batches[-1]
    names = {id(p): name for name, p in model.named_parameters()}
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    failures = []
    for layer_name, layer in seng.layers.items():
        block = [names[id(p)] for p in layer.trainable_params(layer.trainable()) if names[id(p)] in before]
        if layer.curvature is None:
            announced = f"'{layer_name}'" in warned or "loss_reduction" in warned
            if not announced:
                failures.append(f"{layer_name}: no curvature and no warning")
            for name in block:
                if rel_err(after[name], before[name] / (1 + DAMPING)) > 1e-12:
                    failures.append(f"{name}: fallback is not g / (1 + λ)")
            continue
        ps = per_sample_gradients(model, lambda out, t: per_sample_losses(out, t).mean(), x, y, block)
        ref = dense_direction(ps, {name: before[name] for name in block}, DAMPING, x.shape[0] ** -0.5)
        err = rel_err(torch.cat([after[name].reshape(-1) for name in block]),
                      torch.cat([ref[name].reshape(-1) for name in block]))
        if not err < 1e-8:
            failures.append(f"{layer_name} {block}: {err:.2e} from the dense reference, not announced ({usage})")
    assert not failures, "\n".join(failures)
