"""The batch size cross-checked across its sources and each layer's sample axis found by the structural probe
(:mod:`lightning_seng.axes`), against the dense per-sample reference (float64, 1e-10).

Each case is one the size rule alone got wrong or gave up on: an input whose first tensor is not the batch,
a sequence-first model read on the wrong axis, and a batch size equal to a sequence length or a spatial size.
The reference (``tests/zoo/_check.py``) takes each sample's loss gradient by autograd and solves every block
densely; a layer SENG leaves without curvature must get ``g / (1 + λ)``.
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG
from lightning_seng.axes import BatchSources, ProbedAxes, probe_size
from tests.modules import RMSNorm
from tests.zoo._check import check

TOL = 1e-10
CLASSES = 3


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _covered(seng):
    return {name for name, layer in seng.layers.items() if layer.curvature is not None}


def _labels(n, seed=5):
    return torch.randint(0, CLASSES, (n,), generator=torch.Generator().manual_seed(seed))


def _classify(model, inputs, labels):
    """Per-sample losses of a model returning ``(N, CLASSES)`` logits."""
    return lambda: F.cross_entropy(model(*inputs), labels, reduction="none")


def _skipped(caplog, seng, *names):
    """No layer got curvature from the refresh, and one WARNING said so, naming ``names``."""
    assert not _covered(seng)
    messages = [m for m in _warnings(caplog) if "batch size of this refresh step is not confirmed" in m]
    assert len(messages) == 1, _warnings(caplog)
    for name in names:
        assert name in messages[0], (name, messages[0])


# --------------------------------------------------------------------------------------------- the parts
def test_probe_size_is_a_prime_above_twice_every_dimension():
    size = probe_size([torch.empty(3, 64), torch.empty(17)])
    assert size == 131


def test_sources_that_agree_give_the_batch_size():
    sources = BatchSources()
    sources.new_batch(4, "a")
    sources.new_forward(4, "b")
    sources.note("'enc'", 4, "c")
    assert sources.take() == (4, None)
    assert sources.take() == (None, None)


def test_sources_that_disagree_name_each_value():
    sources = BatchSources()
    sources.new_forward(6, "batch_axis=0")
    sources.note("'rnn'", 4, "axis 1")
    n, why = sources.take()
    assert n is None and "batch_axis=0): 6" in why and "'rnn' (axis 1): 4" in why


def test_probed_shapes_map_back_to_the_batch():
    found = ProbedAxes()
    found.add((5, 131, 8), 131, 4)
    found.add((5, 5), 131, 4)
    found.add((131, 131), 131, 4)
    found.add((5 * 131, 8), 131, 4)
    found.add((0, 131), 131, 4)
    assert found.shapes == {(5, 4, 8): 1, (5, 5): None, (4, 4): "ambiguous", (20, 8): "merged", (0, 4): 1}


# --------------------------------------------------------------------------------------- a mask as input
class Masked(nn.Module):
    """Attention-like mixing over positions with an additive ``(T, T)`` mask: ``forward(mask, x)`` or
    ``forward(x, mask=mask)``."""

    def __init__(self, d=6, mask_first=True):
        super().__init__()
        self.mask_first = mask_first
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, first, second=None, mask=None):
        mask, x = (first, second) if self.mask_first else (mask, first)
        h = self.proj(x)  # (N, T, d)
        mixed = torch.softmax(h @ h.transpose(1, 2) + mask, dim=-1) @ h
        return self.head(self.norm(mixed).mean(1))


def _mask(t):
    return torch.triu(torch.full((t, t), -1e4, dtype=torch.float64), diagonal=1)


@pytest.mark.parametrize("t, n", [(5, 4), (4, 4)], ids=["sequence-5-batch-4", "sequence-equal-to-the-batch"])
def test_mask_as_first_input_is_announced_not_wrong(t, n, caplog):
    """``forward(mask (T, T), x (N, T, d))`` reads ``N = T`` from the mask; resizing it breaks the forward
    while the unresized forward runs, so the batch size is contradicted: no layer gets curvature, one WARNING."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = Masked().double()
    x = torch.randn(n, t, 6, dtype=torch.float64)
    seng = check(model, _classify(model, (_mask(t), x), _labels(n)), n, tol=TOL)
    _skipped(caplog, seng, "batch_axis", f"{(t, t)}")


def test_mask_as_keyword_at_batch_equal_to_the_sequence_is_exact(caplog):
    """``forward(x, mask=mask)`` with ``T == N``: resizing ``x`` and the mask fails, ``x`` alone is the batch."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = Masked(mask_first=False).double()
    x = torch.randn(4, 4, 6, dtype=torch.float64)
    labels = _labels(4)
    seng = check(model, lambda: F.cross_entropy(model(x, mask=_mask(4)), labels, reduction="none"), 4, tol=TOL)
    assert _covered(seng) == set(seng.layers) and not _warnings(caplog)


# ------------------------------------------------------------------------------------- sequence-first
class SeqFirstMLP(nn.Module):
    """Linear and LayerNorm on ``(T, N, d)``, mean over the positions, a Linear head on ``(N, d)``."""

    def __init__(self, d=5):
        super().__init__()
        self.proj = nn.Linear(d, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.proj(x))).mean(0))


def test_sequence_first_input_with_the_default_batch_axis_is_announced_not_wrong(caplog):
    """``batch_axis=0`` reads ``T``: the probe's resized axis never reaches the ``(N, C)`` output."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = SeqFirstMLP().double()
    x = torch.randn(4, 7, 5, dtype=torch.float64)
    seng = check(model, _classify(model, (x,), _labels(7)), 7, tol=TOL)
    _skipped(caplog, seng, "batch_axis", "'head'")


def _encoder(batch_first):
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


class Encoded(nn.Module):
    """A torch TransformerEncoder, mean-pooled over positions, then a Linear head."""

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.enc = _encoder(batch_first)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.head(self.enc(x).mean(1 if self.batch_first else 0))


def test_sequence_first_transformer_encoder_with_batch_axis_one_is_exact_at_batch_equal_to_the_sequence(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = Encoded(batch_first=False).double()
    x = torch.randn(4, 4, 8, dtype=torch.float64)  # (T, N, E), T == N
    seng = check(model, _classify(model, (x,), _labels(4)), 4, tol=TOL, batch_axis=1)
    assert _covered(seng) == set(seng.layers) and not _warnings(caplog)


def test_sequence_first_transformer_encoder_with_the_default_batch_axis_is_announced(caplog):
    """The model's input on axis 0 says ``T = 6``, the encoder's declared axis 1 says ``N = 4``."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = Encoded(batch_first=False).double()
    x = torch.randn(6, 4, 8, dtype=torch.float64)
    seng = check(model, _classify(model, (x,), _labels(4)), 4, tol=TOL)
    _skipped(caplog, seng, "batch_axis=0", "'enc' (TransformerEncoder, batch_first=False)", ": 6", ": 4")


def test_sequence_first_transformer_encoder_at_batch_equal_to_the_sequence_with_the_default_batch_axis_is_announced(
        caplog):
    """``T == N``: the sizes agree, but the probe finds the resized axis 0 off the encoder's declared axis 1."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = Encoded(batch_first=False).double()
    x = torch.randn(4, 4, 8, dtype=torch.float64)
    seng = check(model, _classify(model, (x,), _labels(4)), 4, tol=TOL)
    _skipped(caplog, seng, "'enc' (TransformerEncoder, batch_first=False)", "declared axis 1")


class Tagger(nn.Module):
    """Tokens ``(T, N)`` -> Embedding -> sequence-first GRU -> Linear head on ``(T, N, h)``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.rnn = nn.GRU(6, 5)
        self.head = nn.Linear(5, CLASSES)

    def forward(self, tokens):
        return self.head(self.rnn(self.emb(tokens))[0])


def _tagging(model, tokens, tags):
    def losses():
        per_token = F.cross_entropy(model(tokens).reshape(-1, CLASSES), tags.reshape(-1), reduction="none")
        return per_token.reshape(tags.shape).mean(0)  # (N,): each sample's mean over its positions
    return losses


def _tokens(t, n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (t, n), generator=g), torch.randint(0, CLASSES, (t, n), generator=g)


def test_sequence_first_gru_tagger_with_the_default_batch_axis_is_announced(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = Tagger().double()
    tokens, tags = _tokens(6, 4)
    seng = check(model, _tagging(model, tokens, tags), 4, tol=TOL)
    _skipped(caplog, seng, "batch_axis=0", "'rnn' (GRU, batch_first=False)")


def test_sequence_first_gru_tagger_with_batch_axis_one_is_exact_at_batch_equal_to_the_sequence(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = Tagger().double()
    tokens, tags = _tokens(4, 4)
    seng = check(model, _tagging(model, tokens, tags), 4, tol=TOL, batch_axis=1)
    assert _covered(seng) == set(seng.layers) and not _warnings(caplog)


# ------------------------------------------------------------------------------ batch = context / space
def test_transformer_layer_at_batch_equal_to_the_context_is_exact(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = Encoded(batch_first=True).double()
    x = torch.randn(8, 8, 8, dtype=torch.float64)
    seng = check(model, _classify(model, (x,), _labels(8)), 8, tol=TOL)
    assert _covered(seng) == set(seng.layers) and not _warnings(caplog)
    assert {"enc.layers.0.linear1", "enc.layers.0.norm1", "enc.layers.1.norm2"} <= _covered(seng)


class LlamaBlock(nn.Module):
    """A LLaMA-style decoder: token embedding, RMSNorm (generic route), causal attention by
    ``scaled_dot_product_attention`` on separate q/k/v Linear maps, a SwiGLU MLP, tied-free LM head."""

    def __init__(self, vocab=13, d=8, heads=2, hidden=12):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.norm1, self.norm2, self.norm_out = RMSNorm(d), RMSNorm(d), nn.RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        h = self.emb(tokens)
        n, t, d = h.shape
        a = self.norm1(h)
        q, k, v = (m(a).reshape(n, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        h = h + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, d))
        b = self.norm2(h)
        h = h + self.down(F.silu(self.gate(b)) * self.up(b))
        return self.lm_head(self.norm_out(h))


def test_llama_style_block_at_batch_equal_to_the_context_is_exact(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = LlamaBlock().double()
    tokens = torch.randint(0, 13, (8, 8), generator=torch.Generator().manual_seed(1))

    def losses():
        logits = model(tokens)
        per_token = F.cross_entropy(logits[:, :-1].reshape(-1, 13), tokens[:, 1:].reshape(-1), reduction="none")
        return per_token.reshape(8, -1).mean(1)
    seng = check(model, losses, 8, tol=TOL)
    assert _covered(seng) == set(seng.layers) and not _warnings(caplog)


class ConvNeXtStage(nn.Module):
    """A ConvNeXt block on a 4×4 map: depthwise 3×3 conv, channels-last LayerNorm and Linear MLP, residual."""

    def __init__(self, c=6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.head = nn.Linear(c, CLASSES)

    def forward(self, x):
        h = self.stem(x)  # (N, C, 4, 4)
        y = self.norm(self.dw(h).permute(0, 2, 3, 1))  # (N, 4, 4, C)
        h = h + self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return self.head(h.mean((2, 3)))


def test_convnext_stage_at_batch_equal_to_the_spatial_size_is_exact(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = ConvNeXtStage().double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    seng = check(model, _classify(model, (x,), _labels(4)), 4, tol=TOL)
    assert _covered(seng) == set(seng.layers) and not _warnings(caplog)


# ----------------------------------------------------------------------------------- the Lightning batch
def test_a_batch_told_to_seng_that_disagrees_with_the_model_input_is_announced(caplog):
    """``observe_batch`` (the Lightning callback's call) with a batch of 5 while the model runs on 4."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = SeqFirstMLP().double()
    x = torch.randn(4, 3, 5, dtype=torch.float64).transpose(0, 1)  # (T, N) = (3, 4), read with batch_axis=1
    seng = SENG(model, damping=0.3, update_freq=1, batch_axis=1)
    seng.observe_batch((torch.zeros(2, 5),), {})
    F.cross_entropy(model(x), _labels(4)).backward()
    seng.step()
    _skipped(caplog, seng, "observe_batch", ": 5", ": 4")
    assert seng.stats["skipped_refreshes"] == 1


def test_a_skipped_refresh_keeps_the_last_good_curvature(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = SeqFirstMLP().double()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    seng = SENG(model, damping=0.3, update_freq=1, batch_axis=1)
    F.cross_entropy(model(x), _labels(4)).backward()
    seng.step()
    kept = {name: layer.curvature for name, layer in seng.layers.items()}
    assert all(c is not None for c in kept.values())
    model.zero_grad()
    seng.observe_batch((torch.zeros(2, 5),), {})
    F.cross_entropy(model(x), _labels(4)).backward()
    seng.step()
    assert all(layer.curvature is kept[name] for name, layer in seng.layers.items())
    assert any("not confirmed" in m for m in _warnings(caplog))


# ------------------------------------------------------------------------------------------- the probe
class NormedConv(nn.Module):
    """BatchNorm (running statistics, batch statistics in training), dropout and a plain-attribute table."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(4, CLASSES)
        self.table = torch.linspace(0.5, 1.5, 4, dtype=torch.float64)  # neither parameter nor buffer

    def forward(self, x):
        return self.head(self.drop(self.bn(self.conv(x)).mean((2, 3)) * self.table))


def test_the_probe_changes_no_real_state_and_captures_nothing():
    """Running statistics, the random state and the layers' captured calls are those of the real forward alone."""
    torch.manual_seed(0)
    model = NormedConv().double()
    x, y = torch.randn(4, 2, 4, 4, dtype=torch.float64), _labels(4)
    seng = SENG(model, damping=0.3, update_freq=1)
    probed, calls = [], []
    run = seng._probe.run

    def probe(*args):  # the captured calls right after the probe's fake forward, before the refresh takes them
        probed.append(run(*args))
        calls.append({name: len(layer._calls) for name, layer in seng.layers.items()})
        return probed[-1]
    seng._probe.run = probe
    F.cross_entropy(model(x), y).backward()
    stats = [t.clone() for t in (model.bn.running_mean, model.bn.running_var, model.bn.num_batches_tracked)]
    rng = torch.get_rng_state()
    seng.step()
    assert len(probed) == 1 and not isinstance(probed[0], str), probed
    assert probed[0].axes[id(model.conv)].shapes[(4, 2, 4, 4)] == 0
    for before, after in zip(stats, (model.bn.running_mean, model.bn.running_var, model.bn.num_batches_tracked)):
        assert torch.equal(before, after)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert calls == [{name: 1 for name in seng.layers}]  # the real forward's call each, none from the probe


def test_the_probe_runs_once_per_input_shape():
    torch.manual_seed(0)
    model = SeqFirstMLP().double()
    seng = SENG(model, damping=0.3, update_freq=1, batch_axis=1)
    runs = []
    forward = seng._probe._forward
    seng._probe._forward = lambda *a: runs.append(1) or forward(*a)
    for t in (3, 3, 5, 5):
        model.zero_grad()
        F.cross_entropy(model(torch.randn(t, 4, 5, dtype=torch.float64)), _labels(4)).backward()
        seng.step()
    assert len(runs) == 2 and len(_covered(seng)) == 3


def test_a_model_the_probe_cannot_run_is_not_probed_again():
    """Data-dependent control flow fails the fake forward whatever the shapes: tried once, then the size rule."""
    torch.manual_seed(0)
    model = SeqFirstMLP().double()
    model.forward = lambda x: SeqFirstMLP.forward(model, x if bool(x.sum() > -1e9) else -x)
    seng = SENG(model, damping=0.3, update_freq=1, batch_axis=1)
    runs = []
    forward = seng._probe._forward
    seng._probe._forward = lambda *a: runs.append(1) or forward(*a)
    for t in (3, 5):
        model.zero_grad()
        F.cross_entropy(model(torch.randn(t, 4, 5, dtype=torch.float64)), _labels(4)).backward()
        seng.step()
    assert len(runs) == 2 and len(_covered(seng)) == 3  # the plan and the unresized forward, once
