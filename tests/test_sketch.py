"""Pure maths of sketch.py in float64 against explicit matrices; sampled estimates are unbiased."""

import pytest
import torch

from lightning_seng import sketch
from lightning_seng.layers.routes import ExplicitRoute, ImplicitRoute

D = torch.float64


def _factors(n=6, groups=2, d_out=3, d_in=4, P=5):
    return torch.randn(n, groups, d_out, P, dtype=D), torch.randn(n, groups, d_in, P, dtype=D)


def _explicit_U(G, X, bias=False):
    """Per-sample gradients by a Python loop over samples, groups and positions: the weight block
    ``(groups, d_out, d_in)`` flattened, then (``bias``) the bias block ``(groups, d_out)``."""
    n, groups, d_out, P = G.shape
    rows = []
    for i in range(n):
        w = torch.stack([sum(torch.outer(G[i, g, :, p], X[i, g, :, p]) for p in range(P)) for g in range(groups)])
        b = torch.stack([sum(G[i, g, :, p] for p in range(P)) for g in range(groups)])
        rows.append(torch.cat([w.reshape(-1), b.reshape(-1)]) if bias else w.reshape(-1))
    return torch.stack(rows)


SHAPES = [dict(P=1, groups=1), dict(P=1, groups=3), dict(P=5, groups=1), dict(P=5, groups=2)]


@pytest.mark.parametrize("shape,bias", [(s, b) for s in SHAPES for b in (False, True)] + [(dict(P=3, d_in=0), True)])
def test_patch_gram_and_products_match_explicit_U(shape, bias):
    G, X = _factors(**shape)
    groups, d_out, d_in = G.shape[1], G.shape[2], X.shape[2]
    U = _explicit_U(G, X, bias)
    torch.testing.assert_close(sketch.per_sample_grads(G, X, bias), U, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sketch.patch_gram(G, X, bias), U @ U.T, rtol=1e-12, atol=1e-12)
    Ww = torch.randn(groups, d_out, d_in, dtype=D) if d_in else None
    Wb = torch.randn(groups, d_out, dtype=D) if bias else None
    g = torch.cat([t.reshape(-1) for t in (Ww, Wb) if t is not None])
    torch.testing.assert_close(sketch.patch_u_dot(G, X, Ww, Wb), U @ g, rtol=1e-12, atol=1e-12)
    v = torch.randn(G.shape[0], dtype=D)
    Dw, Db = sketch.patch_apply(G, X, v, Ww, Wb, 0.7)
    got = torch.cat([t.reshape(-1) for t in (Dw, Db) if t is not None])
    torch.testing.assert_close(got, (g - U.T @ v) / 0.7, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [5, 127, 128, 130, 257])
def test_self_gram_is_the_full_product_and_exactly_symmetric(n):
    """Row blocks whose products are mirrored: every entry against the dense product (the blocks' edges included,
    for ``n`` not a multiple of four), and the result symmetric to the bit."""
    A = torch.randn(n, 37, dtype=D)
    K = sketch.self_gram(A)
    reference = torch.stack([torch.stack([torch.dot(a, b) for b in A]) for a in A])
    torch.testing.assert_close(K, reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(K, K.T)


def test_products_with_a_projected_bias_row_match_explicit_U():
    """The implicit route's bias row ``xb`` is an ordinary input row: same products as appending it to X."""
    G, X = _factors(P=4)
    xb = torch.randn(G.shape[0], G.shape[1], 4, dtype=D)
    X_full = torch.cat([X, xb[:, :, None, :]], dim=2)
    U = _explicit_U(G, X_full)
    Ww, Wb = torch.randn(2, 3, 4, dtype=D), torch.randn(2, 3, dtype=D)
    g = torch.cat([Ww, Wb[..., None]], dim=2).reshape(-1)
    torch.testing.assert_close(sketch.patch_u_dot(G, X, Ww, Wb, xb), U @ g, rtol=1e-12, atol=1e-12)
    v = torch.randn(G.shape[0], dtype=D)
    Dw, Db = sketch.patch_apply(G, X, v, Ww, Wb, 0.7, xb)
    torch.testing.assert_close(torch.cat([Dw, Db[..., None]], dim=2).reshape(-1), (g - U.T @ v) / 0.7,
                               rtol=1e-12, atol=1e-12)


def test_patch_gram_chunks_give_the_same_result(monkeypatch):
    G, X = _factors(n=9, P=4)
    full = sketch.patch_gram(G, X)
    monkeypatch.setattr(sketch, "_GRAM_CHUNK_ELEMENTS", 1)
    torch.testing.assert_close(sketch.patch_gram(G, X), full, rtol=1e-12, atol=1e-12)


def test_low_rank_is_exact_at_full_rank_and_a_projection_below():
    G, X = _factors(d_out=3, P=6)
    g_hat, x_hat, xb = sketch.low_rank(G, X, rank=3)
    assert xb is None
    torch.testing.assert_close(sketch.per_sample_grads(g_hat, x_hat), sketch.per_sample_grads(G, X),
                               rtol=1e-10, atol=1e-10)
    g_hat, x_hat, xb = sketch.low_rank(G, X, rank=3, bias=True)
    ones = torch.ones(6, 2, 1, 6, dtype=D)
    torch.testing.assert_close(sketch.per_sample_grads(g_hat, torch.cat([x_hat, xb[:, :, None, :]], dim=2)),
                               sketch.per_sample_grads(G, torch.cat([X, ones], dim=2)), rtol=1e-10, atol=1e-10)
    g1, x1, _ = sketch.low_rank(G, X, rank=1)
    assert g1.shape == (6, 2, 3, 1) and x1.shape == (6, 2, 4, 1)
    # rank-1 truncation keeps the top singular triple of each G_n: G_n v v^T for its top right vector v
    _, _, vh = torch.linalg.svd(G[0, 0], full_matrices=False)
    v = vh[0]
    expected = torch.outer(G[0, 0] @ v, X[0, 0] @ v)
    torch.testing.assert_close(sketch.per_sample_grads(g1, x1)[0, :12].reshape(3, 4), expected, rtol=1e-10, atol=1e-10)


def test_sample_indices_are_distinct_sorted_and_seeded():
    gen = torch.Generator().manual_seed(3)
    idx = sketch.sample_indices(50, 20, gen, torch.device("cpu"))
    assert idx.numel() == 20 and idx.unique().numel() == 20 and torch.equal(idx, idx.sort().values)
    again = sketch.sample_indices(50, 20, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(idx, again)


def test_explicit_coordinate_sketch_is_unbiased():
    """Mean over seeds of the sketched Gram and U g converges to the exact ones (error ~ 1/sqrt(seeds))."""
    U = torch.randn(5, 40, dtype=D)
    W = torch.randn(1, 1, 40, dtype=D)
    exact_K, exact_ug = U @ U.T, U @ W.reshape(-1)
    errors = {}
    for seeds in (50, 800):
        K_sum, ug_sum = torch.zeros_like(exact_K), torch.zeros_like(exact_ug)
        for s in range(seeds):
            route = ExplicitRoute.build(U, [40], 10, torch.Generator().manual_seed(s))
            K_sum += route.gram(None)
            ug_sum += route.u_dot([W.reshape(-1)])
        errors[seeds] = ((K_sum / seeds - exact_K).norm() / exact_K.norm()).item()
        assert (ug_sum / seeds - exact_ug).norm() / exact_ug.norm() < 3 * seeds ** -0.5
    print(f"\nexplicit sketch s=10 of d=40, relative error of the mean Gram: 50 seeds {errors[50]:.3f}, "
          f"800 seeds {errors[800]:.3f}")
    assert errors[800] < errors[50] / 2
    assert errors[800] < 0.05


def test_implicit_row_sampling_is_unbiased():
    G, X = _factors(n=4, d_out=12, d_in=10, P=3)
    exact = sketch.patch_gram(*sketch.low_rank(G, X, rank=3)[:2])
    route = ImplicitRoute.build(G, X, bias=False, rank=3, sketch_size=4)
    seeds = 1000
    gen = torch.Generator().manual_seed(0)
    mean = sum(route.gram(gen) for _ in range(seeds)) / seeds
    single = route.gram(gen)
    err_mean = ((mean - exact).norm() / exact.norm()).item()
    err_single = ((single - exact).norm() / exact.norm()).item()
    print(f"\nimplicit row sampling 4 of 12/10 rows: one draw {err_single:.3f}, mean of {seeds} {err_mean:.3f}")
    assert err_mean < 0.05 and err_mean < err_single / 3


def test_damped_cholesky_solves_and_falls_back_to_jitter():
    A = torch.randn(6, 3, dtype=D)
    K = A @ A.T  # rank 3: singular
    L = sketch.damped_cholesky(K, 0.5)
    b = torch.randn(6, dtype=D)
    torch.testing.assert_close(sketch.cholesky_solve_vec(L, b), torch.linalg.solve(K + 0.5 * torch.eye(6, dtype=D), b))
    # an indefinite matrix with damping that does not fix it: the jitter cannot either -> None
    assert sketch.damped_cholesky(-K - torch.eye(6, dtype=D), 0.5) is None
    assert sketch.damped_cholesky(torch.full((3, 3), float("nan"), dtype=D), 0.5) is None
    # tiny negative eigenvalue from round-off: jitter rescues it
    Kneg = K - 1e-13 * torch.eye(6, dtype=D)
    assert sketch.damped_cholesky(Kneg, 0.0) is not None


# ------------------------------------------------------------------------- embedding (token) rows
def _token_U(tokens, G, V, padding_idx=None):
    """Per-sample gradients of an embedding table ``(V, D)`` by a loop over samples and positions."""
    n, T, d = G.shape
    U = torch.zeros(n, V, d, dtype=D)
    for i in range(n):
        for t in range(T):
            if tokens[i, t] != padding_idx:
                U[i, tokens[i, t]] += G[i, t]
    return U.reshape(n, -1)


def _tokens(n=5, T=7, V=6):
    """Few tokens for many positions: repeats within and across samples."""
    return torch.randint(0, V, (n, T)), torch.randn(n, T, 3, dtype=D)


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_token_pairs_sum_repeated_tokens_and_drop_padding(padding_idx):
    tokens, G = _tokens()
    sample, token, A = sketch.token_pairs(tokens, G, padding_idx)
    assert len(set(zip(sample.tolist(), token.tolist()))) == sample.numel()  # one row per pair
    assert torch.equal(token, token.sort().values) and padding_idx not in token.tolist()
    U = torch.zeros(5, 6, 3, dtype=D).index_put_((sample, token), A, accumulate=True)
    torch.testing.assert_close(U.reshape(5, -1), _token_U(tokens, G, 6, padding_idx), rtol=1e-12, atol=1e-12)


def test_token_gram_and_products_match_explicit_U():
    tokens, G = _tokens()
    U = _token_U(tokens, G, 6)
    sample, token, A = sketch.token_pairs(tokens, G)
    torch.testing.assert_close(sketch.token_gram(sample, token, A, 5), U @ U.T, rtol=1e-12, atol=1e-12)
    W = torch.randn(6, 3, dtype=D)
    torch.testing.assert_close(sketch.token_u_dot(sample, token, A, W, 5), U @ W.reshape(-1), rtol=1e-12, atol=1e-12)
    v = torch.randn(5, dtype=D)
    out = sketch.token_apply_(W.clone(), sample, token, A, v, -0.5)
    torch.testing.assert_close(out.reshape(-1), W.reshape(-1) - 0.5 * U.T @ v, rtol=1e-12, atol=1e-12)


def test_token_gram_chunks_give_the_same_result(monkeypatch):
    tokens, G = _tokens(n=7, T=9, V=4)
    sample, token, A = sketch.token_pairs(tokens, G)
    full = sketch.token_gram(sample, token, A, 7)
    cross_args = (sample, token, A, torch.randn(7, 4, 5, dtype=D), torch.randn(7, 3, 5, dtype=D), 7)
    cross = sketch.token_cross_gram(*cross_args)
    monkeypatch.setattr(sketch, "_GRAM_CHUNK_ELEMENTS", 1)
    torch.testing.assert_close(sketch.token_gram(sample, token, A, 7), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sketch.token_cross_gram(*cross_args), cross, rtol=1e-12, atol=1e-12)


def test_token_cross_gram_matches_explicit_rows():
    tokens, G = _tokens()
    U = _token_U(tokens, G, 6)
    Gl, Xl = torch.randn(5, 1, 6, 4, dtype=D), torch.randn(5, 1, 3, 4, dtype=D)
    L = _explicit_U(Gl, Xl)  # the dense rows of the same (6, 3) matrix
    sample, token, A = sketch.token_pairs(tokens, G)
    torch.testing.assert_close(sketch.token_cross_gram(sample, token, A, Gl[:, 0], Xl[:, 0], 5), U @ L.T,
                               rtol=1e-12, atol=1e-12)


def test_batched_damped_cholesky_equals_one_by_one_and_marks_bad_matrices():
    g = torch.Generator().manual_seed(0)
    A = [torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    b = torch.randn(4, 2, generator=g, dtype=torch.float64)
    grams = [a @ a.T for a in A] + [b @ b.T]  # three of one shape (one batch), one of another
    grams.append(grams[0].clone().fill_(float("nan")))
    grams.append(-10 * torch.eye(5, dtype=torch.float64))  # never positive definite, even with jitter
    out = sketch.damped_cholesky_batch(grams, 0.3)
    for K, L in zip(grams[:4], out[:4]):
        torch.testing.assert_close(L, sketch.damped_cholesky(K, 0.3), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(L @ L.T, K + 0.3 * torch.eye(K.shape[0], dtype=K.dtype), rtol=1e-10, atol=1e-10)
        assert L.untyped_storage().nbytes() == L.numel() * L.element_size()  # not a view of the batch
    assert out[4] is None and out[5] is None


def test_batched_damped_cholesky_jitters_a_singular_member_alone():
    K = torch.ones(4, 4, dtype=torch.float64)  # rank one: K + λI is fine, K alone is singular
    out = sketch.damped_cholesky_batch([K, K.clone()], 0.0)
    assert all(L is not None and torch.isfinite(L).all() for L in out)
    torch.testing.assert_close(out[0], sketch.damped_cholesky(K, 0.0))


def test_eigen_batch_retries_one_by_one_and_marks_the_matrix_eigh_cannot_do(monkeypatch):
    torch.manual_seed(0)
    A = [torch.randn(4, 6, dtype=D) for _ in range(3)]
    grams = [a @ a.T for a in A]
    bad = grams[1]
    real_eigh = torch.linalg.eigh

    def eigh(K):
        if K.dim() == 3 or torch.equal(K, bad):
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real_eigh(K)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    out = sketch.eigen_batch(grams)
    assert out[1] is None
    for K, (Q, e) in zip([grams[0], grams[2]], [out[0], out[2]]):
        torch.testing.assert_close(Q @ torch.diag(e) @ Q.T, K, rtol=1e-10, atol=1e-10)
