"""Pure tensor maths of SENG: Gram matrices, the products with U and Uᵀ, sampling and low rank.

Notation (DESIGN.md §1). A layer's per-sample gradients are ``J_n = Σ_p G[n, :, p] ⊗ X[n, :, p]``
per group, with output-grad factors ``G`` of shape ``(N, groups, d_out, P)`` and input factors ``X``
of shape ``(N, groups, d_in, P)`` (``P`` = positions: 1 for a plain Linear, T for sequences, the
number of patches for a convolution). The matrix ``U`` has rows ``J_n`` (flattened over groups),
and the layer gradient is a matrix ``W`` of shape ``(groups, d_out, d_in)``.

Nothing here knows about modules or hooks; every function is tested alone in float64.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
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


def self_gram(A: Tensor) -> Tensor:
    """``A Aᵀ`` for ``A (N, d)``, ``(N, N)``, exactly symmetric: the rows in four blocks, each block's products with
    itself and the blocks above it, then the lower triangle mirrored: ``5/8`` of a full product's work (BLAS has a
    symmetric rank-k update, torch does not bind it)."""
    n = A.shape[0]
    block = max(1, -(-n // 4))
    out = A.new_empty(n, n)
    for start in range(0, n, block):
        stop = min(n, start + block)
        out[start:stop, :stop] = A[start:stop] @ A[:stop].T  # right of the diagonal block: not read
    lower = out.tril_()
    return lower + lower.tril(-1).T


def patch_gram(G: Tensor, X: Tensor, bias: bool = False) -> Tensor:
    """``UUᵀ`` without forming ``U``: ``K[n,m] = Σ_g Σ_{s,t} (G_nᵀ G_m)[s,t] · (X̃_nᵀ X̃_m)[s,t]``, ``(N, N)``.

    For ``P = 1`` this is the Hadamard form ``(G Gᵀ) ∘ (X̃ X̃ᵀ)``. For ``P > 1`` the two ``(N·P)²`` Gram
    matrices are multiplied element-wise and summed over ``P×P`` blocks, in row chunks so that peak
    memory stays bounded. The bias row of ``X̃`` adds 1 to every entry of ``X̃ᵀX̃``.
    """
    N, groups, d_out, P = G.shape
    d_in = X.shape[2]
    if P == 1 and groups == 1:  # a plain Linear: two products and one in-place Hadamard
        g2, x2 = G[:, 0, :, 0], X[:, 0, :, 0]
        xx = x2 @ x2.T
        if bias:
            xx += 1
        return (g2 @ g2.T).mul_(xx)
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


def batch_u_dot(G: Tensor, X: Tensor, gb: Tensor, xb: Tensor, bias: bool) -> Tensor:
    """``U g'`` for a gradient that is a batch's sum of rank-one terms, ``g' = [gbᵀ xb | gbᵀ 1]``, without
    forming ``g'``: ``(U g')[n] = Σ_b (G[n]·gb[b]) · (X[n]·xb[b] + bias)``, i.e.
    ``rowsum((G gbᵀ) ∘ (X xbᵀ + bias))``.

    ``G (N, d_out)``, ``X (N, d_in)`` are ``U``'s rank-one factors, ``gb (B, d_out)``, ``xb (B, d_in)`` the
    batch's output gradients and inputs. Cost ``N·B·(d_in + d_out)`` instead of ``N·d_out·d_in``. Shape ``(N,)``.
    """
    xx = X @ xb.T
    if bias:
        xx += 1
    return torch.linalg.vecdot(G @ gb.T, xx)


def linear_u_dot(G: Tensor, X: Tensor, Ww: Optional[Tensor], Wb: Optional[Tensor]) -> Tensor:
    """``U g`` for a plain Linear's factors ``G (N, d_out)``, ``X (N, d_in)`` and a gradient split into
    ``Ww (d_out, d_in)`` and ``Wb (d_out,)`` (either may be ``None``): ``rowsum(G ∘ (X Wwᵀ + 1 Wbᵀ))``, ``(N,)``,
    the bias's share in the weight's product (``F.linear``: one ``addmm``)."""
    if Ww is None:
        return G @ Wb
    return F.linear(X, Ww, Wb).mul_(G).sum(1)


def linear_apply(G: Tensor, X: Tensor, v: Tensor, Ww: Optional[Tensor], Wb: Optional[Tensor], damping: float,
                 inplace: bool = False) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(g − Uᵀv) / λ`` for a plain Linear (shapes as in :func:`linear_u_dot`): the weight part one fused
    ``addmm`` with ``v`` scaling the narrower factor, the bias part one ``addmv``; ``inplace`` writes into
    ``Ww`` and ``Wb``."""
    beta, alpha = 1 / damping, -1 / damping
    Dw = Db = None
    if Ww is not None:
        left, right = (G.T * v, X) if G.shape[1] <= X.shape[1] else (G.T, X * v[:, None])
        Dw = Ww.addmm_(left, right, beta=beta, alpha=alpha) if inplace else torch.addmm(
            Ww, left, right, beta=beta, alpha=alpha)
    if Wb is not None:
        Db = Wb.addmv_(G.T, v, beta=beta, alpha=alpha) if inplace else torch.addmv(Wb, G.T, v, beta=beta, alpha=alpha)
    return Dw, Db


def patch_apply(G: Tensor, X: Tensor, v: Tensor, Ww: Optional[Tensor], Wb: Optional[Tensor], damping: float,
                xb: Optional[Tensor] = None, inplace: bool = False) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(g − Uᵀv) / λ`` split like :func:`patch_u_dot`: ``Uᵀv`` is ``Σ_n v[n] Σ_p G[n,g,:,p] X[n,g,:,p]ᵀ``
    for the weight and ``Σ_n v[n] Σ_p G[n,g,:,p] xb[n,g,p]`` for the bias. For a plain Linear the weight
    part is one fused ``addmm`` (``v`` scales the narrower factor) and the bias part one ``addmv``. ``inplace``
    writes the result into ``Ww`` and ``Wb`` and returns them."""
    N, groups, _, P = G.shape
    if P == 1 and groups == 1 and xb is None:
        Dw, Db = linear_apply(G[:, 0, :, 0], X[:, 0, :, 0], v, None if Ww is None else Ww[0],
                              None if Wb is None else Wb[0], damping, inplace)
        if inplace:
            return Ww, Wb
        return (None if Dw is None else Dw[None]), (None if Db is None else Db[None])
    gv = G * v[:, None, None, None]
    Dw = Db = None
    if Ww is not None:
        uw = torch.einsum("ngop,ngip->goi", gv, X)
        Dw = Ww.sub_(uw).div_(damping) if inplace else (Ww - uw) / damping
    if Wb is not None:
        ub = gv.sum(dim=(0, 3)) if xb is None else (gv * xb[:, :, None, :]).sum(dim=(0, 3))
        Db = Wb.sub_(ub).div_(damping) if inplace else (Wb - ub) / damping
    return Dw, Db


def patch_sums(G: Tensor, X: Tensor, bias: bool) -> Tuple[List[Tensor], Tensor]:
    """``Σ_n J_n`` of patch factors ``G (N, groups, d_out, P)``, ``X (N, groups, d_in, P)`` as parts (the weight's
    ``Σ_{n,p} G[n,:,:,p] X[n,:,:,p]ᵀ`` ``(groups, d_out, d_in)`` while ``d_in > 0``, the bias's ``Σ_{n,p} G[n,:,:,p]``
    ``(groups, d_out)`` with ``bias``), and ``M = Σ_{n,g,p} ‖G[n,g,:,p]‖·‖[X[n,g,:,p]; 1]‖``, the norms of the
    rank-one terms summed (a bound on the magnitudes the sum adds up)."""
    parts = []
    if X.shape[2] > 0:
        parts.append(torch.einsum("ngop,ngip->goi", G, X))
    if bias:
        parts.append(G.sum(dim=(0, 3)))
    x_norm = X.square().sum(2)
    if bias:
        x_norm = x_norm + 1
    # the squares summed by hand: vector_norm over a middle axis is an order of magnitude slower on a CPU
    return parts, (G.square().sum(2).sqrt() * x_norm.sqrt()).sum()


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


def token_pairs(tokens: Tensor, G: Tensor, padding_idx: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """An embedding's per-sample gradients in sparse form, one row per (sample, token) pair.

    With tokens ``(N, T)`` (integers) and output gradients ``G (N, T, D)``, the per-sample gradient of the
    table ``E (V, D)`` is ``J_n = Σ_t e_{tokens[n,t]} ⊗ G[n,t]`` (positions holding ``padding_idx`` add
    nothing: the lookup's backward leaves that row alone). Positions of one sample with the same token are
    summed: ``J_n = Σ_{p: sample[p] = n} e_{token[p]} ⊗ A[p]``.

    Returns ``sample (M,)``, ``token (M,)`` (int64) and ``A (M, D)``, sorted by token then sample, with
    ``M ≤ N·T`` the number of distinct pairs. No ``V × D`` tensor is built.
    """
    N, T = tokens.shape
    token = tokens.reshape(-1).long()
    sample = torch.arange(N, device=tokens.device).repeat_interleave(T)
    rows = G.reshape(N * T, -1)
    if padding_idx is not None:
        keep = token != padding_idx
        token, sample, rows = token[keep], sample[keep], rows[keep]
    keys, inverse = torch.unique(token * N + sample, return_inverse=True)
    A = rows.new_zeros(keys.numel(), rows.shape[1]).index_add_(0, inverse, rows)
    return keys % N, keys // N, A


def token_gram(sample: Tensor, token: Tensor, A: Tensor, n: int) -> Tensor:
    """``UUᵀ`` of the rows ``J_n = Σ_{p ∈ n} e_{token[p]} ⊗ A[p]`` (pairs from :func:`token_pairs`), ``(n, n)``:

        K[n, m] = Σ_{p ∈ n, q ∈ m} [token[p] = token[q]] · A[p]·A[q].

    Only pairs of rows that share a token meet, and a token has at most one row per sample, so the cost is
    ``Σ_u c_u² · D ≤ n · M · D`` (``c_u`` = samples holding token ``u``), computed in chunks of pairs so that
    peak memory stays bounded. ``token`` must be sorted (as :func:`token_pairs` returns it).
    """
    K = A.new_zeros(n * n)
    M, D = A.shape
    if M == 0:
        return K.view(n, n)
    _, counts = torch.unique_consecutive(token, return_counts=True)
    starts = counts.cumsum(0) - counts
    count_of, start_of = counts.repeat_interleave(counts), starts.repeat_interleave(counts)  # per row p
    chunk = max(1, _GRAM_CHUNK_ELEMENTS // max(1, int(counts.max()) * D))
    for first in range(0, M, chunk):
        c = count_of[first:first + chunk]
        p = torch.arange(first, first + c.numel(), device=A.device).repeat_interleave(c)
        offset = torch.arange(p.numel(), device=A.device) - (c.cumsum(0) - c).repeat_interleave(c)
        q = start_of[p] + offset  # every row of p's token group
        K.index_add_(0, sample[p] * n + sample[q], (A[p] * A[q]).sum(1))
    return K.view(n, n)


def token_u_dot(sample: Tensor, token: Tensor, A: Tensor, W: Tensor, n: int) -> Tensor:
    """``U g`` for a gradient ``W (V, D)``: ``(U g)[n] = Σ_{p ∈ n} A[p] · W[token[p]]`` (a gather), ``(n,)``."""
    return A.new_zeros(n).index_add_(0, sample, (A * W.index_select(0, token)).sum(1))


def token_apply_(out: Tensor, sample: Tensor, token: Tensor, A: Tensor, v: Tensor, alpha: float) -> Tensor:
    """``out += α · Uᵀv`` in place, for ``out (V, D)``: ``Uᵀv = Σ_p v[sample[p]] · e_{token[p]} ⊗ A[p]``, an
    ``index_add`` of ``M`` rows. Returns ``out``."""
    return out.index_add_(0, token, A * (alpha * v).index_select(0, sample)[:, None])


def token_cross_gram(sample: Tensor, token: Tensor, A: Tensor, G: Tensor, X: Tensor, n: int) -> Tensor:
    """Inner products between token rows and dense rows of one matrix, ``(n, N)``.

    Rows ``J_n = Σ_{p ∈ n} e_{token[p]} ⊗ A[p]`` (an embedding's uses) and ``L_m = Σ_s G[m,:,s] ⊗ X[m,:,s]``
    (a Linear's uses of the same matrix, ``G (N, V, P)``, ``X (N, D, P)``):

        C[n, m] = ⟨J_n, L_m⟩ = Σ_{p ∈ n} Σ_s G[m, token[p], s] · (A[p] · X[m,:,s]),

    a gather of ``G`` at the tokens times ``A X``; cost ``M · N · P · D``, in chunks of pairs.
    """
    N, _, P = G.shape
    C = A.new_zeros(N, n)
    chunk = max(1, _GRAM_CHUNK_ELEMENTS // max(1, N * P))
    for first in range(0, A.shape[0], chunk):
        rows = slice(first, first + chunk)
        picked = G.index_select(1, token[rows])  # (N, Mc, P)
        products = torch.matmul(A[rows], X)  # (N, Mc, P)
        C.index_add_(1, sample[rows], (picked * products).sum(2))
    return C.T


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


def _same_kind(tensors: List[Tensor]) -> Dict[tuple, List[int]]:
    """Indices of ``tensors`` grouped by ``(shape, dtype, device)``: those that one batched call can take."""
    groups: Dict[tuple, List[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((tuple(t.shape), t.dtype, t.device), []).append(i)
    return groups


def damped_cholesky_batch(grams: List[Tensor], damping: Union[float, Sequence[float]]) -> List[Optional[Tensor]]:
    """:func:`damped_cholesky` of every matrix of ``grams`` (with one ``damping`` for all, or one each), those of
    one shape, dtype and device in one batched factorisation whose status is read once; a matrix that fails it is
    retried alone with growing jitter. ``None`` where a matrix is not finite or cannot be factorised."""
    out: List[Optional[Tensor]] = [None] * len(grams)
    dampings = [float(damping)] * len(grams) if isinstance(damping, (int, float)) else [float(d) for d in damping]
    for (shape, dtype, device), members in _same_kind(grams).items():
        K = torch.stack([grams[i] for i in members])
        K.diagonal(dim1=1, dim2=2).add_(torch.tensor([dampings[i] for i in members], dtype=dtype,
                                                     device=device)[:, None])
        L, info = torch.linalg.cholesky_ex(K)
        # A NaN or Inf in K reaches the diagonal of L in its row (the factorisation reads the lower triangle,
        # and K is symmetric), or makes the factorisation fail: the diagonal tells, N entries instead of N².
        finite = torch.isfinite(L.diagonal(dim1=1, dim2=2)).all(1)
        status = torch.where(finite, info, -1).tolist()  # the one read of this group
        for i, code, chol in zip(members, status, L.unbind(0)):
            if code == 0:
                out[i] = chol.clone()  # its own storage: a view would keep (and save) the whole batch
            elif code > 0:  # finite but not positive definite in floating point: jitter, alone
                out[i] = damped_cholesky(grams[i], dampings[i])
    return out


def eigen_batch(grams: List[Tensor]) -> List[Optional[Tuple[Tensor, Tensor]]]:
    """``K = Q diag(e) Qᵀ`` of every symmetric ``K`` in ``grams`` (those of one shape, dtype and device in one
    batched ``eigh``), as ``(Q, e)`` with ``e`` clamped at 0 (``K = UUᵀ`` is positive semi-definite; rounding
    can make its smallest eigenvalues slightly negative). ``None`` for a matrix whose ``eigh`` does not converge
    (ill-conditioned beyond the solver: the batch is then retried one by one)."""
    out: List[Optional[Tuple[Tensor, Tensor]]] = [None] * len(grams)
    for members in _same_kind(grams).values():
        try:
            e, Q = torch.linalg.eigh(torch.stack([grams[i] for i in members]))
        except torch.linalg.LinAlgError:
            for i in members:
                try:
                    ev, q = torch.linalg.eigh(grams[i])
                except torch.linalg.LinAlgError:
                    continue
                out[i] = (q, ev.clamp_min(0))
            continue
        for i, q, ev in zip(members, Q.unbind(0), e.clamp_min(0).unbind(0)):
            out[i] = (q.clone(), ev.clone())
    return out


def eigen_solve_vec(Q: Tensor, e: Tensor, damping: float, b: Tensor) -> Tensor:
    """``(K + λI)^{-1} b = Q (Qᵀ b / (e + λ))`` for ``K = Q diag(e) Qᵀ``: any ``λ > 0``, no factorisation."""
    return Q @ ((Q.T @ b) / (e + damping))


def cholesky_solve_vec(L: Tensor, b: Tensor) -> Tensor:
    """``(L Lᵀ)^{-1} b`` for a vector ``b`` of shape ``(N,)``."""
    return torch.cholesky_solve(b.unsqueeze(1), L).squeeze(1)
