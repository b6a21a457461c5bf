"""nn.MultiheadAttention (in_proj and out_proj) and the Transformer layers built on it, against the dense
per-module reference (float64, 1e-10).

The reference's per-sample gradients come from plain autograd, independently of the package: a loop
over the samples, each alone through the model, or (with dropout, whose masks exist only for the whole
batch) the rows ``∂ℓ_n/∂θ`` of one batch forward. Its blocks are the modules: the attention's own
parameters (in_proj weight(s), in_proj_bias, bias_k, bias_v) form one, out_proj's weight and bias another.
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG
from tests.layers._seng_run import DAMPING
from tests.reference import dense_direction, rel_err
from tests.reliability._reference import module_of

N, L, S, E, HEADS = 5, 4, 6, 8, 2  # the batch size differs from every other dimension
CLASSES = 3
TARGETS = torch.randint(0, CLASSES, (N,), generator=torch.Generator().manual_seed(3))


def classification(logits, rows):
    """Per-sample cross-entropy of the samples ``rows`` of the batch."""
    return F.cross_entropy(logits, TARGETS[rows], reduction="none")


# ----------------------------------------------------------------------------------------------- reference
def _stack(model, names, losses_and_graph):
    """``{name: (N, *shape)}`` from ``(loss_n, keep the graph)`` pairs: each loss's gradient, a row each."""
    params = dict(model.named_parameters())
    rows = {k: [] for k in names}
    for loss, retain in losses_and_graph:
        grads = torch.autograd.grad(loss, [params[k] for k in names], retain_graph=retain, allow_unused=True)
        for k, g in zip(names, grads):
            rows[k].append(torch.zeros_like(params[k]) if g is None else g)
    return {k: torch.stack(v) for k, v in rows.items()}


def loop_gradients(model, inputs, axes, losses, names):
    """``{name: (N, *shape)}``: the gradient of each sample's loss with the sample alone in the batch."""
    def each():
        for i in range(inputs[0].shape[axes[0]]):
            one = [t.narrow(axis, i, 1) for t, axis in zip(inputs, axes)]
            yield losses(model(*one), torch.tensor([i]))[0], False
    return _stack(model, names, each())


def batch_rows(model, inputs, losses, names, seed):
    """``{name: (N, *shape)}``: the rows ``∂ℓ_n/∂θ`` of the per-sample losses of one batch forward."""
    torch.manual_seed(seed)
    per_sample = losses(model(*inputs), torch.arange(N))
    return _stack(model, names, ((loss, True) for loss in per_sample))


def reference_directions(model, inputs, axes, losses, seed=None, reduction="mean"):
    """``(directions, gradients)``: SENG's block-diagonal direction built densely, one block per module, and
    the batch gradient (of the mean loss, or of the summed loss for ``reduction="sum"``)."""
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    rows = (loop_gradients(model, inputs, axes, losses, names) if seed is None
            else batch_rows(model, inputs, losses, names, seed))
    grads = {k: r.mean(0) if reduction == "mean" else r.sum(0) for k, r in rows.items()}
    out = {}
    for module in dict.fromkeys(module_of(k) for k in names):
        block = [k for k in names if module_of(k) == module]
        out.update(dense_direction({k: rows[k] for k in block}, {k: grads[k] for k in block}, DAMPING, N ** -0.5))
    return out, grads


def seng_directions(model, inputs, losses, seed=None, reduction="mean", **kwargs):
    seng = SENG(model, damping=DAMPING, update_freq=1, loss_reduction=reduction, **kwargs)
    model.zero_grad()
    if seed is not None:
        torch.manual_seed(seed)
    per_sample = losses(model(*inputs), torch.arange(N))
    (per_sample.mean() if reduction == "mean" else per_sample.sum()).backward()
    seng.step()
    seng.remove()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, seng


def assert_exact(model, inputs, axes=None, losses=classification, seed=None, may_fall_back=(), reduction="mean",
                 **kwargs):
    """SENG's direction equals the dense reference on every parameter with curvature, ``g / (1 + λ)`` on
    the others, which must be among the modules ``may_fall_back``.

    ``axes``: each input's sample axis (the first one is SENG's ``batch_axis``); ``seed``: the forward
    draws dropout masks from it (then the reference takes the rows of one batch forward)."""
    axes = axes or (0,) * len(inputs)
    ref, grads = reference_directions(model, inputs, axes, losses, seed, reduction)
    got, seng = seng_directions(model, inputs, losses, seed, reduction, batch_axis=axes[0], **kwargs)
    rows = {r.module: r for r in seng.coverage()}
    assert {m for m, r in rows.items() if not r.curvature} <= set(may_fall_back), str(seng.coverage())
    for k, want in ref.items():
        if not rows[module_of(k)].curvature:
            want = grads[k] / (1 + DAMPING)
        assert rel_err(got[k], want) < 1e-10, (k, rel_err(got[k], want))
    return seng


# ----------------------------------------------------------------------------------------------- models
def self_attention(mha, x):
    return mha(x, x, x)[0]


class Pooled(nn.Module):
    """``call(body, *inputs)`` (sequences of width E in the body's layout), mean-pooled over positions, then
    a Linear head. The body is registered as ``name``."""

    def __init__(self, body, call, batch_first, name="mha"):
        super().__init__()
        self.add_module(name, body)
        self.body, self.call, self.batch_first = name, call, batch_first
        self.head = nn.Linear(E, CLASSES)

    def forward(self, *inputs):
        y = self.call(getattr(self, self.body), *inputs)
        return self.head(torch.tanh(y).mean(1 if self.batch_first else 0))


def attend(call=self_attention, batch_first=True, seed=0, **kwargs):
    """A MultiheadAttention(E, HEADS) called by ``call(mha, *inputs)``, pooled, in float64."""
    torch.manual_seed(seed)
    return Pooled(nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **kwargs), call, batch_first).double()


def seq(length, dim=E, batch_first=True):
    shape = (N, length, dim) if batch_first else (length, N, dim)
    return torch.randn(*shape, dtype=torch.float64)


def padding(length=S):
    """A key padding mask ``(N, length)``: True = ignored; every sample keeps its first key."""
    mask = torch.rand(N, length, generator=torch.Generator().manual_seed(5)) < 0.4
    mask[:, 0] = False
    return mask


def causal(length=L):
    return torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)


# ----------------------------------------------------------------------------------------------- MHA alone
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
@pytest.mark.parametrize("route", ["auto", "explicit", "gram", "implicit"])
def test_self_attention_matches_dense(batch_first, route):
    # svd_rank >= positions: the implicit route's truncation is exact
    assert_exact(attend(batch_first=batch_first), (seq(L, batch_first=batch_first),),
                 axes=(0 if batch_first else 1,), route=route, svd_rank=L)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
def test_cross_attention_with_other_key_length_matches_dense(batch_first):
    axis = 0 if batch_first else 1
    model = attend(lambda m, x, mem: m(x, mem, mem)[0], batch_first)
    assert_exact(model, (seq(L, batch_first=batch_first), seq(S, batch_first=batch_first)), axes=(axis, axis))


def test_distinct_query_key_value_tensors_match_dense():
    model = attend(lambda m, x, mem: m(x, mem, torch.cos(mem))[0])
    assert_exact(model, (seq(L), seq(S)))


@pytest.mark.parametrize("route", ["auto", "explicit", "gram"])
def test_kdim_vdim_other_than_embed_dim_match_dense(route):
    model = attend(lambda m, x, keys, values: m(x, keys, values)[0], kdim=3, vdim=7)
    assert not model.mha._qkv_same_embed_dim
    assert_exact(model, (seq(L), seq(S, 3), seq(S, 7)), route=route)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_key_padding_mask_matches_dense(kind):
    mask = padding() if kind == "bool" else padding().double() * -3.0
    model = attend(lambda m, x, mem, pad: m(x, mem, mem, key_padding_mask=pad)[0])
    assert_exact(model, (seq(L), seq(S), mask))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask_matches_dense(kind):
    mask = torch.rand(L, S, generator=torch.Generator().manual_seed(6)) < 0.4
    mask[:, 0] = False
    mask = mask if kind == "bool" else torch.randn(L, S, dtype=torch.float64)
    model = attend(lambda m, x, mem: m(x, mem, mem, attn_mask=mask)[0])
    assert_exact(model, (seq(L), seq(S)))


def test_per_sample_3d_attn_mask_matches_dense():
    # (N·heads, L, S): built from a per-sample tensor so the loop reference slices it with its sample
    masks = torch.randn(N, HEADS, L, S, dtype=torch.float64)
    model = attend(lambda m, x, mem, mask: m(x, mem, mem, attn_mask=mask.reshape(-1, L, S))[0])
    assert_exact(model, (seq(L), seq(S), masks))


@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_with_causal_mask_matches_dense(need_weights):
    model = attend(lambda m, x: m(x, x, x, attn_mask=causal(), is_causal=True, need_weights=need_weights)[0])
    assert_exact(model, (seq(L),))


@pytest.mark.parametrize("need_weights", [True, False])
def test_need_weights_matches_dense(need_weights):
    model = attend(lambda m, x: m(x, x, x, need_weights=need_weights, average_attn_weights=False)[0])
    assert_exact(model, (seq(L),))


@pytest.mark.parametrize("call", [
    lambda m, x: m(x, x, x)[0],
    lambda m, x, mem: m(x, mem, mem)[0],
    lambda m, x, mem, pad: m(x, mem, mem, key_padding_mask=pad, attn_mask=torch.zeros(L, S, dtype=torch.bool))[0],
    lambda m, x: m(x, x, x, attn_mask=causal(), is_causal=True, need_weights=False)[0],
], ids=["self", "cross", "cross-masked", "causal"])
def test_add_bias_kv_matches_dense(call):
    model = attend(call, add_bias_kv=True)
    inputs = (seq(L), seq(S), padding())[:call.__code__.co_argcount - 1]
    assert_exact(model, inputs)


def test_add_zero_attn_with_bias_kv_matches_dense():
    model = attend(lambda m, x, mem: m(x, mem, mem)[0], add_bias_kv=True, add_zero_attn=True)
    assert_exact(model, (seq(L), seq(S)))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_in_training_mode_is_replayed_exactly(batch_first, need_weights):
    model = attend(lambda m, x: m(x, x, x, need_weights=need_weights)[0], batch_first, dropout=0.3).train()
    assert_exact(model, (seq(L, batch_first=batch_first),), axes=(0 if batch_first else 1,), seed=11)


def test_dropout_draws_consumed_after_the_pre_hook_are_detected(caplog):
    model = attend(dropout=0.3).train()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    def draw(module, args):  # runs after SENG's pre-hook, before the attention's dropout
        torch.rand(3)

    model.mha.register_forward_pre_hook(draw)
    with caplog.at_level(logging.WARNING, logger="lightning_seng"):
        classification(model(seq(L)), torch.arange(N)).mean().backward()
        seng.step()
    reasons = {r.module: r.note for r in seng.coverage() if not r.curvature}
    assert "did not reproduce the output" in reasons["mha"] and "inside 'mha'" in reasons["mha.out_proj"]


def test_attention_called_twice_adds_both_calls():
    # self- and cross-attention through one module: the packed call is unpacked to join the other
    model = attend(lambda m, x, mem: m(x, x, x)[0] + m(x, mem, mem)[0])
    assert_exact(model, (seq(L), seq(S)))


def test_out_proj_also_called_outside_its_attention_adds_that_call():
    model = attend(lambda m, x, mem: m(x, x, x)[0] + m.out_proj(mem))
    assert_exact(model, (seq(L), seq(L)))


def test_without_biases_matches_dense():
    assert_exact(attend(bias=False, add_bias_kv=True), (seq(L),))


@pytest.mark.parametrize("frozen", ["mha.in_proj_bias", "mha.in_proj_weight", "mha.bias_k", "mha.out_proj.bias"])
def test_frozen_parameters_leave_the_others_exact(frozen):
    model = attend(lambda m, x, mem: m(x, mem, mem)[0], add_bias_kv=True)
    model.get_parameter(frozen).requires_grad_(False)
    assert_exact(model, (seq(L), seq(S)))


def test_frozen_separate_key_weight_leaves_the_others_exact():
    model = attend(lambda m, x, keys, values: m(x, keys, values)[0], kdim=3, vdim=7)
    model.mha.k_proj_weight.requires_grad_(False)
    assert_exact(model, (seq(L), seq(S, 3), seq(S, 7)))


def test_frozen_input_projections_leave_out_proj_exact():
    model = attend(lambda m, x, mem: m(x, mem, mem)[0], add_bias_kv=True)
    for name in ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v"):
        getattr(model.mha, name).requires_grad_(False)
    seng = assert_exact(model, (seq(L), seq(S)))
    assert seng.layers["mha.out_proj"].curvature is not None


def test_summed_loss_matches_dense():
    assert_exact(attend(lambda m, x, mem: m(x, mem, mem)[0], add_bias_kv=True), (seq(L), seq(S)), reduction="sum")


def test_float32_model_with_float64_curvature_is_close():
    model = attend(lambda m, x, mem: m(x, mem, mem)[0])
    x, mem = seq(L), seq(S)
    ref, _ = reference_directions(model, (x, mem), (0, 0), classification)
    model = model.float()
    seng = SENG(model, damping=DAMPING, update_freq=1, curvature_dtype=torch.float64)
    model.zero_grad()
    classification(model(x.float(), mem.float()), torch.arange(N)).mean().backward()
    seng.step()
    assert seng.coverage().percent == 100.0
    for k, p in model.named_parameters():
        assert rel_err(p.grad.double(), ref[k]) < 1e-4, k


def test_curvature_samples_use_the_same_rows_for_both_projections():
    model = attend(lambda m, x, mem: m(x, mem, mem)[0])
    x, mem = seq(L), seq(S)
    got, seng = seng_directions(model, (x, mem), classification, curvature_samples=3)
    rows = seng.layers["mha"].curvature.gram.shape[0], seng.layers["mha.out_proj"].curvature.gram.shape[0]
    assert rows == (3, 3)


@pytest.mark.parametrize("route", ["explicit", "gram", "implicit"])
@pytest.mark.parametrize("call", [self_attention, lambda m, x: m(x, x.flip(1), x.flip(1))[0]], ids=["packed", "cross"])
def test_state_dict_round_trip_keeps_the_attention_curvature(route, call):
    model = attend(call, add_bias_kv=True)
    x = seq(L)
    seng = SENG(model, damping=DAMPING, update_freq=2, route=route)
    classification(model(x), torch.arange(N)).mean().backward()
    seng.step()
    state = seng.state_dict()
    model.zero_grad()
    classification(model(x), torch.arange(N)).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    seng.step()
    seng.remove()
    want = [p.grad.clone() for p in model.parameters()]
    fresh = SENG(model, damping=DAMPING, update_freq=2, route=route)
    fresh.load_state_dict(state)
    for p, g in zip(model.parameters(), grads):
        p.grad.copy_(g)
    fresh.step()
    assert fresh.layers["mha"].curvature.route.name == route
    for p, w in zip(model.parameters(), want):
        assert torch.equal(p.grad, w)


# ----------------------------------------------------------------------------------------------- coverage
def test_coverage_lists_attention_and_out_proj_with_curvature():
    model = attend(lambda m, x, mem: m(x, mem, mem)[0])
    seng = assert_exact(model, (seq(L), seq(S)))
    rows = {r.module: r for r in seng.coverage()}
    assert rows["mha"].route.startswith("attention") and rows["mha"].curvature
    assert rows["mha.out_proj"].route.startswith("linear") and rows["mha.out_proj"].curvature
    assert rows["mha"].parameters == 3 * E * E + 3 * E and rows["mha.out_proj"].parameters == E * E + E


def test_out_proj_has_no_layer_of_its_own_when_the_attention_is_excluded():
    seng = SENG(attend(), exclude=["mha"])
    rows = {r.module: r for r in seng.coverage()}
    assert "mha.out_proj" not in seng.layers
    assert rows["mha.out_proj"].route == "fallback" and "inside 'mha'" in rows["mha.out_proj"].note


def test_excluded_out_proj_is_not_fed():
    model = attend()
    seng = SENG(model, damping=DAMPING, update_freq=1, exclude=["mha.out_proj"])
    assert seng.layers["mha"].feeds == []
    classification(model(seq(L)), torch.arange(N)).mean().backward()
    seng.step()
    assert seng.layers["mha"].curvature is not None


def test_attention_subclass_overriding_forward_falls_back():
    class Scaled(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            out, w = super().forward(*args, **kwargs)
            return 2 * out, w

    model = attend()
    model.mha.__class__ = Scaled
    seng = SENG(model)
    assert seng.layers["mha"].kind == "generic"  # not the attention route: its own parameters through its forward


# ----------------------------------------------------------------------------------------------- honest fallbacks
def _fallback_reasons(model, inputs, caplog, **kwargs):
    seng = SENG(model, damping=DAMPING, update_freq=1, **kwargs)
    with caplog.at_level(logging.WARNING, logger="lightning_seng"):
        classification(model(*inputs), torch.arange(N)).mean().backward()
        seng.step()
    return {r.module: r.note for r in seng.coverage() if not r.curvature}, caplog.text


def test_unbatched_query_falls_back_with_a_warning(caplog):
    class Unbatched(nn.Module):  # the attention sees one sample at a time, unbatched
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(E, HEADS)
            self.head = nn.Linear(E, CLASSES)

        def forward(self, x):
            return self.head(torch.stack([self.mha(s, s, s)[0].mean(0) for s in x]))

    reasons, log = _fallback_reasons(Unbatched().double(), (seq(L),), caplog)
    assert "unbatched" in reasons["mha"] and "inside 'mha'" in reasons["mha.out_proj"]
    assert "no exact curvature for 'mha'" in log


def test_sequence_first_attention_with_the_batch_read_from_the_wrong_axis_falls_back(caplog):
    """The model's input on ``batch_axis=0`` says ``L``, the attention's declared axis 1 says ``N``."""
    reasons, log = _fallback_reasons(attend(batch_first=False), (seq(L, batch_first=False),), caplog)
    assert "not confirmed" in reasons["mha"]
    assert "mha.out_proj" in reasons
    assert f"first input (batch_axis=0 of its first tensor, of shape {(L, N, E)}): {L}" in log
    assert f"'mha' (MultiheadAttention, batch_first=False) (axis 1 of its input of shape {(L, N, E)}): {N}" in log


def test_weights_changed_after_the_forward_are_detected(caplog):
    model = attend()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    with caplog.at_level(logging.WARNING, logger="lightning_seng"):
        classification(model(seq(L)), torch.arange(N)).mean().backward()
        with torch.no_grad():
            model.mha.out_proj.weight.mul_(1.5)
        seng.step()
    reasons = {r.module: r.note for r in seng.coverage() if not r.curvature}
    assert "did not reproduce the output" in reasons["mha"] and "mha.out_proj" in reasons


def test_non_finite_batch_is_not_reported_as_an_attention_mismatch():
    model = attend()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    x = seq(L)
    x[2, 1, 3] = float("nan")
    classification(model(x), torch.arange(N)).mean().backward()
    seng.step()
    assert seng.stats["nonfinite_steps"] == 1
    assert not [r.note for r in seng.coverage() if "reproduce" in r.note]


# ----------------------------------------------------------------------------------------------- Transformers
LAYOUTS = pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
NORMS = pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])


def pooled(body, call, batch_first):
    torch.manual_seed(0)
    return Pooled(body, call, batch_first, name="net").double()


@LAYOUTS
@NORMS
def test_transformer_encoder_layer_with_dropout_matches_dense(batch_first, norm_first):
    layer = nn.TransformerEncoderLayer(E, HEADS, 12, dropout=0.1, norm_first=norm_first, batch_first=batch_first)
    model = pooled(layer, lambda net, x, pad: net(x, src_mask=causal(), src_key_padding_mask=pad), batch_first)
    axis = 0 if batch_first else 1
    assert_exact(model.train(), (seq(L, batch_first=batch_first), padding(L)), axes=(axis, 0), seed=7)


@LAYOUTS
@NORMS
def test_transformer_decoder_layer_with_dropout_matches_dense(batch_first, norm_first):
    layer = nn.TransformerDecoderLayer(E, HEADS, 12, dropout=0.1, norm_first=norm_first, batch_first=batch_first)
    model = pooled(layer, lambda net, x, mem, pad: net(x, mem, tgt_mask=causal(), tgt_is_causal=True,
                                                        memory_key_padding_mask=pad), batch_first)
    axis = 0 if batch_first else 1
    inputs = (seq(L, batch_first=batch_first), seq(S, batch_first=batch_first), padding(S))
    assert_exact(model.train(), inputs, axes=(axis, axis, 0), seed=7)


@LAYOUTS
@NORMS
def test_two_layer_transformer_encoder_matches_dense(batch_first, norm_first):
    layer = nn.TransformerEncoderLayer(E, HEADS, 12, dropout=0.0, norm_first=norm_first, batch_first=batch_first)
    body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    model = pooled(body, lambda net, x: net(x, mask=causal(), is_causal=True), batch_first)
    axis = 0 if batch_first else 1
    seng = assert_exact(model, (seq(L, batch_first=batch_first),), axes=(axis,))
    kinds = {r.module: r.route.split("/")[0] for r in seng.coverage()}
    assert kinds["net.layers.1.self_attn"] == "attention" and kinds["net.layers.1.self_attn.out_proj"] == "linear"


class SequenceFirstLM(nn.Module):
    """The Lightning demo's language model (embedding, nn.Transformer, decoder) in the sequence-first
    layout: tokens ``(T, N)``, log-probabilities ``(T, N, vocab)``."""

    def __init__(self, vocab=11):
        super().__init__()
        self.embedding = nn.Embedding(vocab, E)
        self.transformer = nn.Transformer(E, HEADS, 1, 1, 12, dropout=0.1)
        self.decoder = nn.Linear(E, vocab)

    def forward(self, src, tgt):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[0], dtype=torch.float64)
        out = self.transformer(self.embedding(src), self.embedding(tgt), tgt_mask=mask)
        return F.log_softmax(self.decoder(out), dim=-1)


def _tokens(shape, seed):
    return torch.randint(0, 11, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_sequence_first_transformer_language_model_matches_dense():
    torch.manual_seed(0)
    model = SequenceFirstLM().double().train()
    src, tgt, labels = _tokens((S, N), 1), _tokens((L, N), 2), _tokens((L, N), 3)

    def losses(logp, rows):  # the mean over tokens per sample; their mean is the batch's token mean
        return F.nll_loss(logp.permute(1, 2, 0), labels[:, rows].T, reduction="none").mean(1)

    assert_exact(model, (src, tgt), axes=(1, 1), losses=losses, seed=9, may_fall_back={"embedding"})


def test_lightning_demo_transformer_matches_dense():
    demo = pytest.importorskip("pytorch_lightning.demos.transformer")
    torch.manual_seed(0)
    model = demo.Transformer(vocab_size=11, ninp=E, nhead=HEADS, nhid=12, nlayers=1, dropout=0.1).double().train()
    src, tgt = _tokens((N, L), 1), _tokens((N, L), 2)
    labels = _tokens((N, L), 3)

    def losses(logp, rows):  # the demo flattens its output to (N·T, vocab)
        return F.nll_loss(logp, labels[rows].reshape(-1), reduction="none").reshape(len(rows), -1).mean(1)

    seng = assert_exact(model, (src, tgt), losses=losses, seed=9, may_fall_back={"embedding"})
    attention = [r for r in seng.coverage() if r.type == "MultiheadAttention"]
    assert len(attention) == 3 and all(r.curvature for r in attention)


@pytest.mark.parametrize("amp_dtype, tol", [(torch.bfloat16, 0.04), (torch.float16, 0.006)])
def test_autocast_transformer_with_dropout_keeps_its_curvature(amp_dtype, tol):
    """Under CPU autocast the recompute runs in the call's autocast state, so it reproduces the call and the
    direction tracks the float32 run's."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 12, dropout=0.1, batch_first=True)
    model = Pooled(layer, lambda net, x: net(x, src_mask=causal()), True, name="net").train()
    x = seq(L).float()

    def direction(autocast):
        seng = SENG(model, damping=DAMPING, update_freq=1)
        model.zero_grad()
        torch.manual_seed(4)
        with torch.autocast("cpu", dtype=amp_dtype, enabled=autocast):
            logits = model(x)
        classification(logits.float(), torch.arange(N)).mean().backward()
        seng.step()
        seng.remove()
        assert seng.coverage().percent == 100.0, str(seng.coverage())
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    assert rel_err(direction(True), direction(False)) < tol
