"""``fisher="mc"`` under both distributed modes (2 gloo processes): ``global`` equals one process on the
concatenated batch with the same sampled targets; ``local`` equals the mean of per-rank single-process directions
built from each rank's own draw."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_seng import SENG
from lightning_seng.distributed import GlobalComm, LocalComm

from .dist_harness import run_on_ranks
from .nets import local_mode_reference, make_batch, make_net, rank_slices, rel_err

SIZES = (5, 3)
STEPS = 3             # refresh, reuse of the stored curvature, refresh
UPDATE_FREQ = 2
LR = 0.1
DAMPING = 0.3


def _fixed_targets(step_of, targets, part):
    """A likelihood whose "draw" is a fixed table of targets per step (the same on one or two processes)."""
    def likelihood(out, generator):
        return F.cross_entropy(out, targets[step_of()][part], reduction="none")
    return likelihood


def _run(x, y, comm, likelihood, part=None, weight=1.0):
    """STEPS of SENG(fisher="mc") + SGD; returns the directions and the targets drawn at each refresh."""
    model = make_net()
    holder = {}
    like = likelihood(lambda: holder["seng"].step_count) if callable(likelihood) and not isinstance(likelihood, str) \
        else likelihood
    seng = holder["seng"] = SENG(model, damping=DAMPING, update_freq=UPDATE_FREQ, comm=comm, fisher="mc",
                                 likelihood=like)
    part = part or slice(None)
    directions, draws = [], []
    for _ in range(STEPS):
        model.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        if comm is not None:
            for p in model.parameters():
                p.grad.mul_(weight)
                dist.all_reduce(p.grad)
        refresh = seng.will_refresh
        seng.step()
        assert not seng._reasons, seng._reasons
        draws.append(seng.sampled_targets.clone() if refresh and seng.sampled_targets is not None else None)
        directions.append([p.grad.clone() for p in model.parameters()])
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(LR * p.grad)
    return directions, draws


def _global_equals_single_process(rank, world_size):
    x, y = make_batch(sum(SIZES))
    targets = torch.randint(0, 4, (STEPS, sum(SIZES)), generator=torch.Generator().manual_seed(9))
    part = rank_slices(SIZES)[rank]
    got, _ = _run(x, y, GlobalComm(), lambda step_of: _fixed_targets(step_of, targets, part), part,
                  weight=SIZES[rank] / sum(SIZES))
    want, _ = _run(x, y, None, lambda step_of: _fixed_targets(step_of, targets, slice(None)))
    for step, (g_step, w_step) in enumerate(zip(got, want)):
        for g, w in zip(g_step, w_step):
            assert rel_err(g, w) < 1e-10, (step, rel_err(g, w))


def test_global_mode_with_sampled_targets_equals_one_process_on_the_concatenated_batch():
    run_on_ranks(_global_equals_single_process)


def _local_equals_mean_of_single_process(rank, world_size):
    x, y = make_batch(sum(SIZES))
    parts = rank_slices(SIZES)
    got, draws = _run(x, y, LocalComm(), "categorical", parts[rank], weight=SIZES[rank] / sum(SIZES))
    assert draws[0] is not None and draws[0].shape == (SIZES[rank],)
    everyone = [None] * world_size
    dist.all_gather_object(everyone, draws)
    # the reference: one single-process SENG per rank's batch with that rank's draws, fed the global gradient
    model = make_net()
    replicas = [copy.deepcopy(model) for _ in SIZES]
    step_now = {"k": 0}
    sengs = []
    for r, m in enumerate(replicas):
        table = torch.stack([d if d is not None else torch.zeros(SIZES[r], dtype=torch.long) for d in everyone[r]])
        sengs.append(SENG(m, damping=DAMPING, update_freq=UPDATE_FREQ, fisher="mc",
                          likelihood=_fixed_targets(lambda: step_now["k"], table, slice(None))))
    wants = local_mode_reference(model, sengs, replicas, x, y, parts, STEPS, LR,
                                 before_step=lambda k: step_now.update(k=k))
    for step, want in enumerate(wants):
        for gp, wp in zip(got[step], want):
            assert rel_err(gp, wp) < 1e-10, (step, rel_err(gp, wp))


def test_local_mode_with_sampled_targets_equals_the_mean_of_per_rank_directions():
    run_on_ranks(_local_equals_mean_of_single_process)
