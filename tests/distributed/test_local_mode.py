"""``local`` mode: each rank preconditions the global gradient with its own batch's curvature and
the directions are averaged, in one all-reduce per step."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_seng import SENG
from lightning_seng.distributed import LocalComm

from .dist_harness import run_on_ranks
from .nets import local_mode_reference, make_batch, make_net, rank_slices, rel_err

SIZES = (5, 3)
STEPS = 3             # refresh, reuse of the stored curvature, refresh
UPDATE_FREQ = 2
LR = 0.1
DAMPING = 0.3


def _reference(x, y):
    """Directions per step built without any communication: one single-process SENG per rank's
    batch, each fed the global-batch gradient, averaged; the weights follow the averaged direction."""
    model = make_net()
    replicas = [copy.deepcopy(model) for _ in SIZES]
    sengs = [SENG(m, damping=DAMPING, update_freq=UPDATE_FREQ) for m in replicas]
    return local_mode_reference(model, sengs, replicas, x, y, rank_slices(SIZES), STEPS, LR)


def _distributed(x, y, rank):
    model = make_net()
    comm = LocalComm()
    seng = SENG(model, damping=DAMPING, update_freq=UPDATE_FREQ, comm=comm)
    part = rank_slices(SIZES)[rank]
    out, calls = [], []
    for _ in range(STEPS):
        model.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        for p in model.parameters():
            p.grad.mul_((part.stop - part.start) / sum(SIZES))
            dist.all_reduce(p.grad)
        before = comm.calls
        seng.step()
        calls.append(comm.calls - before)
        out.append([p.grad.clone() for p in model.parameters()])
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(LR * p.grad)
    return out, calls


def _local_equals_mean_of_single_process_directions(rank, world_size):
    x, y = make_batch(sum(SIZES))
    got, _ = _distributed(x, y, rank)
    want = _reference(x, y)
    for step, (g_step, w_step) in enumerate(zip(got, want)):
        for g, w in zip(g_step, w_step):
            assert rel_err(g, w) < 1e-10, (step, rel_err(g, w))


def _local_uses_one_all_reduce_per_step(rank, world_size):
    x, y = make_batch(sum(SIZES))
    _, calls = _distributed(x, y, rank)
    # refresh steps add the one-flag agreement; every step has exactly one all-reduce of directions
    assert calls == [2, 1, 2], calls


def test_local_mode_equals_mean_of_per_rank_single_process_directions():
    run_on_ranks(_local_equals_mean_of_single_process_directions)


def test_local_mode_reduces_all_layers_in_one_all_reduce_per_step():
    run_on_ranks(_local_uses_one_all_reduce_per_step)
