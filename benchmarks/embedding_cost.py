"""Cost of SENG on a tied embedding at GPT-2 size: refresh, per-step apply and what is stored.

    python benchmarks/embedding_cost.py                         # V=50257, D=768, N=8, T=128
    python benchmarks/embedding_cost.py --vocab 5000 --seq 64 --rounds 2

A language model ``Embedding(V, D) -> Linear(D, D) -> tanh -> Linear(D, V)`` whose head is tied to the
embedding (GPT-2's ``wte`` / ``lm_head``; the body stands in for the transformer) is trained with SENG
on random tokens. Printed: the median time of a forward+backward (what an SGD step costs), of
``seng.step()`` on refresh steps and on the steps in between, the bytes SENG keeps for the tied layer
between refreshes, and three ways of computing the token-coincidence Gram ``Σ_{s,t} [tok_s = tok_t]
G_s·G_t``: per (sample, token) pair as the package does, a chunked ``(N·T)²`` equality mask, and a
dense ``(N, unique tokens, D)`` tensor.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_seng import SENG, sketch  # noqa: E402


class TiedLM(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.body(self.emb(tokens))))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_costs(args) -> None:
    torch.manual_seed(0)
    model = TiedLM(args.vocab, args.dim)
    seng = SENG(model, damping=0.5, update_freq=args.update_freq, svd_rank=args.svd_rank)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(tokens).transpose(1, 2), targets).backward()

    backprop, refresh, apply = [], [], []
    for step in range((args.rounds + 1) * args.update_freq):
        t_fb = timed(forward_backward)
        refreshing = seng.will_refresh
        t_step = timed(seng.step)
        if step >= args.update_freq:  # the first round warms up allocators and kernels
            backprop.append(t_fb)
            (refresh if refreshing else apply).append(t_step)
    layer = seng.layers["emb"]
    cur = layer.curvature
    stored = sum(t.nbytes for t in cur.route.tensors.values()) + cur.gram.nbytes + cur.chol.nbytes
    table = V_D = args.vocab * args.dim
    print(f"tied embedding V={args.vocab} D={args.dim}, N={args.batch}, T={args.seq}, svd_rank={args.svd_rank}, "
          f"update_freq={args.update_freq}, float32, {torch.get_num_threads()} threads")
    print(f"route: {layer.kind}/{cur.route.name}; stored between refreshes: {stored / 2**20:.1f} MiB "
          f"(the table itself: {table * 4 / 2**20:.1f} MiB)")
    for key, t in cur.route.tensors.items():
        print(f"    {key:7s} {tuple(t.shape)}  {t.nbytes / 2**20:.2f} MiB")
    med = statistics.median
    print("| what | median s | min s | max s |\n|---|---|---|---|")
    for name, values in (("forward+backward (an SGD step)", backprop), ("seng.step, refresh", refresh),
                         ("seng.step, in between", apply)):
        print(f"| {name} | {med(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    per_step = (med(refresh) + (args.update_freq - 1) * med(apply)) / args.update_freq
    print(f"SENG adds {per_step / med(backprop):.2f}x a forward+backward per step on average "
          f"(V·D = {V_D / 1e6:.1f} M parameters in the table)")


def equality_gram(tokens, G, chunk_rows: int = 256):
    """``K[n,m] = Σ_{s,t} [tok[n,s] = tok[m,t]] G[n,s]·G[m,t]`` from an ``(N·T)²`` mask, in row chunks."""
    N, T, D = G.shape
    tok, rows = tokens.reshape(-1), G.reshape(N * T, D)
    K = G.new_zeros(N * T, N)
    for start in range(0, N * T, chunk_rows):
        block = (tok[start:start + chunk_rows, None] == tok[None]) * (rows[start:start + chunk_rows] @ rows.T)
        K[start:start + chunk_rows] = block.reshape(-1, N, T).sum(2)
    return K.reshape(N, T, N).sum(1)


def dense_unique_gram(tokens, G):
    """``B[n, u] = Σ_{t: tok[n,t] = u} G[n,t]`` over the batch's unique tokens, then ``K = B Bᵀ``."""
    N, T, D = G.shape
    unique, inverse = torch.unique(tokens, return_inverse=True)
    B = G.new_zeros(N, unique.numel(), D)
    B.index_put_((torch.arange(N)[:, None].expand(N, T), inverse), G, accumulate=True)
    B = B.reshape(N, -1)
    return B @ B.T


def token_gram_costs(args) -> None:
    print("\ntoken-coincidence Gram, three ways (s, and peak extra tensor in MiB)")
    print("| tokens | T | pairs M | per pair (package) | equality mask (N·T)² | dense (N, unique, D) |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(2)
    for seq in (args.seq, 1024):
        for dist in ("uniform", "zipf"):
            if dist == "uniform":
                tokens = torch.randint(0, args.vocab, (args.batch, seq), generator=g)
            else:  # word frequencies ~ 1/rank
                weights = 1.0 / torch.arange(1, args.vocab + 1, dtype=torch.float64)
                tokens = torch.multinomial(weights, args.batch * seq, replacement=True, generator=g)
                tokens = tokens.reshape(args.batch, seq)
            G = torch.randn(args.batch, seq, args.dim, generator=g)
            sample, token, A = sketch.token_pairs(tokens, G)
            times = {}
            times["pair"] = timed(lambda: sketch.token_gram(sample, token, A, args.batch)) + timed(
                lambda: sketch.token_pairs(tokens, G))
            times["mask"] = timed(lambda: equality_gram(tokens, G))
            times["dense"] = timed(lambda: dense_unique_gram(tokens, G))
            ref = equality_gram(tokens, G)
            assert torch.allclose(sketch.token_gram(sample, token, A, args.batch), ref, rtol=1e-3, atol=1e-2)
            unique = torch.unique(tokens).numel()
            print(f"| {dist} | {seq} | {A.shape[0]} | {times['pair']:.3f} | {times['mask']:.3f} | "
                  f"{times['dense']:.3f} ({args.batch * unique * args.dim * 4 / 2**20:.0f} MiB) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--svd-rank", type=int, default=16)
    parser.add_argument("--update-freq", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (on a shared machine one thread gives repeatable numbers: OpenMP "
                             "workers spin while other processes hold the cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    step_costs(args)
    token_gram_costs(args)


if __name__ == "__main__":
    main()
