"""``global`` mode with attention layers: on 2 ranks it equals one process on the concatenated batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG
from lightning_seng.distributed import GlobalComm

from .dist_harness import run_on_ranks
from .nets import rel_err

SIZES = (5, 3)  # unequal local batches, neither equal to a sequence length or width
L, S, E = 4, 6, 8


class CrossThenEncode(nn.Module):
    """Sequence-first cross-attention (with bias_k/bias_v) into a Transformer encoder layer, pooled."""

    def __init__(self):
        super().__init__()
        self.cross = nn.MultiheadAttention(E, 2, add_bias_kv=True)
        self.encode = nn.TransformerEncoderLayer(E, 2, 12, dropout=0.0)
        self.head = nn.Linear(E, 3)

    def forward(self, x, memory):
        h = self.cross(x, memory, memory)[0]
        return self.head(self.encode(h).mean(0))


def _run(x, memory, y, comm, route, sizes=None):
    torch.manual_seed(0)
    model = CrossThenEncode().double()
    seng = SENG(model, damping=0.3, update_freq=1, route=route, svd_rank=S + 1, batch_axis=1, comm=comm)
    model.zero_grad()
    F.cross_entropy(model(x, memory), y).backward()
    if sizes is not None:  # the gradient of the global mean loss, as DDP's average gives it for equal batches
        for p in model.parameters():
            p.grad.mul_(x.shape[1] / sum(sizes))
            dist.all_reduce(p.grad)
    seng.step()
    assert seng.coverage().percent == 100.0, str(seng.coverage())
    return [p.grad.clone() for p in model.parameters()]


def _global_equals_single_process(rank, world_size):
    g = torch.Generator().manual_seed(1)
    n = sum(SIZES)
    x, memory = (torch.randn(t, n, E, generator=g, dtype=torch.float64) for t in (L, S))
    y = torch.randint(0, 3, (n,), generator=g)
    start = sum(SIZES[:rank])
    local = slice(start, start + SIZES[rank])
    for route in ("auto", "gram", "implicit"):
        got = _run(x[:, local], memory[:, local], y[local], GlobalComm(), route, SIZES)
        want = _run(x, memory, y, None, route)
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-10, (route, rel_err(a, b))


def test_global_mode_with_attention_equals_single_process_on_concatenated_batch():
    run_on_ranks(_global_equals_single_process)
