"""Fuzz over the layers of modern networks: embeddings (padding, tied heads), attention in both layouts
with masks, recurrent layers, and custom modules that only the generic route sees (an ``addmm`` linear
with its weight transposed, an RMS norm written by hand, a raw gain). Each case: every module has exact
curvature (coverage 100 %) and its direction is within 1e-8 of the dense solve built from per-sample
gradients of the batch forward (tests/zoo/_check.py). The batch size differs from every other dimension,
so no sample axis is ambiguous."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.modules import Conv1D, RMSNorm
from tests.zoo._check import check

N_CASES = 24


class Net(nn.Module):
    def __init__(self, rng, vocab, d, classes, heads):
        super().__init__()
        self.seq_first = rng.random() < 0.5
        self.emb = nn.Embedding(vocab, d, padding_idx=0 if rng.random() < 0.5 else None)
        self.gain = nn.Parameter(torch.rand(d) + 0.5)  # raw parameter of the root
        blocks = []
        for _ in range(rng.randint(1, 2)):
            kind = rng.choice(["attn", "gru", "addmm", "rms"])
            if kind == "attn":
                blocks.append(nn.MultiheadAttention(d, heads, batch_first=not self.seq_first,
                                                    bias=rng.random() < 0.8))
            elif kind == "gru":
                blocks.append(nn.GRU(d, d, batch_first=not self.seq_first))
            elif kind == "addmm":
                blocks.append(Conv1D(d, d))
            else:
                blocks.append(RMSNorm(d))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d)
        self.tied = rng.random() < 0.5
        self.head = nn.Linear(d, vocab if self.tied else classes, bias=not self.tied)
        if self.tied:
            self.head.weight = self.emb.weight
        self.causal = rng.random() < 0.5

    def forward(self, tokens):  # tokens (N, T); the body runs in the module's layout
        h = self.emb(tokens) * self.gain
        if self.seq_first:
            h = h.transpose(0, 1)
        t = h.shape[0] if self.seq_first else h.shape[1]
        for block in self.blocks:
            if isinstance(block, nn.MultiheadAttention):
                mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=h.dtype) if self.causal else None
                h = h + block(h, h, h, attn_mask=mask, need_weights=False)[0]
            elif isinstance(block, nn.GRU):
                h = block(h)[0]
            else:
                h = torch.tanh(block(h))
        h = self.norm(h).mean(0 if self.seq_first else 1)
        return self.head(h)


def build_case(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    d = rng.choice([4, 6])
    model = Net(rng, vocab=rng.randint(9, 12), d=d, classes=3, heads=2).double()
    n, t = rng.randint(7, 8), rng.randint(2, 5)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.emb.num_embeddings, (n, t), generator=g)
    labels = torch.randint(0, model.head.out_features, (n,), generator=g)
    return model, tokens, labels


@pytest.mark.parametrize("seed", range(N_CASES))
def test_modern_architecture_matches_dense_reference_with_full_coverage(seed):
    model, tokens, labels = build_case(seed)
    seng = check(model, lambda: F.cross_entropy(model(tokens), labels, reduction="none"), tokens.shape[0])
    cov = seng.coverage()
    assert cov.percent == 100.0, cov.table()
