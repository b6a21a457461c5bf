"""Models that change between steps or bend the one-call-per-layer picture: frozen parameters (also
freezing a weight but not its bias mid-training), weight sharing, layers skipped in a step, modules in
eval mode and in-place activations. float64 against the dense per-sample reference where one exists."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG
from tests.reliability._reference import layer_blocks, rel_err, seng_blocks

DAMPING = 0.25


def _data(n=9, d=6, classes=3, seed=1, shape=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *(shape or (d,)), generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (n,), generator=g)


def _trainable(model):
    return [k for k, p in model.named_parameters() if p.requires_grad]


def _step(model, seng, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    raw = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    seng.step()
    return raw


def _assert_matches_reference(model, x, y, got=None, names=None):
    names = names or _trainable(model)
    if got is None:
        got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    ref = seng_blocks(model, F.cross_entropy, x, y, DAMPING, layer_blocks(model, names))
    for k in names:
        assert rel_err(got[k], ref[k]) < 1e-10, k


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


# ------------------------------------------------------------------------------------- frozen
def test_layer_frozen_from_the_start_is_skipped_and_others_stay_exact():
    model = _mlp()
    model[2].requires_grad_(False)
    seng = SENG(model, damping=DAMPING, update_freq=1)
    x, y = _data()
    _step(model, seng, x, y)
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert model[2].weight.grad is None and model[2].bias.grad is None
    assert seng.layers["2"].curvature is None
    _assert_matches_reference(model, x, y, got)


def test_freezing_weight_but_not_bias_mid_training():
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=2)
    x0, y0 = _data(seed=1)
    _step(model, seng, x0, y0)                              # step 0: refresh with weight and bias
    assert seng.layers["2"].curvature.mask == (True, True)

    model[2].weight.requires_grad_(False)
    x1, y1 = _data(seed=2)
    raw = _step(model, seng, x1, y1)                        # step 1: between refreshes
    assert model[2].weight.grad is None
    # the stored curvature was for (weight, bias): it no longer fits, so the bias falls back
    assert torch.allclose(model[2].bias.grad, raw["2.bias"] / (1 + DAMPING), rtol=1e-15, atol=0)

    x2, y2 = _data(seed=3)
    _step(model, seng, x2, y2)                              # step 2: refresh with the bias alone
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert seng.layers["2"].curvature.mask == (False, True)
    assert "2.weight" not in got
    _assert_matches_reference(model, x2, y2, got)           # bias block = dense solve over the bias only

    model[2].weight.requires_grad_(True)                    # unfreeze: exact again after the next refresh
    _step(model, seng, *_data(seed=4))
    x4, y4 = _data(seed=5)
    _step(model, seng, x4, y4)
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert seng.layers["2"].curvature.mask == (True, True)
    _assert_matches_reference(model, x4, y4, got)


def test_freezing_a_whole_layer_mid_training_leaves_it_untouched():
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    _step(model, seng, *_data(seed=1))
    model[0].requires_grad_(False)
    x, y = _data(seed=2)
    _step(model, seng, x, y)
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert set(got) == {"2.weight", "2.bias", "4.weight", "4.bias"}
    _assert_matches_reference(model, x, y, got)


# ------------------------------------------------------------------------------ weight sharing
class SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h) + h)
        return self.head(h)


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 7, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.head(torch.tanh(self.conv(h)).flatten(1))


@pytest.mark.parametrize("route", ["auto", "explicit", "gram", "implicit"])
def test_layer_used_twice_sums_both_uses_per_sample(route):
    torch.manual_seed(0)
    model = SharedLinear().double()
    x, y = _data(d=5)
    seng = SENG(model, damping=DAMPING, update_freq=1, route=route, svd_rank=2)
    _step(model, seng, x, y)
    _assert_matches_reference(model, x, y)


@pytest.mark.parametrize("route", ["explicit", "gram", "implicit"])
def test_conv_used_twice_sums_both_uses_per_sample(route):
    torch.manual_seed(0)
    model = SharedConv().double()
    x, y = _data(shape=(3, 7), classes=4)
    seng = SENG(model, damping=DAMPING, update_freq=1, route=route, svd_rank=14)
    _step(model, seng, x, y)
    _assert_matches_reference(model, x, y)


# ------------------------------------------------------------------------------ unused layers
class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)
        self.branch = "a"

    def forward(self, x):
        return self.head(torch.tanh(getattr(self, self.branch)(x)))


def test_layer_not_used_in_a_refresh_step_keeps_its_old_curvature():
    torch.manual_seed(0)
    model = TwoBranch().double()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    model.branch = "b"
    _step(model, seng, *_data(seed=1))
    kept = seng.layers["b"].curvature
    kept_gram = kept.gram.clone()

    model.branch = "a"                      # refresh step in which "b" does not run
    x, y = _data(seed=2)
    _step(model, seng, x, y)
    assert model.b.weight.grad is None and model.b.bias.grad is None
    assert seng.layers["b"].curvature is kept and torch.equal(kept.gram, kept_gram)
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    _assert_matches_reference(model, x, y, got, names=["a.weight", "a.bias", "head.weight", "head.bias"])


def test_layer_run_but_outside_the_loss_gets_no_curvature_and_no_error():
    torch.manual_seed(0)

    class AuxHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(6, 5)
            self.head = nn.Linear(5, 3)
            self.aux = nn.Linear(5, 2)

        def forward(self, x):
            h = torch.tanh(self.body(x))
            self.aux_out = self.aux(h)      # computed, never part of the loss
            return self.head(h)

    model = AuxHead().double()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    x, y = _data()
    _step(model, seng, x, y)
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert seng.layers["aux"].curvature is None and model.aux.weight.grad is None
    _assert_matches_reference(model, x, y, got, names=["body.weight", "body.bias", "head.weight", "head.bias"])
    _step(model, seng, x, y)                # the dangling capture does not disturb the next refresh
    _assert_matches_reference(model, x, y, names=["body.weight", "body.bias", "head.weight", "head.bias"])


# ---------------------------------------------------------------------------------- eval mode
def test_no_capture_under_no_grad_or_outside_refresh_steps():
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=2)
    with torch.no_grad():
        model(_data()[0])
    assert all(not layer._calls for layer in seng.layers.values())
    _step(model, seng, *_data())             # step 0 refreshes
    model(_data()[0]).sum().backward()       # step 1 does not: nothing kept
    assert all(not layer._calls for layer in seng.layers.values())


def test_linear_in_eval_mode_is_preconditioned_exactly():
    model = _mlp()
    model[2].eval()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    x, y = _data()
    _step(model, seng, x, y)
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    _assert_matches_reference(model, x, y, got)


def test_whole_model_in_eval_mode_is_preconditioned_exactly():
    model = _mlp().eval()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    x, y = _data()
    _step(model, seng, x, y)
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    _assert_matches_reference(model, x, y, got)


def test_batchnorm_in_eval_mode_uses_running_statistics():
    """A frozen-statistics BatchNorm (``bn.eval()``) with trainable affine parameters: samples are
    independent, so the per-sample reference applies; the normalisation must use the running stats."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 3 * 3, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    model[1].eval()
    x, y = _data(shape=(2, 5, 5))
    seng = SENG(model, damping=DAMPING, update_freq=1)
    _step(model, seng, x, y)
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert seng.layers["1"].curvature is not None
    _assert_matches_reference(model, x, y, got)


# ------------------------------------------------------------------------------ in-place ops
def _inplace_model(inplace):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.GroupNorm(2, 4), nn.ReLU(inplace=inplace),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("route", ["explicit", "gram"])
def test_inplace_relu_after_layers_matches_reference(route):
    x, y = _data(shape=(2, 4, 4))
    model = _inplace_model(inplace=True)
    seng = SENG(model, damping=DAMPING, update_freq=1, route=route)
    _step(model, seng, x, y)
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    plain = _inplace_model(inplace=False)
    seng_plain = SENG(plain, damping=DAMPING, update_freq=1, route=route)
    _step(plain, seng_plain, x, y)
    for k, p in plain.named_parameters():
        assert torch.equal(got[k], p.grad), k
    _assert_matches_reference(plain, x, y)


# ------------------------------------------------------------------- backward passes and graphs
class Block(nn.Module):
    def __init__(self, checkpointed=None):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)
        self.checkpointed = checkpointed

    def body(self, h):
        return torch.tanh(self.b(torch.tanh(self.a(h))))

    def forward(self, x):
        if self.checkpointed is None:
            return self.c(self.body(x))
        from torch.utils.checkpoint import checkpoint
        return self.c(checkpoint(self.body, x, use_reentrant=self.checkpointed))


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_matches_reference(reentrant):
    """With checkpointing the body's forward runs again inside backward; the capture must count it once."""
    torch.manual_seed(0)
    model = Block(checkpointed=reentrant).double()
    x, y = _data(d=5)
    seng = SENG(model, damping=DAMPING, update_freq=1)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x.requires_grad_(reentrant)), y).backward()
    seng.step()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.checkpointed = None
    _assert_matches_reference(model, x.detach(), y, got)


def test_two_backward_passes_through_one_forward_add_up():
    """``l1.backward(retain_graph=True); l2.backward()`` accumulates ``.grad`` of ``l1 + l2``; the curvature
    must be that of ``l1 + l2`` too (per-sample output gradients add), not of ``l2`` alone."""
    torch.manual_seed(0)
    model = Block().double()
    x, y = _data(d=5)

    def loss_fn(out, target):
        return F.cross_entropy(out, target) + 0.5 * out.square().mean()

    names = [k for k, _ in model.named_parameters()]
    ref = seng_blocks(model, loss_fn, x, y, DAMPING, layer_blocks(model, names))
    seng = SENG(model, damping=DAMPING, update_freq=1)
    out = model(x)
    F.cross_entropy(out, y).backward(retain_graph=True)
    (0.5 * out.square().mean()).backward()
    seng.step()
    for k, p in model.named_parameters():
        assert rel_err(p.grad, ref[k]) < 1e-10, k


def test_step_without_backward_changes_nothing():
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    model(_data()[0])                                       # forward on a refresh step, no backward
    seng.step()
    assert all(p.grad is None for p in model.parameters())
    assert all(layer.curvature is None for layer in seng.layers.values())
    _step(model, seng, *_data())                            # and the next real step is exact
    _assert_matches_reference(model, *_data())


def test_skipped_batch_forward_without_backward_or_step_does_not_leak_into_curvature():
    """A batch whose loss is dropped (e.g. ``training_step`` returning None in Lightning): its forward ran on
    a refresh step, no backward, no ``seng.step()``; the next batch's refresh is still exact."""
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    model(_data(seed=7)[0])
    x, y = _data(seed=8)
    _step(model, seng, x, y)
    _assert_matches_reference(model, x, y)


def test_channels_last_conv_matches_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 2, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double().to(memory_format=torch.channels_last)
    x, y = _data(shape=(3, 4, 4))
    x = x.contiguous(memory_format=torch.channels_last)
    seng = SENG(model, damping=DAMPING, update_freq=1, route="gram")
    _step(model, seng, x, y)
    _assert_matches_reference(model, x, y)


# ------------------------------------------------------------------- modules added after attach
def test_module_replaced_after_attach_falls_back_and_warns(caplog):
    """A head swapped in after ``SENG(model)`` has no hooks; like any unsupported parameter it must get
    ``g / (1 + λ)`` (not the raw gradient), with one warning that says how to precondition it."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    model = _mlp()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    _step(model, seng, *_data())
    model[4] = nn.Linear(8, 3).double()
    for _ in range(2):
        raw = _step(model, seng, *_data(seed=2))
    for k in ("4.weight", "4.bias"):
        got = dict(model.named_parameters())[k].grad
        assert torch.allclose(got, raw[k] / (1 + DAMPING), rtol=1e-15, atol=0), k
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and "4.weight" in messages[0], messages


# ------------------------------------------------------------------- fallbacks are named
# Where SENG cannot build a layer's per-sample gradient (a parameter shared with a module it has no route
# for, a layer fed flattened rows), the layers around it stay exact and SENG says so at WARNING level.


class TiedHead(nn.Module):
    """An embedding tied to the output layer, as in language models."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.fc(self.emb(tokens).mean(1))))


class SharedBiasHead(TiedHead):
    """Hugging Face BERT's pattern: the head's bias is registered both on the model and on the decoder."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-0.5, 0.5, 7, dtype=self.emb.weight.dtype))
        self.head.bias = self.bias


class FlatTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        n, t, d = x.shape
        return self.head(torch.tanh(self.fc(x.reshape(n * t, d))).reshape(n, t, -1).mean(1))


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("lightning_seng")]


def test_tied_weights_are_exact_over_both_uses():
    torch.manual_seed(0)
    model = TiedHead().double()
    x, y = torch.randint(0, 7, (6, 3)), torch.randint(0, 7, (6,))
    seng = SENG(model, damping=DAMPING, update_freq=1)
    _step(model, seng, x, y)
    assert seng.layers["emb"].kind == "tied"
    _assert_matches_reference(model, x, y)  # the reference's per-sample gradient of emb.weight sums both uses


def test_tied_weights_need_no_warning(caplog):
    caplog.set_level(logging.INFO, logger="lightning_seng")
    seng = SENG(TiedHead().double(), damping=DAMPING)
    assert _warnings(caplog) == []
    row = next(r for r in seng.coverage() if r.module == "emb")
    assert row.curvature and row.parameters == 35 and "'head'" in row.note


def test_bias_registered_outside_the_tied_modules_falls_back_with_one_warning(caplog):
    caplog.set_level(logging.INFO, logger="lightning_seng")
    torch.manual_seed(0)
    model = SharedBiasHead().double()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    messages = _warnings(caplog)
    assert len(messages) == 1 and "'head'" in messages[0] and "shared with" in messages[0], messages
    x, y = torch.randint(0, 7, (6, 3)), torch.randint(0, 7, (6,))
    raw = _step(model, seng, x, y)
    assert torch.allclose(model.bias.grad, raw["bias"] / (1 + DAMPING), rtol=1e-15, atol=0)
    _assert_matches_reference(model, x, y, names=["emb.weight", "fc.weight", "fc.bias"])


def test_flattened_token_rows_keep_other_layers_exact():
    torch.manual_seed(0)
    model = FlatTokens().double()
    x, y = _data(n=6, shape=(3, 4))
    seng = SENG(model, damping=DAMPING, update_freq=1)
    _step(model, seng, x, y)
    _assert_matches_reference(model, x, y, names=["head.weight", "head.bias"])


def test_flattened_token_rows_fall_back_with_one_warning(caplog):
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    torch.manual_seed(0)
    model = FlatTokens().double()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    for seed in range(3):
        _step(model, seng, *_data(n=6, shape=(3, 4), seed=seed))
    messages = _warnings(caplog)
    assert len(messages) == 1 and "'fc'" in messages[0] and "(18, 4)" in messages[0], messages
    assert seng.layers["fc"].curvature is None and seng.layers["head"].curvature is not None
    assert {r.module: r.curvature for r in seng.coverage()} == {"fc": False, "head": True}


# ------------------------------------------------------------------- lazy modules
def test_lazy_modules_attached_before_materialisation_match_reference():
    """``SENG(model)`` before the first forward of ``LazyLinear``/``LazyConv2d`` (uninitialised parameters):
    materialisation keeps the Parameter objects, so the layers are preconditioned exactly afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyConv2d(3, 2), nn.Tanh(), nn.Flatten(), nn.LazyLinear(6), nn.Tanh(),
                          nn.LazyLinear(3)).double()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    assert set(seng.layers) == {"0", "3", "5"}
    x, y = _data(shape=(2, 4, 4))
    _step(model, seng, x, y)
    assert all(layer.curvature is not None for layer in seng.layers.values())
    _assert_matches_reference(model, x, y)
