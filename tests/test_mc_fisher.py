"""``fisher="mc"``: U's rows are per-sample gradients of the negative log-likelihood at targets drawn from the
model's predictive distribution, checked in float64 against a dense reference built with ``torch.func`` from the
same drawn targets (``seng.sampled_targets``), on every route; the sampled Fisher's mean over draws against the
exact Fisher; the likelihoods, reductions, output module, validation and the Lightning callback."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_seng import SENG
from lightning_seng.callback import SENGCallback
from lightning_seng.fisher import Categorical

from .lightning_modules import ClassifierSteps, for_package
from .reference import dense_direction, per_sample_gradients, rel_err

DAMPING = 0.3
TOL = 1e-9


# ----------------------------------------------------------------------------------------------- models
class Scale(nn.Module):
    """A module of our own (no dedicated route): the generic route."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.b = nn.Parameter(torch.linspace(-0.2, 0.2, d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w + self.b


class Sequence(nn.Module):
    """(N, T, d) -> Linear -> tanh -> Linear: logits (N, T, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class ConvNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.ln = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.norm(self.conv(x))).flatten(1)
        return self.head(torch.tanh(self.ln(self.fc(h))))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(torch.tanh(h).mean(1))


class Embedded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(tokens)).mean(1))


class Tied(nn.Module):
    """A language model with tied embeddings: logits (N, T, V)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mid(self.emb(tokens))))


class Generic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.scale = Scale(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.scale(self.fc(x))))


N = 6


def _data(kind: str, n: int = N):
    g = torch.Generator().manual_seed(3)
    if kind == "sequence":
        return torch.randn(n, 5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n, 5), generator=g)
    if kind == "conv":
        return torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    if kind == "attention":
        return torch.randn(n, 5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    if kind in ("embedding", "tied"):
        tokens = torch.randint(0, 7, (n, 5), generator=g)
        return tokens, (torch.randint(0, 7, (n, 5), generator=g) if kind == "tied" else
                        torch.randint(0, 3, (n,), generator=g))
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    make = {"linear": lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), "sequence": Sequence,
            "conv": ConvNorm, "attention": Attention, "embedding": Embedded, "tied": Tied, "generic": Generic}
    return make[kind]().double()


def _user_loss(kind: str, out: Tensor, y: Tensor, reduction: str) -> Tensor:
    """The training loss at the true labels (the user's; its gradient is the one preconditioned)."""
    if kind in ("sequence", "tied"):
        return F.cross_entropy(out.transpose(1, 2), y, reduction=reduction)
    return F.cross_entropy(out, y, reduction=reduction)


def _likelihood(kind: str):
    return Categorical(class_axis=-1) if kind in ("sequence", "tied") else "categorical"


def _sampled_nll(kind: str, reduction: str):
    """ℓ_n at a drawn target for one sample (batch of one), reduced over its positions as ``reduction`` says:
    written with torch's losses directly, not with the package's likelihoods."""
    def loss(out: Tensor, t: Tensor) -> Tensor:
        if kind in ("sequence", "tied"):
            return F.cross_entropy(out.transpose(1, 2), t, reduction=reduction)
        return F.cross_entropy(out, t, reduction=reduction)
    return loss


def _layer_names(seng: SENG, model: nn.Module):
    """Per SENG layer, the names of its trainable parameters in the model."""
    ids = {id(p): k for k, p in model.named_parameters()}
    return {name: [ids[id(p)] for p in layer.trainable_params(layer.trainable())] for name, layer in seng.layers.items()}


def _mc_step(kind: str, reduction: str = "mean", **kwargs):
    """One refresh step with fisher="mc": the directions SENG wrote, the user's gradients and the dense reference
    built from the drawn targets."""
    model = _model(kind)
    x, y = _data(kind)
    seng = SENG(model, damping=DAMPING, update_freq=1, fisher="mc", likelihood=_likelihood(kind),
                loss_reduction=reduction, **kwargs)
    model.zero_grad()
    _user_loss(kind, model(x), y, reduction).backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    seng.step()
    assert not seng._reasons, seng._reasons
    targets = seng.sampled_targets
    assert targets is not None and targets.shape == y.shape
    got = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    want = {}
    for names in _layer_names(seng, model).values():
        rows = per_sample_gradients(model, _sampled_nll(kind, reduction), x, targets, names)
        want.update(dense_direction(rows, {k: grads[k] for k in names}, DAMPING, 1 / math.sqrt(x.shape[0])))
    return seng, got, want, grads


@pytest.mark.parametrize("kind", ["linear", "sequence", "conv", "attention", "embedding", "tied", "generic"])
def test_mc_direction_equals_dense_reference_from_the_drawn_targets(kind):
    seng, got, want, grads = _mc_step(kind)
    assert set(want) == set(got), (set(got) - set(want))
    for k in want:
        assert rel_err(got[k], want[k]) < TOL, (kind, k, rel_err(got[k], want[k]))
    # the sampled Fisher is not the empirical one: the directions differ from the empirical SENG's
    model = _model(kind)
    x, y = _data(kind)
    empirical = SENG(model, damping=DAMPING, update_freq=1)
    _user_loss(kind, model(x), y, "mean").backward()
    empirical.step()
    assert max(rel_err(p.grad, got[k]) for k, p in model.named_parameters()) > 1e-3


@pytest.mark.parametrize("route", ["explicit", "gram", "implicit"])
def test_mc_direction_on_each_linear_route_of_a_sequence_model(route):
    seng, got, want, _ = _mc_step("sequence", route=route, svd_rank=5)  # rank 5 = T: the implicit route is exact
    assert seng.stats["layers/" + route] == 2
    for k in want:
        assert rel_err(got[k], want[k]) < TOL, (route, k, rel_err(got[k], want[k]))


def test_mc_direction_under_sum_reduction():
    _, got, want, _ = _mc_step("sequence", reduction="sum")
    for k in want:
        assert rel_err(got[k], want[k]) < TOL, (k, rel_err(got[k], want[k]))


def test_the_draw_is_reproducible_from_the_seed_and_moves_with_it():
    first = _mc_step("linear", seed=5)[0].sampled_targets
    again = _mc_step("linear", seed=5)[0].sampled_targets
    other = _mc_step("linear", seed=6)[0].sampled_targets
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_empirical_fisher_is_unchanged_and_draws_nothing():
    """fisher="empirical" (the default) gives bit for bit the direction SENG gave before the option existed:
    the same as a SENG with the empirical default, and the dense empirical reference."""
    model = _model("linear")
    x, y = _data("linear")
    seng = SENG(model, damping=DAMPING, update_freq=1, fisher="empirical")
    plain_model = _model("linear")
    plain = SENG(plain_model, damping=DAMPING, update_freq=1)
    for m, s in ((model, seng), (plain_model, plain)):
        F.cross_entropy(m(x), y).backward()
        grads = {k: p.grad.clone() for k, p in m.named_parameters()}
        s.step()
    assert seng.sampled_targets is None
    for (k, p), q in zip(model.named_parameters(), plain_model.parameters()):
        assert torch.equal(p.grad, q.grad)
    for names in _layer_names(seng, model).values():
        rows = per_sample_gradients(plain_model, lambda o, t: F.cross_entropy(o, t), x, y, names)
        want = dense_direction(rows, {k: grads[k] for k in names}, DAMPING, 1 / math.sqrt(N))
        params = dict(model.named_parameters())
        for k in names:
            assert rel_err(params[k].grad, want[k]) < TOL


# ----------------------------------------------------------------------------------------------- likelihoods
class Regressor(nn.Module):
    def __init__(self, d_out: int = 3) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("likelihood, loss", [("gaussian", F.mse_loss),
                                              ("bernoulli", F.binary_cross_entropy_with_logits)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_and_bernoulli_directions_equal_dense_reference(likelihood, loss, reduction):
    torch.manual_seed(0)
    model = Regressor().double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = torch.rand(N, 3, generator=g, dtype=torch.float64)
    seng = SENG(model, damping=DAMPING, update_freq=1, fisher="mc", likelihood=likelihood, loss_reduction=reduction)
    loss(model(x), y, reduction=reduction).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    seng.step()
    targets = seng.sampled_targets
    assert targets.shape == (N, 3)
    if likelihood == "bernoulli":
        assert set(targets.unique().tolist()) <= {0.0, 1.0}
    for names in _layer_names(seng, model).values():
        rows = per_sample_gradients(model, lambda o, t: loss(o, t, reduction=reduction), x, targets, names)
        want = dense_direction(rows, {k: grads[k] for k in names}, DAMPING, 1 / math.sqrt(N))
        params = dict(model.named_parameters())
        for k in names:
            assert rel_err(params[k].grad, want[k]) < TOL, (likelihood, reduction, k)


def test_callable_likelihood_gives_the_rows_of_its_per_sample_loss():
    """A callable (outputs, generator) -> ℓ (N,): here a Student-like robust loss at a drawn target, written
    out; the reference uses the same targets, drawn from a copy of the generator state."""
    drawn = {}

    def likelihood(out: Tensor, generator: torch.Generator) -> Tensor:
        t = out.detach() + torch.randn(out.shape, generator=generator, dtype=out.dtype)
        drawn["t"] = t
        return torch.log1p((out - t) ** 2).sum(1)

    torch.manual_seed(0)
    model = Regressor().double()
    x = torch.randn(N, 5, dtype=torch.float64)
    seng = SENG(model, damping=DAMPING, update_freq=1, fisher="mc", likelihood=likelihood, seed=3)
    F.mse_loss(model(x), torch.zeros(N, 3, dtype=torch.float64)).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    seng.step()
    assert seng.sampled_targets is None
    for names in _layer_names(seng, model).values():
        rows = per_sample_gradients(model, lambda o, t: torch.log1p((o - t) ** 2).sum(), x, drawn["t"], names)
        want = dense_direction(rows, {k: grads[k] for k in names}, DAMPING, 1 / math.sqrt(N))
        params = dict(model.named_parameters())
        for k in names:
            assert rel_err(params[k].grad, want[k]) < TOL


# ----------------------------------------------------------------------------------------------- expectation
def _fisher_draws(model, x, draws, likelihood, loss_fn=None, y_from=None, t=None):
    """``tᵀ F t`` of the committed curvature of the first layer (its weight and bias), once per refresh: with
    fisher="mc" a new draw each time; with ``y_from`` the empirical Fisher at labels drawn by ``y_from``."""
    seng = SENG(model, damping=DAMPING, update_freq=1, fisher="mc" if y_from is None else "empirical",
                likelihood=likelihood, seed=11)
    layer = seng.layers["0"]
    values = []
    for _ in range(draws):
        model.zero_grad()
        out = model(x)
        y = out.detach() if y_from is None else y_from(out.detach())
        (loss_fn(out, y) if loss_fn is not None else F.cross_entropy(out, y.argmax(1))).backward()
        seng.step()
        values.append(float(layer.curvature_norm(t)))
    return torch.tensor(values, dtype=torch.float64)


def _within(draws: Tensor, exact: float, sigmas: float = 5.0) -> None:
    """The mean of the draws within ``sigmas`` standard errors (from their own spread) of ``exact``."""
    err = float(draws.mean()) - exact
    se = float(draws.std()) / math.sqrt(draws.numel())
    assert abs(err) <= sigmas * se, (float(draws.mean()), exact, se)


def test_sampled_fisher_mean_approaches_the_exact_fisher_of_a_softmax_model():
    """F_exact = (1/N) Σ_n Σ_c p_nc ∇log p_c ∇log p_cᵀ in closed form for a softmax regression (weight and bias);
    each refresh's tᵀ F_mc t is an unbiased draw of tᵀ F_exact t."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    n, draws = 8, 600
    x = torch.randn(n, 4, dtype=torch.float64)
    t = [torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    exact = 0.0
    for i in range(n):
        for c in range(3):
            e = torch.zeros(3, dtype=torch.float64)
            e[c] = 1
            gw, gb = torch.outer(p[i] - e, x[i]), p[i] - e  # ∇_θ (−log p_c)
            exact += p[i, c] * float((gw * t[0]).sum() + (gb * t[1]).sum()) ** 2 / n
    seng = SENG(model, damping=DAMPING, update_freq=1, fisher="mc", seed=7)
    values = []
    for _ in range(draws):
        model.zero_grad()
        F.cross_entropy(model(x), torch.zeros(n, dtype=torch.long)).backward()
        seng.step()
        values.append(float(seng.layers["0"].curvature_norm(t)))
    values = torch.tensor(values, dtype=torch.float64)
    _within(values, exact)
    assert float(values.std()) > 0  # the draws differ: each refresh draws anew


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_sampled_fisher_mean_matches_the_exact_fisher_and_the_empirical_one_at_a_correct_model(likelihood):
    """Scale: E[F_mc] = (1/N) Σ_n J_nᵀ E[∇_f ℓ ∇_f ℓᵀ] J_n / D² under "mean" (D outputs per sample), with
    E[∇_f ℓ ∇_f ℓᵀ] = 4I for F.mse_loss at unit variance and diag(σ(1 − σ)) for the logistic loss; and the
    empirical Fisher of the same loss at labels drawn from the model (a correct model) has that mean too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2)).double()
    n, draws, D = 8, 500, 2
    x = torch.randn(n, 4, dtype=torch.float64)
    t = [torch.randn(2, 4, dtype=torch.float64), torch.randn(2, dtype=torch.float64)]
    with torch.no_grad():
        f = model(x)
    jt = (x @ t[0].T + t[1])  # J_n t: (N, D), the output's change along t
    weight = torch.full_like(f, 4.0) if likelihood == "gaussian" else torch.sigmoid(f) * (1 - torch.sigmoid(f))
    exact = float((weight * jt ** 2).sum() / D ** 2 / n)
    if likelihood == "gaussian":
        loss_fn, correct = F.mse_loss, (lambda out: out + torch.randn(out.shape, dtype=out.dtype))
    else:
        loss_fn, correct = F.binary_cross_entropy_with_logits, (lambda out: torch.bernoulli(torch.sigmoid(out)))
    mc = _fisher_draws(model, x, draws, likelihood, loss_fn, t=t)
    _within(mc, exact)
    empirical = _fisher_draws(model, x, draws, likelihood, loss_fn, y_from=correct, t=t)
    _within(empirical, exact)


# ----------------------------------------------------------------------------------------------- output module
class Wrapped(nn.Module):
    """The logits come from ``head``; the model returns a dict, which no built-in likelihood reads."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> dict:
        return {"logits": self.head(torch.tanh(self.body(x)))}


def test_output_module_by_name_reads_the_submodule_output():
    torch.manual_seed(0)
    model = Wrapped().double()
    x, y = _data("linear")
    seng = SENG(model, damping=DAMPING, update_freq=1, fisher="mc", output_module="head")
    F.cross_entropy(model(x)["logits"], y).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    seng.step()
    assert not seng._reasons
    for names in _layer_names(seng, model).values():
        rows = per_sample_gradients(model, lambda o, t: F.cross_entropy(o["logits"], t), x, seng.sampled_targets,
                                    names)
        want = dense_direction(rows, {k: grads[k] for k in names}, DAMPING, 1 / math.sqrt(N))
        params = dict(model.named_parameters())
        for k in names:
            assert rel_err(params[k].grad, want[k]) < TOL


def test_an_output_no_likelihood_reads_falls_back_with_a_warning(caplog):
    torch.manual_seed(0)
    model = Wrapped().double()
    x, y = _data("linear")
    seng = SENG(model, damping=DAMPING, update_freq=1, fisher="mc")
    F.cross_entropy(model(x)["logits"], y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with caplog.at_level(logging.WARNING):
        seng.step()
    assert set(seng._reasons) == {"body", "head"}
    assert "its output is a dict, not a tensor" in caplog.text and "'head'" in caplog.text
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, g / (1 + DAMPING))


def test_a_layer_after_the_output_module_falls_back_with_a_warning(caplog):
    """``head`` is the output module; ``extra`` runs after it, so the sampled loss cannot reach it."""

    class After(Wrapped):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(3, 3)

        def forward(self, x):
            return self.extra(super().forward(x)["logits"])

    torch.manual_seed(0)
    model = After().double()
    x, y = _data("linear")
    seng = SENG(model, damping=DAMPING, update_freq=1, fisher="mc", output_module="head")
    F.cross_entropy(model(x), y).backward()
    with caplog.at_level(logging.WARNING):
        seng.step()
    assert set(seng._reasons) == {"extra"}
    assert "did not reach the sampled loss" in caplog.text and "'extra'" in caplog.text


def test_gradient_checkpointing_falls_back_with_a_warning(caplog):
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(checkpoint(lambda h: torch.tanh(self.fc1(h)), x, use_reentrant=False))

    torch.manual_seed(0)
    model = Checkpointed().double()
    x, y = _data("linear")
    seng = SENG(model, damping=DAMPING, update_freq=1, fisher="mc")
    F.cross_entropy(model(x), y).backward()
    with caplog.at_level(logging.WARNING):
        seng.step()
    assert seng._reasons
    assert "gradient checkpointing" in caplog.text


def test_outputs_with_the_samples_off_axis_zero_fall_back(caplog):
    """A sequence-first model's (T, N, C) logits: the probe finds the samples on axis 1, not axis 0."""

    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):  # x: (T, N, 4)
            return self.fc(x).permute(0, 2, 1)  # (T, C, N): axis 0 has T == N entries

    torch.manual_seed(0)
    model = SeqFirst().double()
    x = torch.randn(N, N, 4, dtype=torch.float64)
    seng = SENG(model, damping=DAMPING, update_freq=1, fisher="mc", batch_axis=1)
    F.cross_entropy(model(x), torch.zeros(N, N, dtype=torch.long)).backward()
    with caplog.at_level(logging.WARNING):
        seng.step()
    assert set(seng._reasons) == {"fc"}
    assert "not on axis 0" in caplog.text


# ----------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("kwargs, message", [
    (dict(fisher="true"), "fisher must be one of ['empirical', 'mc'] (got 'true')"),
    (dict(likelihood="poisson"), "likelihood must be one of ['categorical', 'gaussian', 'bernoulli']"),
    (dict(likelihood=Categorical), "likelihood must be one of"),
    (dict(output_module=3), "output_module must be None"),
    (dict(output_module="hed"), "output_module must name a submodule of the model"),
])
def test_bad_values_are_rejected_naming_key_value_and_choices(kwargs, message):
    with pytest.raises(ValueError) as info:
        SENG(_model("linear"), **kwargs)
    assert message in str(info.value)


def test_categorical_refuses_class_axis_zero():
    with pytest.raises(ValueError, match="class_axis must be an int other than 0"):
        Categorical(class_axis=0)


def test_repr_names_the_fisher():
    seng = SENG(_model("linear"), fisher="mc", likelihood="bernoulli")
    assert "fisher='mc'" in repr(seng) and "likelihood=Bernoulli()" in repr(seng)


# ----------------------------------------------------------------------------------------------- Lightning
def _fit_with_callback(package, callback):
    module = for_package(ClassifierSteps, package)(_model("linear").float())
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(24, 5, generator=g), torch.randint(3, (24,), generator=g))
    trainer = package.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                              enable_model_summary=False, enable_checkpointing=False, max_steps=3,
                              callbacks=[callback])
    trainer.fit(module, DataLoader(data, batch_size=8))
    return callback.seng


def test_callback_passes_the_fisher_arguments(pl_package):
    """ClassifierSteps' training_step calls ``self.net``: the sampled loss is read from ``net``."""
    callback = SENGCallback(damping=DAMPING, update_freq=2, fisher="mc", likelihood="categorical",
                            output_module="net")
    seng = _fit_with_callback(pl_package, callback)
    assert seng.fisher == "mc" and seng.output_module == "net"
    assert seng.sampled_targets is not None and seng.sampled_targets.shape == (8,)
    assert not seng._reasons and seng.stats["coverage"] == 100.0


def test_callback_with_the_lightning_module_as_output_module_says_it_did_not_run(pl_package, caplog):
    callback = SENGCallback(damping=DAMPING, update_freq=2, fisher="mc")
    with caplog.at_level(logging.WARNING):
        seng = _fit_with_callback(pl_package, callback)
    assert seng._reasons
    assert "did not run on this refresh step" in caplog.text


def test_callback_rejects_a_bad_fisher_before_fit():
    with pytest.raises(ValueError, match="fisher must be one of"):
        SENGCallback(fisher="exact")
