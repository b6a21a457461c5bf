"""The SENG authors' column sampling (``column_sample_size``) and their route rule (``route="threshold"``):
each draw against the dense formula on explicit matrices in float64, unbiasedness over draws, the settings'
checks, and resume with a draw in the saved state."""

import pytest
import torch
from torch import nn

from lightning_seng import SENG, sketch
from lightning_seng.layers.routes import ExplicitRoute, ImplicitRoute, RouteSettings, build_route, choose_route
from lightning_seng.preconditioner import check_settings

D = torch.float64


def _dense_U(G, X):
    """Rows ``Σ_p G[n,:,:,p] ⊗ X[n,:,:,p]`` by a loop, ``(N, groups·d_out·d_in)``."""
    n, groups, _, P = G.shape
    return torch.stack([torch.stack([sum(torch.outer(G[i, g, :, p], X[i, g, :, p]) for p in range(P))
                                     for g in range(groups)]).reshape(-1) for i in range(n)])


@pytest.mark.parametrize("bias", [False, True])
def test_one_draw_gram_and_u_dot_are_the_sampled_dense_sums(bias):
    """For the rows drawn at a refresh, UUᵀ and U g are sums over the drawn (row of Ĝ, row of X̂) coordinates of
    the truncated U, rescaled by (d_out/s_g)(d_in'/s_x); Uᵀv uses every coordinate."""
    torch.manual_seed(0)
    n, groups, d_out, d_in, P = 5, 2, 9, 7, 6
    G, X = torch.randn(n, groups, d_out, P, dtype=D), torch.randn(n, groups, d_in, P, dtype=D)
    route = ImplicitRoute.build(G, X, bias, rank=3, sketch_size=4, sampled_u_dot=True)
    g_hat, x_hat, xb = sketch.low_rank(G, X, 3, bias)
    X_full = torch.cat([x_hat, xb[:, :, None, :]], dim=2) if bias else x_hat
    U = _dense_U(g_hat, X_full).reshape(n, groups, d_out, d_in + bias)
    K = route.gram(torch.Generator().manual_seed(3))
    ig, ix = route.tensors["index_g"], route.tensors["index_x"]
    assert ig.numel() == 4 and ix.numel() == 4 and len(set(ig.tolist())) == 4
    scale = (d_out / 4) * ((d_in + bias) / 4)
    Us = U[:, :, ig][:, :, :, ix].reshape(n, -1)
    torch.testing.assert_close(K, Us @ Us.T * scale, rtol=1e-10, atol=1e-10)
    Ww, Wb = torch.randn(groups, d_out, d_in, dtype=D), torch.randn(groups, d_out, dtype=D)
    W = torch.cat([Ww, Wb[..., None]], dim=2) if bias else Ww
    parts = [Ww, Wb] if bias else [Ww]
    expected = Us @ W[:, ig][:, :, ix].reshape(-1) * scale
    torch.testing.assert_close(route.u_dot(parts), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(route.u_dot(parts), expected, rtol=1e-10, atol=1e-10)  # the same draw again
    v = torch.randn(n, dtype=D)
    got = torch.cat([t.reshape(-1) for t in route.apply(parts, v, 0.7)])
    dense = (W.reshape(-1) - U.reshape(n, -1).T @ v) / 0.7
    if bias:  # route parts are weight then bias; the dense rows interleave them per output row
        dense = torch.cat([dense.reshape(groups, d_out, d_in + 1)[..., :d_in].reshape(-1),
                           dense.reshape(groups, d_out, d_in + 1)[..., d_in].reshape(-1)])
    torch.testing.assert_close(got, dense, rtol=1e-10, atol=1e-10)


def test_sampled_gram_and_u_dot_are_unbiased():
    torch.manual_seed(1)
    G, X = torch.randn(4, 1, 12, 3, dtype=D), torch.randn(4, 1, 10, 3, dtype=D)
    g_hat, x_hat, xb = sketch.low_rank(G, X, 3, True)
    exact_route = ImplicitRoute.build(G, X, True, rank=3)
    exact_K = exact_route.gram(None)
    Ww, Wb = torch.randn(1, 12, 10, dtype=D), torch.randn(1, 12, dtype=D)
    exact_u = exact_route.u_dot([Ww, Wb])
    gen = torch.Generator().manual_seed(0)
    draws = 2000
    K_sum, u_sum = torch.zeros_like(exact_K), torch.zeros_like(exact_u)
    for _ in range(draws):
        route = ImplicitRoute.build(G, X, True, rank=3, sketch_size=4, sampled_u_dot=True)
        K_sum += route.gram(gen)
        u_sum += route.u_dot([Ww, Wb])
    single = ImplicitRoute.build(G, X, True, rank=3, sketch_size=4, sampled_u_dot=True)
    err_single = ((single.gram(gen) - exact_K).norm() / exact_K.norm()).item()
    err_K = ((K_sum / draws - exact_K).norm() / exact_K.norm()).item()
    err_u = ((u_sum / draws - exact_u).norm() / exact_u.norm()).item()
    assert err_K < 0.05 and err_K < err_single / 5
    assert err_u < 0.1


def test_column_sample_size_samples_s_squared_coordinates_on_the_explicit_route():
    G, X = torch.randn(6, 1, 8, 5, dtype=D), torch.randn(6, 1, 9, 5, dtype=D)
    gen = torch.Generator().manual_seed(0)
    route = build_route(G, X, True, RouteSettings(route="explicit", column_sample_size=5), gen)
    assert isinstance(route, ExplicitRoute) and route.tensors["index"].numel() == 25
    route = build_route(G, X, True, RouteSettings(route="explicit", column_sample_size=9), gen)
    assert "index" not in route.tensors  # 81 ≥ d = 8·9 + 8: exact
    route = build_route(G, X, True, RouteSettings(route="implicit", column_sample_size=5), gen)
    assert route.options == {"bias": True, "sketch_size": 5, "sampled_u_dot": True}
    route = build_route(G, X, True, RouteSettings(route="implicit", sketch_size=5), gen)
    assert route.options == {"bias": True, "sketch_size": 5, "sampled_u_dot": False}


def test_threshold_rule_is_the_authors_whatever_the_positions():
    s = RouteSettings(route="threshold", implicit_threshold=100, svd_rank=16)
    assert choose_route(8, 1, 10, 10, 1, s) == "explicit"  # d = 100: not above the threshold
    assert choose_route(8, 1, 10, 11, 1, s) == "implicit"  # d = 110 > 100, one position
    assert choose_route(8, 1, 10, 11, 4, s) == "implicit"  # fewer positions than svd_rank: still implicit
    assert choose_route(10_000, 1, 1000, 9, 4096, s) == "implicit"
    assert choose_route(10_000, 1, 9, 9, 4096, s) == "explicit"  # no memory cap in the authors' rule
    auto = RouteSettings(route="auto", implicit_threshold=100, svd_rank=16)
    assert choose_route(8, 1, 10, 11, 4, auto) != "implicit"


def test_settings_name_the_keys():
    with pytest.raises(ValueError, match="sketch_size and column_sample_size.*sketch_size=64.*column_sample_size=8"):
        check_settings(sketch_size=64, column_sample_size=8)
    with pytest.raises(ValueError, match="column_sample_size"):
        check_settings(column_sample_size=0)
    with pytest.raises(ValueError, match="route.*'official'"):
        check_settings(route="official")
    assert check_settings(route="threshold", column_sample_size=8)["column_sample_size"] == 8


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10)).double()


def _step(model, seng, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    seng.step()
    return [p.grad.clone() for p in model.parameters()]


def test_authors_sketch_resumes_bit_exactly_with_the_drawn_rows():
    """Every layer is sampled (threshold 500: the first Conv2d explicit with s² = 16 of its 224 coordinates, the
    second Conv2d (584 parameters) and the Linear implicit with s = 4 rows): the drawn indices travel in the state, so a resumed SENG gives the uninterrupted directions."""
    torch.manual_seed(1)
    batches = [(torch.randn(6, 3, 6, 6, dtype=D), torch.randint(0, 10, (6,))) for _ in range(4)]
    kwargs = dict(damping=0.3, update_freq=3, route="threshold", implicit_threshold=500, column_sample_size=4)
    model = _net()
    seng = SENG(model, **kwargs)
    routes = {}
    reference = []
    for i, (x, y) in enumerate(batches):
        reference.append(_step(model, seng, x, y))
        if i == 0:
            routes = {name: layer.curvature.route for name, layer in seng.layers.items()}
            state = seng.state_dict()
    assert {name: r.name for name, r in routes.items()} == {"0": "explicit", "2": "implicit", "5": "implicit"}
    assert routes["0"].tensors["index"].numel() == 16 and routes["5"].tensors["index_g"].numel() == 4
    resumed_model = _net()
    resumed = SENG(resumed_model, **kwargs)
    _step(resumed_model, resumed, *batches[0])
    resumed.load_state_dict(state)
    for (x, y), expected in zip(batches[1:], reference[1:]):
        for got, want in zip(_step(resumed_model, resumed, x, y), expected):
            assert torch.equal(got, want)
