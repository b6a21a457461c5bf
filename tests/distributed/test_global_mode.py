"""``global`` mode: the SENG direction on 2 ranks equals one process on the concatenated batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_seng import SENG
from lightning_seng.distributed import GlobalComm

from .dist_harness import run_on_ranks
from .nets import make_batch, make_generic_net, make_net, rel_err

SIZES = (5, 3)        # unequal local batches
STEPS = 3             # refresh, reuse of the stored curvature, refresh
UPDATE_FREQ = 2
LR = 0.1


def _run(x, y, comm, route, reduction="mean", sizes=None, make_model=make_net, loss_fn=F.cross_entropy):
    """STEPS of SENG + plain SGD; returns the directions (``.grad`` after ``seng.step``) per step.

    With ``sizes`` (distributed), the local gradients are combined into the gradient of the global
    loss: weights ``n_r / N`` for mean-reduced local losses, a plain sum for sum-reduced ones."""
    model = make_model()
    seng = SENG(model, damping=0.3, update_freq=UPDATE_FREQ, route=route, svd_rank=2, loss_reduction=reduction,
                comm=comm)
    directions = []
    for _ in range(STEPS):
        model.zero_grad()
        loss_fn(model(x), y, reduction=reduction).backward()
        if sizes is not None:
            weight = x.shape[0] / sum(sizes) if reduction == "mean" else 1.0
            for p in model.parameters():
                p.grad.mul_(weight)
                dist.all_reduce(p.grad)
        seng.step()
        directions.append([p.grad.clone() for p in model.parameters()])
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(LR * p.grad / (1 if reduction == "mean" else sum(SIZES)))
    return directions, seng


def _global_equals_single_process(rank, world_size):
    x, y = make_batch(sum(SIZES))
    start = sum(SIZES[:rank])
    local = slice(start, start + SIZES[rank])
    for route, reduction in (("auto", "mean"), ("gram", "mean"), ("implicit", "mean"), ("auto", "sum")):
        got, seng = _run(x[local], y[local], GlobalComm(loss_reduction=reduction), route, reduction, sizes=SIZES)
        want, reference = _run(x, y, None, route, reduction)
        assert reference.stats["layers/" + ("explicit" if route == "auto" else route)] >= 1
        assert seng.stats["skipped_refreshes"] == 0
        for step, (g_step, w_step) in enumerate(zip(got, want)):
            for g, w in zip(g_step, w_step):
                assert rel_err(g, w) < 1e-10, (route, reduction, step, rel_err(g, w))


def test_global_mode_equals_single_process_on_concatenated_batch():
    run_on_ranks(_global_equals_single_process)


def _generic_global_equals_single_process(rank, world_size):
    x, y = make_batch(sum(SIZES))
    start = sum(SIZES[:rank])
    local = slice(start, start + SIZES[rank])
    for reduction in ("mean", "sum"):
        got, seng = _run(x[local], y[local], GlobalComm(loss_reduction=reduction), "auto", reduction, sizes=SIZES,
                         make_model=make_generic_net)
        want, reference = _run(x, y, None, "auto", reduction, make_model=make_generic_net)
        assert reference.stats["layers/generic"] == 3 and not reference._reasons
        for step, (g_step, w_step) in enumerate(zip(got, want)):
            for g, w in zip(g_step, w_step):
                assert rel_err(g, w) < 1e-10, (reduction, step, rel_err(g, w))


def test_global_mode_generic_layers_equal_single_process_on_concatenated_batch():
    run_on_ranks(_generic_global_equals_single_process)


def _collectives_per_step(rank, world_size):
    x, y = make_batch(sum(SIZES))
    start = sum(SIZES[:rank])
    comm = GlobalComm()
    model = make_net()
    seng = SENG(model, damping=0.3, update_freq=UPDATE_FREQ, comm=comm)
    assert 1 <= sum(comm.owns(name) for name in seng.layers) < len(seng.layers)  # every rank owns some
    calls = []
    for _ in range(STEPS):
        model.zero_grad()
        F.cross_entropy(model(x[start:start + SIZES[rank]]), y[start:start + SIZES[rank]]).backward()
        before = comm.calls
        seng.step()
        calls.append(comm.calls - before)
    # refresh: shapes all-gather + factors all-to-all + agreement + one broadcast per owner; else the broadcasts
    assert calls == [5, 2, 5], calls


def test_global_mode_sends_factors_in_one_all_to_all_and_directions_in_one_broadcast_per_owner():
    run_on_ranks(_collectives_per_step)
