"""Pure tensor maths of SENG: Gram matrices, the products with U and Uᵀ, sampling and low rank.

Notation (DESIGN.md §1). A layer's per-sample gradients are ``J_n = Σ_p G[n, :, p] ⊗ X[n, :, p]``
per group, with output-grad factors ``G`` of shape ``(N, groups, d_out, P)`` and input factors ``X``
of shape ``(N, groups, d_in, P)`` (``P`` = positions: 1 for a plain Linear, T for sequences, the
number of patches for a convolution). The matrix ``U`` has rows ``J_n`` (flattened over groups),
and the layer gradient is a matrix ``W`` of shape ``(groups, d_out, d_in)``.

Nothing here knows about modules or hooks; every function is tested alone in float64.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# Largest number of elements one chunk of the Gram computation may hold; bounds peak memory.
_GRAM_CHUNK_ELEMENTS = 1 << 24


def per_sample_grads(G: Tensor, X: Tensor, bias: bool = False) -> Tensor:
    """Explicit ``U``, shape ``(N, groups·d_out·d_in + groups·d_out·bias)``: per sample, the weight block
    ``vec_g(Σ_p G[n,g,:,p] X[n,g,:,p]ᵀ)`` followed (``bias``) by the bias block ``vec_g(Σ_p G[n,g,:,p])``."""
    J = torch.einsum("ngop,ngip->ngoi", G, X).reshape(G.shape[0], -1)
    if bias:
        J = torch.cat([J, G.sum(3).reshape(G.shape[0], -1)], dim=1)
    return J


def patch_gram(G: Tensor, X: Tensor, bias: bool = False) -> Tensor:
    """``UUᵀ`` without forming ``U``: ``K[n,m] = Σ_g Σ_{s,t} (G_nᵀ G_m)[s,t] · (X̃_nᵀ X̃_m)[s,t]``, ``(N, N)``.

    For ``P = 1`` this is the Hadamard form ``(G Gᵀ) ∘ (X̃ X̃ᵀ)``. For ``P > 1`` the two ``(N·P)²`` Gram
    matrices are multiplied element-wise and summed over ``P×P`` blocks, in row chunks so that peak
    memory stays bounded. The bias row of ``X̃`` adds 1 to every entry of ``X̃ᵀX̃``.
    """
    N, groups, d_out, P = G.shape
    d_in = X.shape[2]
    if P == 1:
        g2, x2 = G[..., 0].transpose(0, 1), X[..., 0].transpose(0, 1)  # (groups, N, d)
        xx = x2 @ x2.transpose(1, 2)
        return ((g2 @ g2.transpose(1, 2)) * (xx + 1 if bias else xx)).sum(0)
    # (groups, N·P, d): rows are (sample, position) pairs.
    a = G.permute(1, 0, 3, 2).reshape(groups, N * P, d_out)
    b = X.permute(1, 0, 3, 2).reshape(groups, N * P, d_in)
    chunk = max(1, _GRAM_CHUNK_ELEMENTS // max(1, groups * P * N * P))
    out = G.new_empty(N, N)
    for start in range(0, N, chunk):
        stop = min(N, start + chunk)
        rows = slice(start * P, stop * P)
        xx = b[:, rows] @ b.transpose(1, 2)
        h = ((a[:, rows] @ a.transpose(1, 2)) * (xx + 1 if bias else xx)).sum(0)
        out[start:stop] = h.reshape(stop - start, P, N, P).sum(dim=(1, 3))
    return out


def patch_u_dot(G: Tensor, X: Tensor, Ww: Optional[Tensor], Wb: Optional[Tensor] = None,
                xb: Optional[Tensor] = None) -> Tensor:
    """``U g`` for a gradient split into weight ``Ww (groups, d_out, d_in)`` and bias ``Wb (groups, d_out)``
    (either may be ``None``): ``(U g)[n] = Σ_{g,p} G[n,g,:,p]ᵀ (Ww[g] X[n,g,:,p] + Wb[g] · xb[n,g,p])``.

    ``xb (N, groups, P)`` is the bias row of the inputs; ``None`` means ones. Shape ``(N,)``.
    """
    N, groups, _, P = G.shape
    out = G.new_zeros(N)
    if Ww is not None:
        if P == 1 and groups == 1:
            out = ((G[:, 0, :, 0] @ Ww[0]) * X[:, 0, :, 0]).sum(1)
        else:
            out = (torch.einsum("goi,ngip->ngop", Ww, X) * G).sum(dim=(1, 2, 3))
    if Wb is not None:
        gb = G.sum(3) if xb is None else (G * xb[:, :, None, :]).sum(3)  # (N, groups, d_out)
        out = out + (gb * Wb).sum(dim=(1, 2))
    return out


def patch_apply(G: Tensor, X: Tensor, v: Tensor, Ww: Optional[Tensor], Wb: Optional[Tensor], damping: float,
                xb: Optional[Tensor] = None) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(g − Uᵀv) / λ`` split like :func:`patch_u_dot`: ``Uᵀv`` is ``Σ_n v[n] Σ_p G[n,g,:,p] X[n,g,:,p]ᵀ``
    for the weight and ``Σ_n v[n] Σ_p G[n,g,:,p] xb[n,g,p]`` for the bias. For a plain Linear the weight
    part is one fused ``addmm``."""
    N, groups, _, P = G.shape
    gv = G * v[:, None, None, None]
    Dw = Db = None
    if Ww is not None:
        if P == 1 and groups == 1:
            Dw = torch.addmm(Ww[0], gv[:, 0, :, 0].T, X[:, 0, :, 0], beta=1 / damping, alpha=-1 / damping)[None]
        else:
            Dw = (Ww - torch.einsum("ngop,ngip->goi", gv, X)) / damping
    if Wb is not None:
        ub = gv.sum(dim=(0, 3)) if xb is None else (gv * xb[:, :, None, :]).sum(dim=(0, 3))
        Db = (Wb - ub) / damping
    return Dw, Db


def sample_indices(n: int, size: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """``size`` distinct indices of ``range(n)``, uniformly at random (without replacement)."""
    perm = torch.randperm(n, generator=generator, device="cpu")[:size]
    return perm.sort().values.to(device)


def sample_rows(A: Tensor, size: int, dim: int, generator: Optional[torch.Generator]) -> Tensor:
    """Keep ``size`` of the ``A.shape[dim]`` rows along ``dim``, scaled by ``sqrt(n / size)``.

    For any ``B`` sampled the same way, ``E[A_s · B_sᵀ]`` over ``dim`` equals the full inner product,
    so Gram matrices built from sampled rows are unbiased.
    """
    n = A.shape[dim]
    if size >= n:
        return A
    idx = sample_indices(n, size, generator, A.device)
    return A.index_select(dim, idx) * (n / size) ** 0.5


def low_rank(G: Tensor, X: Tensor, rank: int, bias: bool = False) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Truncate each ``G[n,g]`` (``d_out × P``) to rank ``p`` by SVD: ``G ≈ Ĝ Vᵀ``, ``X̂ = X V``.

    Returns ``Ĝ (N, groups, d_out, p)``, ``X̂ (N, groups, d_in, p)`` and, with ``bias``, the bias row of
    ones projected the same way, ``x̂b = 1ᵀV (N, groups, p)`` (else ``None``): then
    ``Σ_p Ĝ[:, p] ⊗ [X̂; x̂b][:, p] = Σ_p (G Π)[:, p] ⊗ [X; 1][:, p]``, Π the projector on the top ``p``
    right singular vectors: exact when ``p >= min(d_out, P)``.
    """
    N, groups, d_out, P = G.shape
    p = min(rank, d_out, P)
    u, s, vh = torch.linalg.svd(G.reshape(N * groups, d_out, P), full_matrices=False)
    g_hat = (u[..., :p] * s[..., None, :p]).reshape(N, groups, d_out, p)
    v = vh[..., :p, :].transpose(1, 2).reshape(N, groups, P, p)
    return g_hat, X @ v, (v.sum(2) if bias else None)


def damped_cholesky(K: Tensor, damping: float, max_tries: int = 6) -> Optional[Tensor]:
    """Lower Cholesky factor of ``K + damping·I``; adds growing jitter if the factorisation fails.

    The jitter starts at ``1e-10 · (mean diagonal + damping)`` and grows tenfold per try. Returns
    ``None`` if the matrix is not finite or no try succeeds.
    """
    if not torch.isfinite(K).all():
        return None
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    A = K + damping * eye
    L, info = torch.linalg.cholesky_ex(A)
    if info.item() == 0:
        return L
    jitter = 1e-10 * (K.diagonal().mean().abs().item() + damping)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(A + jitter * eye)
        if info.item() == 0:
            return L
        jitter *= 10.0
    return None


def cholesky_solve_vec(L: Tensor, b: Tensor) -> Tensor:
    """``(L Lᵀ)^{-1} b`` for a vector ``b`` of shape ``(N,)``."""
    return torch.cholesky_solve(b.unsqueeze(1), L).squeeze(1)
