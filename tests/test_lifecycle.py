"""SENG's lifecycle: one SENG per model, nothing after ``remove()``, hooks that survive pickling, deep copies and
``torch.compile`` without feeding the wrong SENG, captured calls held only while a gradient can still reach them,
parameters replaced after attach, and states that must fit the model they are loaded into. float64, directions
against the dense per-sample reference."""

import copy
import gc
import io
import logging
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG
from lightning_seng.layers.base import Call
from tests.reliability._reference import layer_blocks, rel_err, seng_blocks

DAMPING = 0.25


def _mlp(hidden=8, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, 8), nn.Tanh(),
                         nn.Linear(8, 3)).double()


def _data(n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _step(model, seng, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    raw = {k: p.grad.clone() for k, p in model.named_parameters()}
    seng.step()
    return raw


def _exact(model, x, y, names=None, grads=None):
    """Whether ``.grad`` of ``names`` (default: all) is the dense per-layer SENG direction to 1e-10 (``g``: the
    batch gradient, or ``grads``)."""
    names = names or [k for k, p in model.named_parameters() if p.requires_grad]
    got = {k: p.grad.clone() for k, p in model.named_parameters() if k in names}
    ref = seng_blocks(model, F.cross_entropy, x, y, DAMPING, layer_blocks(model, names), grads=grads)
    return all(rel_err(got[k], ref[k]) < 1e-10 for k in names)


def _live_calls(seng):
    return sum(len(layer._calls) for layer in seng.layers.values())


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("lightning_seng")]


# ------------------------------------------------------------------------------ one SENG per model
def test_second_seng_on_the_same_model_is_refused_naming_the_first():
    model = _mlp()
    first = SENG(model, damping=DAMPING)
    with pytest.raises(ValueError, match=r"already has a SENG attached.*SENG\(layers=3.*Sequential"):
        SENG(model, damping=DAMPING)
    assert len(model[0]._forward_hooks) == 1 and first.layers  # the first stays attached, alone


def test_seng_on_a_submodule_of_a_covered_model_is_refused():
    model = _mlp()
    keep = SENG(model, damping=DAMPING)
    with pytest.raises(ValueError, match="already has a SENG attached"):
        SENG(model[2], damping=DAMPING)
    assert keep.layers


def test_seng_on_the_parent_of_a_covered_submodule_is_refused_naming_it():
    model = _mlp()
    keep = SENG(model[2], damping=DAMPING)
    with pytest.raises(ValueError, match=r"its submodule '2' \(Linear\) already has a SENG attached"):
        SENG(model, damping=DAMPING)
    assert keep.layers


def test_after_remove_the_model_takes_a_new_seng_that_is_exact():
    model = _mlp()
    first = SENG(model, damping=DAMPING, update_freq=1)
    with pytest.raises(ValueError, match="already has a SENG attached"):
        SENG(model, damping=DAMPING, update_freq=1)
    first.remove()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    x, y = _data()
    _step(model, seng, x, y)
    assert _exact(model, x, y)


def test_a_seng_nothing_references_any_more_frees_the_model():
    model = _mlp()
    SENG(model, damping=DAMPING)
    seng = SENG(model, damping=DAMPING, update_freq=1)  # the first was dropped: collected, its hooks gone
    assert len(model[0]._forward_hooks) == 1
    x, y = _data()
    _step(model, seng, x, y)
    assert _exact(model, x, y)


# ------------------------------------------------------------------------------ after remove()
def test_step_after_remove_raises():
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    seng.remove()
    F.cross_entropy(model(_data()[0]), _data()[1]).backward()
    raw = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"SENG.step\(\) after SENG.remove\(\)"):
        seng.step()
    assert all(torch.equal(p.grad, r) for p, r in zip(model.parameters(), raw))


def test_observe_batch_and_adapt_damping_after_remove_raise():
    seng = SENG(_mlp(), damping=DAMPING)
    seng.remove()
    with pytest.raises(RuntimeError, match=r"observe_batch\(\) after SENG.remove\(\)"):
        seng.observe_batch((torch.zeros(3, 6),))
    with pytest.raises(RuntimeError, match=r"adapt_damping\(\) after SENG.remove\(\)"):
        seng.adapt_damping(1.0, 0.5)


def test_remove_twice_is_harmless():
    seng = SENG(_mlp(), damping=DAMPING)
    seng.remove()
    seng.remove()
    assert seng.removed


# ------------------------------------------------------------------------------ pickling and copies
def test_torch_save_and_pickle_of_a_model_with_seng_attached_work():
    model = _mlp()
    seng = SENG(model, damping=DAMPING)
    _step(model, seng, *_data())
    out = model(_data(seed=2)[0])  # a forward in flight: captured calls, tensor hooks on its graph
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded[0].weight, model[0].weight)
    assert torch.equal(pickle.loads(pickle.dumps(model))(_data()[0]), model(_data()[0]))
    assert out.requires_grad


def test_a_loaded_pickled_model_has_no_live_seng_and_takes_a_new_one():
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    loaded = pickle.loads(pickle.dumps(model))
    from lightning_seng.hooks import InertHook

    hooks = [h for m in loaded.modules() for h in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())]
    assert hooks and all(isinstance(h, InertHook) for h in hooks)
    x, y = _data()
    loaded(x)
    assert _live_calls(seng) == 0
    fresh = SENG(loaded, damping=DAMPING, update_freq=1)
    _step(loaded, fresh, x, y)
    assert _exact(loaded, x, y)


def test_training_a_deepcopy_feeds_nothing_to_the_original_seng():
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    twin = copy.deepcopy(model)
    for seed in (3, 4):
        xt, yt = _data(seed=seed)
        F.cross_entropy(twin(xt), yt).backward()
    assert _live_calls(seng) == 0 and seng._sources.current() is None and seng._probe_inputs is None
    x, y = _data()
    _step(model, seng, x, y)
    assert _exact(model, x, y)


def test_a_deepcopy_of_the_model_takes_its_own_seng_and_both_stay_exact():
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    twin = copy.deepcopy(model)
    twin_seng = SENG(twin, damping=DAMPING, update_freq=1)
    x, y = _data(seed=1)
    xt, yt = _data(seed=2)
    for m, (a, b) in ((model, (x, y)), (twin, (xt, yt))):  # both backward before either steps
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(a), b).backward()
    seng.step()
    twin_seng.step()
    assert _exact(model, x, y) and _exact(twin, xt, yt)


def test_deepcopy_copy_and_pickle_of_seng_itself_are_refused():
    seng = SENG(_mlp(), damping=DAMPING)
    with pytest.raises(TypeError, match="cannot be deep-copied"):
        copy.deepcopy(seng)
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.copy(seng)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(seng)


def test_compiled_submodule_with_seng_adds_no_dynamo_recompilation():
    """Ten equal Linear layers in a compiled submodule, refresh and non-refresh steps: the hooks are never traced
    (``lightning_seng/hooks.py``), so Dynamo recompiles nothing it would not recompile without SENG."""
    import torch._dynamo

    def recompilations(with_seng):
        torch._dynamo.reset()
        torch.manual_seed(0)
        body = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(8, 8), nn.Tanh())])
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), body)
        seng = SENG(model, damping=DAMPING, update_freq=2) if with_seng else None
        model[2] = torch.compile(body, backend="eager")
        reasons = []
        with torch._dynamo.config.patch(recompile_limit=100):
            torch._logging.set_logs(recompiles=True)
            logger = logging.getLogger("torch._dynamo.guards.__recompiles")
            handler = logging.Handler()
            handler.emit = lambda record: reasons.append(record.getMessage())
            logger.addHandler(handler)
            try:
                for step in range(6):
                    g = torch.Generator().manual_seed(step)
                    x, y = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
                    model.zero_grad()
                    F.cross_entropy(model(x)[:, :3], y).backward()
                    if seng is not None:
                        seng.step()
            finally:
                logger.removeHandler(handler)
                torch._logging.set_logs()
        if seng is not None:  # the compiled layers were captured: they have curvature
            assert all(layer.curvature is not None for layer in seng.layers.values())
        torch._dynamo.reset()
        return reasons

    assert recompilations(False) == []
    assert recompilations(True) == []


# ------------------------------------------------------------------------------ captured calls are bounded
def test_forwards_without_backward_on_a_refresh_step_hold_no_calls_and_the_step_stays_exact():
    def calls_anywhere():
        return sum(type(o) is Call for o in gc.get_objects())

    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    before = calls_anywhere()
    for seed in range(400):  # a metric computed with grad enabled: no backward, graphs dropped
        F.cross_entropy(model(_data(seed=seed)[0]), _data(seed=seed)[1]).item()
    assert _live_calls(seng) == 0
    assert calls_anywhere() == before
    x, y = _data(seed=1000)
    _step(model, seng, x, y)
    assert _exact(model, x, y)


def test_a_forward_whose_graph_is_still_alive_keeps_its_call_until_dropped():
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    out = model(_data()[0])
    assert _live_calls(seng) == 3
    del out
    assert _live_calls(seng) == 0



def test_a_dropped_forward_before_micro_batches_does_not_stop_the_last_one_winning():
    """A metric forward with grad enabled, then two micro-batches: the curvature is the last micro-batch's
    (a call still held from the metric forward used to keep the first micro-batch's calls alongside)."""
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    model(_data(seed=4)[0]).sum().item()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(_data(seed=5)[0]), _data(seed=5)[1]).backward()
    x, y = _data(seed=6)
    F.cross_entropy(model(x), y).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    seng.step()
    assert _exact(model, x, y, grads=grads)


class _Gain(nn.Module):
    """A module with its own parameter and no dedicated route: the generic route."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return torch.tanh(x * self.gain)


class _TokenModel(nn.Module):
    """Embedding tied to the head, self-attention and a generic module: the layers that override capture."""

    def __init__(self, vocab=7, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mha = nn.MultiheadAttention(d, 2, batch_first=True)
        self.gain = _Gain(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = self.emb(tokens)
        h = self.gain(self.mha(h, h, h, need_weights=False)[0] + h)
        return self.head(h.mean(1))


def _token_data(seed, n=5, t=4, vocab=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g), torch.randint(0, vocab, (n,), generator=g)


def test_attention_embedding_and_generic_layers_hold_no_calls_of_dropped_forwards():
    torch.manual_seed(0)
    model = _TokenModel().double()
    twin = copy.deepcopy(model)
    seng = SENG(model, damping=DAMPING, update_freq=1)
    twin_seng = SENG(twin, damping=DAMPING, update_freq=1)
    assert {type(layer).__name__ for layer in seng.layers.values()} >= {"EmbeddingLayer", "AttentionLayer",
                                                                         "GenericLayer"}
    for seed in range(50):
        model(_token_data(seed)[0]).sum().item()
    assert _live_calls(seng) == 0
    x, y = _token_data(100)
    for m, s in ((model, seng), (twin, twin_seng)):
        F.cross_entropy(m(x), y).backward()
        s.step()
    for (k, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), k


# ------------------------------------------------------------------------------ replaced parameters
def test_replaced_weight_gets_g_over_one_plus_damping_and_the_bias_stays_exact(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=2)
    _step(model, seng, *_data(seed=1))                       # step 0: refresh over weight and bias
    model[2].weight = nn.Parameter(torch.randn(8, 8, dtype=torch.float64))
    raw = _step(model, seng, *_data(seed=2))                 # step 1: between refreshes
    assert torch.allclose(model[2].weight.grad, raw["2.weight"] / (1 + DAMPING), rtol=1e-15, atol=0)
    assert torch.allclose(model[2].bias.grad, raw["2.bias"] / (1 + DAMPING), rtol=1e-15, atol=0)
    x, y = _data(seed=3)
    raw = _step(model, seng, x, y)                           # step 2: refresh over the bias alone
    assert torch.allclose(model[2].weight.grad, raw["2.weight"] / (1 + DAMPING), rtol=1e-15, atol=0)
    assert _exact(model, x, y, names=[k for k, _ in model.named_parameters() if k != "2.weight"])
    messages = _warnings(caplog)
    assert any("replaced after SENG was attached get g / (1 + damping): '2.weight'" in m for m in messages)
    assert any("layer '2'" in m and "until its next curvature refresh" in m for m in messages)


def test_replaced_weight_of_a_tied_layer_falls_back_whole(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[2].weight = model[0].weight
    model[2].bias = model[0].bias
    seng = SENG(model, damping=DAMPING, update_freq=2)
    _step(model, seng, *_data(seed=1))
    model[2].weight = nn.Parameter(torch.randn(6, 6, dtype=torch.float64))
    for seed in (2, 3):  # between refreshes, then a refresh
        raw = _step(model, seng, *_data(seed=seed))
        for k in ("0.weight", "0.bias", "2.weight"):
            assert torch.allclose(dict(model.named_parameters())[k].grad, raw[k] / (1 + DAMPING), rtol=1e-15,
                                  atol=0), (seed, k)
    assert any("no exact curvature for '0'" in m for m in _warnings(caplog))


def test_bias_added_after_attach_gets_g_over_one_plus_damping_and_the_weight_stays_exact():
    model = _mlp(bias=False)
    seng = SENG(model, damping=DAMPING, update_freq=1)
    _step(model, seng, *_data(seed=1))
    model[0].bias = nn.Parameter(torch.zeros(8, dtype=torch.float64))
    _step(model, seng, *_data(seed=2))                       # the weight's curvature is rebuilt without the bias
    x, y = _data(seed=3)
    raw = _step(model, seng, x, y)
    assert torch.allclose(model[0].bias.grad, raw["0.bias"] / (1 + DAMPING), rtol=1e-15, atol=0)
    assert _exact(model, x, y, names=[k for k, _ in model.named_parameters() if k != "0.bias"])


# ------------------------------------------------------------------------------ states that must fit
def _trained_state(model):
    seng = SENG(model, damping=DAMPING, update_freq=1)
    _step(model, seng, *_data())
    state = seng.state_dict()
    seng.remove()
    return state


def test_state_from_a_layer_with_bias_into_one_without_is_refused():
    state = _trained_state(_mlp(bias=True))
    seng = SENG(_mlp(bias=False), damping=DAMPING)
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\).*\[\(8, 6\), \(8,\)\].*\[\(8, 6\), None\]"):
        seng.load_state_dict(state)


def test_state_from_hidden_size_8_into_10_is_refused():
    state = _trained_state(_mlp(hidden=8))
    seng = SENG(_mlp(hidden=10), damping=DAMPING)
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\).*\[\(8, 6\), \(8,\)\].*\[\(10, 6\), \(10,\)\]"):
        seng.load_state_dict(state)


def test_state_saved_without_shapes_is_checked_on_its_curvature_mask():
    state = _trained_state(_mlp(bias=True))
    del state["shapes"]  # as saved before the shapes were recorded
    seng = SENG(_mlp(bias=False), damping=DAMPING)
    with pytest.raises(ValueError, match=r"layer '0' \(Linear\).*\[True, True\]"):
        seng.load_state_dict(state)
    matching = SENG(_mlp(bias=True), damping=DAMPING)
    matching.load_state_dict(state)
    assert matching.layers["0"].curvature is not None
