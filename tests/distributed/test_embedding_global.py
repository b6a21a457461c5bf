"""``global`` mode for embeddings and tied weights: tokens and both uses' factors travel batch first, and
2 ranks equal one process on the concatenated batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng.distributed import GlobalComm

from .dist_harness import run_on_ranks
from .nets import rel_err
from .test_global_mode import SIZES, _run

V, DIM, T = 9, 4, 6


class TiedLM(nn.Module):
    """Embedding (with padding) -> body -> head tied to the embedding, with its own bias; a lone Embedding
    for positions: logits ``(N, T, V)``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, DIM, padding_idx=0)
        self.pos = nn.Embedding(T, DIM)
        self.body = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, V)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        return self.head(torch.tanh(self.body(self.emb(tokens) + self.pos(positions))))


def _loss(logits, targets, reduction="mean"):
    per_sample = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def _make_model():
    torch.manual_seed(0)
    return TiedLM().double()


def _global_equals_single_process(rank, world_size):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (sum(SIZES), T), generator=g)
    targets = torch.randint(0, V, (sum(SIZES), T), generator=g)
    local = slice(sum(SIZES[:rank]), sum(SIZES[:rank + 1]))
    for route, reduction in (("auto", "mean"), ("implicit", "mean"), ("auto", "sum")):
        got, seng = _run(tokens[local], targets[local], GlobalComm(loss_reduction=reduction), route, reduction,
                         SIZES, _make_model, _loss)
        want, reference = _run(tokens, targets, None, route, reduction, None, _make_model, _loss)
        assert reference.layers["emb"].kind == "tied" and reference.coverage().percent == 100.0
        assert reference.stats["layers/tied"] == 1 and reference.stats["layers/embedding"] == 1
        assert seng.stats["skipped_refreshes"] == 0
        for step, (g_step, w_step) in enumerate(zip(got, want)):
            for gr, w in zip(g_step, w_step):
                assert rel_err(gr, w) < 1e-10, (route, reduction, step, rel_err(gr, w))


def test_global_mode_with_tied_embeddings_equals_single_process_on_concatenated_batch():
    run_on_ranks(_global_equals_single_process)
