"""Both modes: ranks with different batch sizes do not deadlock, and a non-finite curvature on one
rank makes every rank skip that refresh."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_seng import SENG
from lightning_seng.distributed import SENG_MODES, make_comm

from .dist_harness import run_on_ranks
from .nets import make_batch, make_net, rel_err

# Local batch sizes per step on each rank: unequal at every step, down to a single sample.
BATCH_SIZES = {0: (4, 4, 1, 3, 2), 1: (4, 2, 4, 1, 3)}


def _ddp_step(model, x, y):
    """Local mean loss, gradients averaged over ranks as DDP does."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad.div_(dist.get_world_size())


def _unequal_batches(rank, world_size):
    for mode in SENG_MODES:
        model = make_net()
        seng = SENG(model, damping=0.3, update_freq=1, comm=make_comm(mode))
        for step, n in enumerate(BATCH_SIZES[rank]):
            x, y = make_batch(n, seed=10 * step + rank)
            _ddp_step(model, x, y)
            seng.step()
            d = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            others = [torch.empty_like(d) for _ in range(world_size)]
            dist.all_gather(others, d)
            assert bool(torch.isfinite(d).all()), (mode, step)
            assert all(torch.equal(o, d) for o in others), (mode, step)  # one direction on every rank
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.1 * p.grad)
        assert seng.stats["skipped_refreshes"] == 0, mode


def _directions(mode, rank, update_freq, poison_step=None):
    """Two steps; rank 1 turns its fc1 factors non-finite at ``poison_step``."""
    model = make_net()
    seng = SENG(model, damping=0.3, update_freq=update_freq, comm=make_comm(mode))
    layer = seng.layers["fc1"]
    take_factors = layer.take_factors
    current = {"step": 0}

    def poisoned(*args, **kwargs):
        factors = take_factors(*args, **kwargs)
        if rank == 1 and current["step"] == poison_step:
            factors.grad_side = factors.grad_side * float("nan")
        return factors

    layer.take_factors = poisoned
    out = []
    for step in range(2):
        current["step"] = step
        x, y = make_batch(4, seed=10 * step + rank)
        _ddp_step(model, x, y)
        seng.step()
        out.append([p.grad.clone() for p in model.parameters()])
    return out, seng


def _nonfinite_on_one_rank(rank, world_size):
    for mode in SENG_MODES:
        got, seng = _directions(mode, rank, update_freq=1, poison_step=1)
        kept, _ = _directions(mode, rank, update_freq=2)       # step 1 reuses step 0's curvature
        refreshed, _ = _directions(mode, rank, update_freq=1)  # step 1 refreshes
        assert seng.stats["skipped_refreshes"] == 1, (mode, seng.stats["skipped_refreshes"])
        for g, k in zip(got[1], kept[1]):
            assert bool(torch.isfinite(g).all()), mode
            assert rel_err(g, k) < 1e-12, (mode, rel_err(g, k))
        # the refresh that was skipped would have changed the direction on this rank
        assert max(rel_err(r, k) for r, k in zip(refreshed[1], kept[1])) > 1e-3, mode


def test_unequal_batch_sizes_on_the_ranks_finish_with_one_direction():
    run_on_ranks(_unequal_batches)


def test_nonfinite_curvature_on_one_rank_skips_the_refresh_on_every_rank():
    run_on_ranks(_nonfinite_on_one_rank)


def _different_sequence_lengths(rank, world_size):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    seng = SENG(model, comm=make_comm("global"))
    x = torch.randn(2, 3 + rank, 3, dtype=torch.float64)  # (N, T, d_in) with T = 3 on rank 0, 4 on rank 1
    model(x).square().mean().backward()
    try:
        seng.step()
    except ValueError as err:
        assert "layer '' has per-sample factor shapes" in str(err) and "rank 1" in str(err), str(err)
    else:
        raise AssertionError("global mode accepted factors whose non-batch dimensions differ across ranks")


def test_global_mode_rejects_different_sequence_lengths_on_every_rank():
    run_on_ranks(_different_sequence_lengths)
