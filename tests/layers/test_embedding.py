"""nn.Embedding and weights tied between Embedding and Linear modules against the dense per-sample reference
(float64, 1e-10). For a tied weight the reference's per-sample gradient is the sum over its uses
(``torch.func.functional_call`` ties the shared parameter)."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG, sketch
from tests.layers._seng_run import DAMPING
from tests.reference import dense_direction
from tests.reliability._reference import batch_gradient, rel_err, seng_blocks

V, DIM, N, T = 7, 5, 6, 4


class Bag(nn.Module):
    """Tokens ``(N, T)`` -> embedding -> tanh -> flatten -> Linear classifier."""

    def __init__(self, **embedding):
        super().__init__()
        self.emb = nn.Embedding(V, DIM, **embedding)
        self.head = nn.Linear(T * DIM, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)).flatten(1))


class SequenceFirstBag(Bag):
    """The same model fed ``(T, N)`` tokens."""

    def forward(self, tokens):
        return super().forward(tokens.T)


class TinyLM(nn.Module):
    """Embedding -> a position-wise body -> a head tied to the embedding: logits ``(N, T, V)``."""

    def __init__(self, head_bias=False):
        super().__init__()
        self.emb = nn.Embedding(V, DIM)
        self.body = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, V, bias=head_bias)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.body(self.emb(tokens))))


def lm_loss(logits, targets, reduction="mean"):
    """Per-sample mean of the next-token losses, then ``reduction`` over samples."""
    per_sample = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def _tokens(n=N, t=T, vocab=V, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


def _labels(n=N, seed=2):
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))


def _run(model, x, y, loss_fn=F.cross_entropy, reduction="mean", **kwargs):
    """One refresh-and-step; ``({name: direction}, seng)``."""
    seng = SENG(model, damping=DAMPING, update_freq=1, loss_reduction=reduction, **kwargs)
    model.zero_grad()
    loss_fn(model(x), y, reduction=reduction).backward()
    seng.step()
    seng.remove()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, seng


def _blocks(model, tied=()):
    """SENG's blocks: one per module, the tied weight's block holding ``tied`` too."""
    blocks = {}
    for k, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = "emb" if k in tied else k.rsplit(".", 1)[0]
        blocks.setdefault(owner, []).append(k)
    return list(blocks.values())


def _assert_exact(model, x, y, loss_fn=F.cross_entropy, reduction="mean", tied=(), **kwargs):
    ref = seng_blocks(model, loss_fn, x, y, DAMPING, _blocks(model, tied), reduction)
    got, seng = _run(model, x, y, loss_fn, reduction, **kwargs)
    for k in ref:
        assert rel_err(got[k], ref[k]) < 1e-10, (k, rel_err(got[k], ref[k]))
    return seng


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ----------------------------------------------------------------------------------- nn.Embedding
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_embedding_matches_dense(reduction):
    torch.manual_seed(0)
    seng = _assert_exact(Bag().double(), _tokens(), _labels(), reduction=reduction)
    assert seng.layers["emb"].kind == "embedding" and seng.stats["layers/embedding"] == 1
    assert seng.layers["emb"].curvature.route.name == "tokens"


def test_padding_idx_rows_get_no_curvature_and_match_dense():
    torch.manual_seed(0)
    x = _tokens()
    x[:, 0] = 2  # every sample holds the padding token
    _assert_exact(Bag(padding_idx=2).double(), x, _labels())


def test_repeated_tokens_within_and_across_samples_match_dense():
    torch.manual_seed(0)
    x = torch.tensor([[1, 1, 1, 1], [1, 3, 1, 3], [3, 3, 5, 5], [0, 1, 2, 3], [6, 6, 6, 1], [2, 2, 2, 2]])
    seng = _assert_exact(Bag().double(), x, _labels())
    assert seng.layers["emb"].curvature.route.tensors["A"].shape[0] == 12  # distinct (sample, token) pairs


def test_sequence_first_tokens_with_batch_axis_one_match_dense():
    torch.manual_seed(0)
    model = SequenceFirstBag().double()
    x, y = _tokens(), _labels()
    batch_first = Bag().double()
    batch_first.load_state_dict(model.state_dict())
    ref = seng_blocks(batch_first, F.cross_entropy, x, y, DAMPING, _blocks(batch_first))
    got, _ = _run(model, x.T.contiguous(), y, batch_axis=1)
    for k in ref:
        assert rel_err(got[k], ref[k]) < 1e-10, k


def test_max_norm_renormalises_outside_autograd_and_matches_dense():
    torch.manual_seed(0)
    model = Bag(max_norm=0.5).double()
    x, y = _tokens(), _labels()
    with torch.no_grad():
        model(x)  # rows looked up are renormalised in place; a second lookup leaves them as they are
    # per-sample gradients by a loop (vmap cannot batch the in-place renorm)
    names = ["emb.weight"]
    per_sample = []
    for i in range(N):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        per_sample.append(model.emb.weight.grad.clone())
    g = batch_gradient(model, F.cross_entropy, x, y, names)
    ref = dense_direction({"emb.weight": torch.stack(per_sample)}, g, DAMPING, N ** -0.5)
    got, _ = _run(model, x, y)
    assert rel_err(got["emb.weight"], ref["emb.weight"]) < 1e-10


def test_curvature_samples_build_U_from_the_chosen_samples():
    torch.manual_seed(0)
    model = TinyLM().double()
    x, targets = _tokens(n=9), _tokens(n=9, seed=3)
    g = batch_gradient(model, lm_loss, x, targets, [k for k, _ in model.named_parameters()])
    got, seng = _run(model, x, targets, lm_loss, curvature_samples=5, seed=3)
    rows = sketch.sample_indices(9, 5, torch.Generator().manual_seed(3), torch.device("cpu"))
    ref = seng_blocks(model, lm_loss, x[rows], targets[rows], DAMPING, _blocks(model), grads=g)
    assert seng.layers["emb"].curvature.gram.shape == (5, 5)
    for k in ref:
        assert rel_err(got[k], ref[k]) < 1e-10, k


def test_scale_grad_by_freq_falls_back_with_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    model = Bag(scale_grad_by_freq=True).double()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    messages = _warnings(caplog)
    assert len(messages) == 1 and "'emb'" in messages[0] and "scale_grad_by_freq" in messages[0], messages
    row = next(r for r in seng.coverage() if r.module == "emb")
    assert not row.curvature and "couples the samples" in row.note
    F.cross_entropy(model(_tokens()), _labels()).backward()
    raw = model.emb.weight.grad.clone()
    seng.step()
    assert torch.allclose(model.emb.weight.grad, raw / (1 + DAMPING), rtol=1e-15, atol=0)


class ScaledEmbedding(nn.Embedding):
    """A subclass (so not the embedding route) whose outputs are per-sample but whose gradient is not."""

    def forward(self, tokens):
        return 2 * super().forward(tokens)


def test_embedding_subclass_with_scale_grad_by_freq_falls_back_rather_than_taking_the_generic_route(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    model = Bag()
    model.emb = ScaledEmbedding(V, DIM, scale_grad_by_freq=True)
    seng = SENG(model.double(), damping=DAMPING, update_freq=1)
    assert "emb" not in seng.layers
    assert any("'emb'" in m and "scale_grad_by_freq" in m for m in _warnings(caplog))


def test_scale_grad_by_freq_set_after_attach_falls_back_at_the_refresh(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    model = Bag().double()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    model.emb.scale_grad_by_freq = True
    F.cross_entropy(model(_tokens()), _labels()).backward()
    raw = model.emb.weight.grad.clone()
    seng.step()
    assert torch.allclose(model.emb.weight.grad, raw / (1 + DAMPING), rtol=1e-15, atol=0)
    assert any("scale_grad_by_freq" in m for m in _warnings(caplog))
    assert "scale_grad_by_freq" in next(r for r in seng.coverage() if r.module == "emb").note


def test_sparse_gradients_fall_back_with_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    model = Bag(sparse=True).double()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    assert any("'emb'" in m and "sparse" in m for m in _warnings(caplog))
    F.cross_entropy(model(_tokens()), _labels()).backward()
    raw = model.emb.weight.grad.to_dense()
    seng.step()
    torch.testing.assert_close(model.emb.weight.grad.to_dense(), raw / (1 + DAMPING), rtol=1e-12, atol=0)


def test_batch_size_equal_to_the_sequence_length_is_told_apart_by_the_probe_and_exact(caplog):
    """Tokens ``(N, T)`` with ``N == T``: the sizes are ambiguous, the structural probe is not."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    seng = _assert_exact(Bag().double(), _tokens(n=T), _labels(n=T))
    assert all(r.curvature for r in seng.coverage()) and not _warnings(caplog)


def test_table_read_outside_the_forward_is_flagged(caplog):
    """``self.pos.weight[:T]``: the module's forward never runs, so its gradient has no captured calls."""

    class Positions(Bag):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(T, DIM)

        def forward(self, tokens):
            h = torch.tanh(self.emb(tokens) + self.pos.weight[:tokens.shape[1]])
            return self.head(h.flatten(1))

    caplog.set_level(logging.WARNING, logger="lightning_seng")
    model = Positions().double()
    got, seng = _run(model, _tokens(), _labels())
    assert any("'pos'" in m and "forward did not run" in m for m in _warnings(caplog))
    assert not next(r for r in seng.coverage() if r.module == "pos").curvature
    assert next(r for r in seng.coverage() if r.module == "emb").curvature


def test_table_also_used_outside_the_forward_is_flagged(caplog):
    """``F.linear(h, emb.weight)`` besides ``emb(tokens)``: the calls the hooks see are only some of its uses."""

    class FunctionalHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, DIM)

        def forward(self, tokens):
            return F.linear(torch.tanh(self.emb(tokens)), self.emb.weight)

    caplog.set_level(logging.WARNING, logger="lightning_seng")
    model = FunctionalHead().double()
    x, targets = _tokens(), _tokens(seed=3)
    got, seng = _run(model, x, targets, lm_loss)
    assert any("'emb'" in m and "outside the modules' forward" in m for m in _warnings(caplog))
    row = next(r for r in seng.coverage() if r.module == "emb")
    assert not row.curvature


class TwoLookups(Bag):
    def lookups(self, tokens):
        return self.emb(tokens[:, :2]), self.emb(tokens[:, 2:])

    def forward(self, tokens):
        return self.head(torch.tanh(sum(self.lookups(tokens))).repeat(1, 2, 1).flatten(1))


def test_module_registered_under_two_names_is_exact():
    """T5's pattern: one Embedding module is both ``emb`` and ``encoder_tokens``."""

    class TwoNames(TwoLookups):
        def __init__(self):
            super().__init__()
            self.encoder_tokens = self.emb

        def lookups(self, tokens):
            return self.emb(tokens[:, :2]), self.encoder_tokens(tokens[:, 2:])

    torch.manual_seed(0)
    model = TwoNames().double()
    x, y = _tokens(), _labels()
    # the reference runs on a twin without the second name (torch.func.functional_call does not restore a
    # module registered twice)
    twin = TwoLookups().double()
    twin.load_state_dict(model.state_dict(), strict=False)
    ref = seng_blocks(twin, F.cross_entropy, x, y, DAMPING, _blocks(twin))
    got, seng = _run(model, x, y)
    for k in ref:
        assert rel_err(got[k], ref[k]) < 1e-10, k
    assert seng.layers["emb"].kind == "embedding" and seng.coverage().percent == 100.0


def test_frozen_embedding_is_left_alone():
    model = Bag().double()
    model.emb.weight.requires_grad_(False)
    seng = _assert_exact(model, _tokens(), _labels())
    assert "emb" not in seng._reasons


def test_vocabulary_beyond_the_float_mantissa_is_not_sent_as_floats():
    """Tokens travel as floats of the curvature dtype: above 2^(mantissa + 1) they would round."""
    from lightning_seng.layers import NotExact
    model = nn.Embedding(300, 2)
    seng = SENG(model, damping=DAMPING, update_freq=1)
    model(torch.tensor([[299, 3], [1, 2], [5, 6]])).square().sum().backward()
    with pytest.raises(NotExact, match="cannot travel exactly as torch.bfloat16"):
        seng.layers[""].take_factors(1.0, torch.bfloat16, None, 3)


# ------------------------------------------------------------------------------------ tied weights
@pytest.mark.parametrize("head_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_tied_language_model_matches_dense(head_bias, reduction):
    torch.manual_seed(0)
    model = TinyLM(head_bias).double()
    seng = _assert_exact(model, _tokens(), _tokens(seed=3), lm_loss, reduction, tied=("head.bias",))
    layer = seng.layers["emb"]
    assert layer.kind == "tied" and layer.curvature.route.name == "tokens"
    assert set(seng.layers) == {"emb", "body"} and seng.coverage().percent == 100.0


@pytest.mark.parametrize("head_bias", [False, True], ids=["no-bias", "bias"])
def test_tied_head_compressed_at_rank_of_the_positions_is_exact(head_bias):
    torch.manual_seed(0)
    model = TinyLM(head_bias).double()
    seng = _assert_exact(model, _tokens(), _tokens(seed=3), lm_loss, tied=("head.bias",), route="implicit",
                         svd_rank=T)
    route = seng.layers["emb"].curvature.route
    assert route.name == "tokens-implicit" and route.tensors["G"].shape == (N, 1, V, T)


def test_tied_head_compressed_below_the_positions_keeps_the_embedding_exact():
    """With ``svd_rank < T`` only the head's positions are truncated: without them (zeroed) the Gram is
    the exact embedding Gram."""
    torch.manual_seed(0)
    model = TinyLM().double()
    x, targets = _tokens(), _tokens(seed=3)
    _, seng = _run(model, x, targets, lm_loss, implicit_threshold=0, svd_rank=2)
    route = seng.layers["emb"].curvature.route
    assert route.name == "tokens-implicit" and route.tensors["G"].shape == (N, 1, V, 2)
    exact = sketch.token_gram(route.tensors["sample"], route.tensors["token"], route.tensors["A"], N)
    assert rel_err(route.gram(None), exact) > 1e-3  # the head's part is there...
    linear = copy.copy(route)
    linear.tensors = dict(route.tensors, G=torch.zeros_like(route.tensors["G"]))
    assert rel_err(linear.gram(None), exact) < 1e-14  # ...and the rest is the exact embedding Gram


def test_tied_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = TinyLM(head_bias=True).double()
    kwargs = dict(damping=DAMPING, update_freq=3, implicit_threshold=0, svd_rank=2)
    seng = SENG(model, **kwargs)
    batches = [(_tokens(seed=10 + s), _tokens(seed=20 + s)) for s in range(6)]
    for x, t in batches[:4]:
        model.zero_grad(); lm_loss(model(x), t).backward(); seng.step()
    twin = copy.deepcopy(model)
    twin_seng = SENG(twin, **kwargs)
    state = copy.deepcopy(seng.state_dict())
    assert state["layers"]["emb"]["route"]["name"] == "tokens-implicit"
    twin_seng.load_state_dict(state)
    for x, t in batches[4:]:  # step 4 reuses the stored curvature, step 5 too, 6 refreshes
        for m, s in ((model, seng), (twin, twin_seng)):
            m.zero_grad(); lm_loss(m(x), t).backward(); s.step()
        for (k, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p.grad, q.grad), k


def test_linear_modules_sharing_weight_and_bias_are_one_exact_layer():
    class TwinLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(DIM, DIM)
            self.b = nn.Linear(DIM, DIM)
            self.b.weight, self.b.bias = self.a.weight, self.a.bias
            self.head = nn.Linear(DIM, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    model = TwinLinears().double()
    x = torch.randn(N, DIM, dtype=torch.float64)
    seng = _assert_exact(model, x, _labels())
    assert set(seng.layers) == {"a", "head"} and seng.coverage().percent == 100.0


def test_linear_modules_sharing_weight_with_different_biases_fall_back(caplog):
    class TwoHeads(TinyLM):
        def __init__(self):
            super().__init__()
            self.head2 = nn.Linear(DIM, V)
            self.head2.weight = self.emb.weight

        def forward(self, tokens):
            h = torch.tanh(self.body(self.emb(tokens)))
            return self.head(h) + self.head2(h)

    caplog.set_level(logging.WARNING, logger="lightning_seng")
    seng = SENG(TwoHeads().double(), damping=DAMPING)
    messages = _warnings(caplog)
    assert len(messages) == 1 and "different biases" in messages[0], messages
    assert set(seng.layers) == {"body"}


def test_excluding_one_use_of_a_tied_weight_falls_back_all_of_them(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    seng = SENG(TinyLM().double(), damping=DAMPING, exclude=["head"])
    assert set(seng.layers) == {"body"}
    messages = _warnings(caplog)
    assert len(messages) == 1 and "'emb'" in messages[0] and "tied to 'head'" in messages[0], messages


def test_several_embedding_modules_and_a_head_sharing_one_table_are_exact():
    """An encoder-decoder's pattern: ``shared``, ``encoder_tokens`` and ``decoder_tokens`` are distinct
    Embedding modules with one table, tied to the head too."""

    class EncoderDecoder(TinyLM):
        def __init__(self):
            super().__init__()
            self.encoder_tokens = nn.Embedding(V, DIM)
            self.decoder_tokens = nn.Embedding(V, DIM)
            self.encoder_tokens.weight = self.decoder_tokens.weight = self.emb.weight

        def forward(self, tokens):
            context = torch.tanh(self.body(self.encoder_tokens(tokens))).mean(1, keepdim=True)
            return self.head(torch.tanh(self.decoder_tokens(tokens.flip(1)) + context))

    torch.manual_seed(0)
    model = EncoderDecoder().double()
    seng = _assert_exact(model, _tokens(), _tokens(seed=3), lm_loss)
    assert set(seng.layers) == {"emb", "body"} and len(seng.layers["emb"].modules()) == 4
    assert seng.coverage().percent == 100.0


def test_micro_batches_keep_the_last_one_without_a_warning(caplog):
    """Gradient accumulation: the gradient reaching the table sums both backward passes, the captured calls
    are the last micro-batch's; the uses check compares like with like."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = TinyLM(head_bias=True).double()
    x, targets = _tokens(), _tokens(seed=3)
    ref = seng_blocks(model, lm_loss, x[3:], targets[3:], DAMPING, _blocks(model, ("head.bias",)),
                      grads=batch_gradient(model, lm_loss, x, targets, [k for k, _ in model.named_parameters()]))
    seng = SENG(model, damping=DAMPING, update_freq=1)
    model.zero_grad()
    for part in (slice(0, 3), slice(3, None)):
        (lm_loss(model(x[part]), targets[part]) / 2).backward()
    seng.step(loss_scale=0.5)
    assert _warnings(caplog) == []
    for k, p in model.named_parameters():
        assert rel_err(p.grad, ref[k]) < 1e-10, k


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_tied_model_needs_no_warning(amp_dtype, caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = TinyLM(head_bias=True)
    seng = SENG(model, damping=DAMPING, update_freq=1)
    for seed in range(2):
        model.zero_grad()
        with torch.autocast("cpu", dtype=amp_dtype):
            loss = lm_loss(model(_tokens(seed=seed)), _tokens(seed=seed + 10))
        loss.backward()
        seng.step()
    assert _warnings(caplog) == []
    assert seng.layers["emb"].curvature.gram.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_forward_without_backward_before_the_refresh_batch_needs_no_warning(caplog):
    """A dropped batch (forward on a refresh step, no backward): its graph is freed before the next batch's
    backward, and the uses check must still see that backward's gradient."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = TinyLM().double()
    x, targets = _tokens(), _tokens(seed=3)
    ref = seng_blocks(model, lm_loss, x, targets, DAMPING, _blocks(model))
    seng = SENG(model, damping=DAMPING, update_freq=1)
    model(_tokens(seed=7))
    model.zero_grad()
    lm_loss(model(x), targets).backward()
    seng.step()
    assert _warnings(caplog) == []
    for k, p in model.named_parameters():
        assert rel_err(p.grad, ref[k]) < 1e-10, k
