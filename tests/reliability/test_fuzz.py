"""Fuzz: random small architectures (Linear, Conv1d/2d, LayerNorm/GroupNorm, shared layers, sequences,
frozen parameters), random batch sizes, routes and reductions; the SENG direction must equal the
block-diagonal dense reference in float64 (relative 1e-9). The implicit route gets ``svd_rank`` at least
the number of positions, where its truncation is exact."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG
from tests.reliability._reference import batch_gradient, layer_blocks, seng_blocks

N_CASES = 30
TOL = 1e-9
ACTS = [torch.tanh, torch.sigmoid, lambda t: F.gelu(t), lambda t: F.softplus(t)]


class Program(nn.Module):
    """Modules plus a list of steps: ``("m", name)`` applies a module, ``("shared", name)`` applies it
    again with a residual, ``("act", i)`` an activation, ``("pool", _)`` a mean over positions."""

    def __init__(self):
        super().__init__()
        self.mods = nn.ModuleDict()
        self.steps = []

    def add(self, name, module, kind="m"):
        if name not in self.mods:
            self.mods[name] = module
        self.steps.append((kind, name))

    def forward(self, x):
        for kind, arg in self.steps:
            if kind == "m":
                x = self.mods[arg](x)
            elif kind == "shared":
                x = x + self.mods[arg](x)
            elif kind == "act":
                x = ACTS[arg](x)
            elif kind == "flatten":
                x = x.flatten(1)
            elif kind == "pool":
                x = x.mean(1)
        return x


def _linear(rng, d_in, d_out):
    return nn.Linear(d_in, d_out, bias=rng.random() < 0.8)


def _conv(rng, dims, c_in, size):
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    groups = rng.choice([g for g in (1, 2) if c_in % g == 0])
    c_out = groups * rng.randint(1, 3)
    k = rng.choice([1, 2, 3])
    dilation = rng.choice([1, 2]) if k > 1 else 1
    padding = rng.choice([0, 1])
    mode = rng.choice(["zeros", "zeros", "reflect", "circular"]) if padding else "zeros"
    stride = rng.choice([1, 1, 2])
    if size + 2 * padding < dilation * (k - 1) + 1:
        k, dilation = 1, 1
    return conv(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                bias=rng.random() < 0.8, padding_mode=mode), c_out


def build_case(seed):
    rng = random.Random(seed)
    kind = rng.choice(["vec", "seq", "conv1d", "conv2d"])
    n = rng.randint(1, 8)
    classes = rng.randint(2, 4)
    prog = Program()
    if kind in ("vec", "seq"):
        d = rng.randint(2, 5)
        shape = (d,) if kind == "vec" else (rng.randint(2, 4), d)
        for i in range(rng.randint(1, 3)):
            d_out = rng.randint(2, 6)
            prog.add(f"fc{i}", _linear(rng, d, d_out))
            d = d_out
            if rng.random() < 0.4:
                prog.add(f"ln{i}", nn.LayerNorm(d, bias=rng.random() < 0.7))
            prog.steps.append(("act", rng.randrange(len(ACTS))))
            if rng.random() < 0.5:
                name = f"shared{i}"
                prog.add(name, nn.Linear(d, d))
                prog.steps.append(("act", 0))
                prog.add(name, prog.mods[name], "shared")
        if kind == "seq":
            prog.steps.append(("pool", None))
        prog.add("head", _linear(rng, d, classes))
    else:
        dims = 1 if kind == "conv1d" else 2
        c = rng.randint(1, 3)
        size = rng.randint(4, 6)
        shape = (c,) + (size,) * dims
        for i in range(rng.randint(1, 2)):
            conv, c = _conv(rng, dims, c, size)
            prog.add(f"conv{i}", conv)
            if rng.random() < 0.5:
                groups = rng.choice([g for g in (1, 2, c) if c % g == 0])
                prog.add(f"gn{i}", nn.GroupNorm(groups, c, affine=rng.random() < 0.85))
            prog.steps.append(("act", rng.randrange(len(ACTS))))
            size = prog(torch.zeros(1, *shape)).shape[-1]
            if rng.random() < 0.4:
                name = f"shared{i}"
                conv_cls = nn.Conv1d if dims == 1 else nn.Conv2d
                prog.add(name, conv_cls(c, c, 3, padding=1, padding_mode=rng.choice(["zeros", "circular"])))
                prog.steps.append(("act", 0))
                prog.add(name, prog.mods[name], "shared")
        prog.steps.append(("flatten", None))
        flat = prog(torch.zeros(1, *shape)).shape[1]
        prog.add("head", _linear(rng, flat, classes))

    torch.manual_seed(seed)
    for m in prog.modules():  # non-trivial affine parameters for the norm layers
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.5, 0.5)
    prog = prog.double()
    params = [p for p in prog.parameters()]
    if rng.random() < 0.25:  # freeze one parameter tensor
        rng.choice(params).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    options = dict(route=rng.choice(["auto", "explicit", "gram", "implicit"]), svd_rank=10_000,
                   loss_reduction=rng.choice(["mean", "sum"]), damping=round(rng.uniform(0.05, 2.0), 3))
    if rng.random() < 0.3:
        options["implicit_threshold"] = 0  # auto may pick the implicit route too
    return prog, x, y, options


@pytest.mark.parametrize("seed", range(N_CASES))
def test_random_architecture_matches_dense_reference(seed):
    model, x, y, options = build_case(seed)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    reduction = options["loss_reduction"]
    grads = batch_gradient(model, F.cross_entropy, x, y, names, reduction)
    ref = seng_blocks(model, F.cross_entropy, x, y, options["damping"], layer_blocks(model, names), grads=grads)

    seng = SENG(model, update_freq=1, **options)
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y, reduction=reduction)
    loss.backward()
    seng.step()
    preconditioned = {k for k in names if k.rsplit(".", 1)[0] in seng.layers}
    assert preconditioned == set(names), (options, sorted(set(names) - preconditioned))
    # per layer block: a bias in front of a norm layer has an exactly-zero gradient (rounding noise)
    params = dict(model.named_parameters())
    total = torch.cat([ref[k].reshape(-1) for k in names]).norm()
    for block in layer_blocks(model, names):
        got = torch.cat([params[k].grad.reshape(-1) for k in block])
        want = torch.cat([ref[k].reshape(-1) for k in block])
        err = float((got - want).norm() / max(want.norm(), 1e-8 * total))
        assert err < TOL, (block, options, err)
