"""A small causal byte-level decoder for the language-model benchmark, built from torch's own modules.

    tokens (B, T) -> tok Embedding(256, E) + pos Embedding(T_max, E)
      -> L x [ x + MHA(LN(x)) with a causal mask;  x + Linear(GELU(Linear(LN(x)))) ]
      -> LN -> head Linear(E, 256) -> logits (B, T, 256)

Pre-norm blocks, ``nn.MultiheadAttention(batch_first=True)`` with a boolean upper-triangular ``attn_mask``, an MLP
of width 4E, a learned positional embedding looked up with the positions broadcast over the batch, and an
untied output head (a head tied to the token embedding would put one weight in two of ASDL's layers, which
ASDL's K-FAC and SENG would each precondition twice as if they were separate).

What each curvature method covers (checked by tests/benchmarks/test_lm.py):

- lightning_seng.SENG: every parameter with exact curvature. The attention route takes each MHA (packed
  in-projection with its bias, and ``out_proj``), the Linear route the MLP and the head (per sequence: the
  gradient of a sequence is a sum over its positions), the LayerNorm route the norms and the embedding route
  both embeddings (token coincidences).
- ASDL's K-FAC (``KfacGradientMaker``): Linear, LayerNorm (unit-wise) and Embedding. It does not cover the
  attention's in-projection (its weights belong to the MHA module, which ASDL does not know) nor ``out_proj``
  (MHA calls ``F.multi_head_attention_forward`` with its weight, so ``out_proj``'s hooks never fire; the peer
  excludes it, see benchmarks/peers.py): those keep the plain gradient.
- ASDL's SENG (``SengGradientMaker``): Linear only (MLP and head); attention, norms and embeddings keep the
  plain gradient. It treats each position as a sample (ASDL flattens ``(B, T, E)``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256


class Block(nn.Module):
    """Pre-norm decoder block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    """Causal decoder over bytes: ``(B, T)`` int64 -> logits ``(B, T, 256)``, ``T <= context``."""

    def __init__(self, layers: int = 4, width: int = 128, heads: int = 4, context: int = 128):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(VOCAB, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)
        self.register_buffer("mask", torch.ones(context, context, dtype=torch.bool).triu(1), persistent=False)
        self._init(layers)

    def _init(self, layers: int) -> None:
        """GPT-2's: normal(0, 0.02) weights, zero biases, residual outputs scaled by 1/sqrt(2L); the first
        prediction is then nearly uniform (about 8 bits per byte). The head is not zeroed: with a zero head every
        other layer's gradient is zero at the first step, and ASDL's SENG divides by the sum of its per-sample
        coefficients' square roots, which is then 0 (NaN)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            nn.init.normal_(block.attn.in_proj_weight, std=0.02)
            nn.init.zeros_(block.attn.in_proj_bias)
            for out in (block.attn.out_proj, block.mlp[2]):
                nn.init.normal_(out.weight, std=0.02 / math.sqrt(2 * layers))
                nn.init.zeros_(out.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, t = tokens.shape
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.context}")
        positions = torch.arange(t, device=tokens.device).expand(n, t)
        x = self.tok(tokens) + self.pos(positions)
        mask = self.mask[:t, :t]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-byte cross-entropy in nats: ``(B, T, 256)`` logits and ``(B, T)`` targets, averaged (``"mean"``) or
    summed (``"sum"``) over all ``B·T`` positions, or ``(B·T,)`` (``"none"``). The ``reduction`` keyword is
    what ASDL's gradient makers call."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


def bits_per_byte(nats: float) -> float:
    return nats / math.log(2.0)
