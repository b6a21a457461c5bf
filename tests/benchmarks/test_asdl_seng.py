"""ASDL's SENG as a benchmark peer: it trains the digits MLP and CNN, and its direction on one Linear layer is the
formula benchmarks/peers.py documents for it."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call, grad, vmap

from benchmarks.peers import make_stepper, missing_reason
from benchmarks.problems import build_problem

pytestmark = pytest.mark.skipif(missing_reason("asdl_seng") is not None, reason="asdfghjkl is not installed")

BLOCK = dict(momentum=0.9, weight_decay=0.0, damping=0.5, update_freq=2, sketching_size=256, truncated_rank=16)


@pytest.mark.parametrize("name,size", [("mlp", {"width": 32}), ("cnn", {"channels": 4})])
def test_it_trains_the_digits_problems_a_few_steps(name, size):
    problem = build_problem(name, OmegaConf.create(dict(size, target=0.9)))
    torch.manual_seed(0)
    model = problem.make_model()
    stepper = make_stepper("asdl_seng", model, problem.loss_fn, 0.05, OmegaConf.create(BLOCK), 0,
                           problem.loss_kind, 64)
    x, y = problem.train.x[:64], problem.train.y[:64]
    before = [p.detach().clone() for p in model.parameters()]
    losses = [stepper.train_step(x, y) for _ in range(5)]  # refreshes at steps 0, 2, 4
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with torch.no_grad():  # the loss it reports is the batch mean, as every other peer's
        assert abs(float(problem.loss_fn(model(x), y)) - losses[-1]) < 0.5


def test_its_direction_on_a_linear_layer_is_the_documented_one_not_the_exact_one():
    torch.manual_seed(0)
    n, d_in, d_out, damping = 6, 5, 3, 0.3
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    x, y = torch.randn(n, d_in, dtype=torch.float64), torch.randint(d_out, (n,))
    block = OmegaConf.create(dict(BLOCK, momentum=0.0, damping=damping, update_freq=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stepper = make_stepper("asdl_seng", model, F.cross_entropy, 0.0, block, 0, "cross_entropy", n)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    stepper.train_step(x, y)
    direction = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1).flatten()

    def sample_loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    rows = torch.cat([per_sample["0.weight"], per_sample["0.bias"][:, :, None]], 2).reshape(n, -1)
    g, u = rows.mean(0), rows / n ** 0.5
    exact = torch.linalg.solve(u.T @ u + damping * torch.eye(u.shape[1], dtype=torch.float64), g)
    correction = u.T @ torch.linalg.solve(damping * torch.eye(n, dtype=torch.float64) + u @ u.T, u @ g)
    documented = (g - correction / n) / damping

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(direction, documented) < 0.15  # what is left is the outer-product approximation of Uᵀv
    assert rel(direction, exact) > 1.0
