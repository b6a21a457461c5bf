"""The generic route (modules whose forward SENG has no dedicated route for) against a dense reference built
from per-sample gradients by a loop over the samples (one forward and backward per sample; float64, 1e-10)."""

import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, weight_norm

from lightning_seng import SENG, sketch
from lightning_seng.layers import GenericLayer, generic
from tests.layers._seng_run import DAMPING, seng_direction
from tests.modules import Conv1D, RMSNorm, Scale
from tests.reference import dense_direction, rel_err

D = torch.float64


# ----------------------------------------------------------------------------- modules
class LayerNorm2d(nn.LayerNorm):
    """A LayerNorm over the channels of an NCHW tensor (as in ConvNeXt): it permutes inside ``forward``."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class BatchNormAct2d(nn.BatchNorm2d):
    """A BatchNorm fused with its activation (as timm's ``BatchNormAct2d``)."""

    def forward(self, x):
        return F.relu(super().forward(x))


class NoisyScale(Scale):
    def forward(self, x):
        return F.dropout(x * self.gain, 0.3, self.training)


class Gate(nn.Module):
    """Keyword arguments, a non-tensor argument, an input shared by all samples and a tuple output."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) * 0.4)

    def forward(self, x, *, bias, power=2):
        h = x @ self.weight + bias
        return h.tanh() ** power, h.sigmoid()


class SeqFirstLinear(nn.Linear):
    """A Linear whose class overrides ``forward``: no dedicated route, so the generic one."""

    def forward(self, x):
        return super().forward(x) * 1.5


# ----------------------------------------------------------------------------- models
class Tokens(nn.Module):
    """Raw parameters read in the owner's own forward: a positional table and a gain."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.pos = nn.Parameter(torch.randn(3, 6) * 0.3)
        self.scale = nn.Parameter(torch.linspace(0.8, 1.2, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head((torch.tanh(self.proj(x) + self.pos) * self.scale).mean(1))


class Recurrent(nn.Module):
    def __init__(self, cls, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cls(4, 5, batch_first=batch_first)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        out = self.rnn(x)[0]
        return self.head(out[:, -1] if self.batch_first else out[-1])


class SeqFirstHead(nn.Module):
    """Inputs ``(T, N, d)``: the sample axis of every layer is 1."""

    def __init__(self):
        super().__init__()
        self.proj = SeqFirstLinear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)).mean(0))


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.gate = Gate(4)
        self.bias = torch.linspace(-1, 1, 4, dtype=D)  # a plain tensor: shared by the samples
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        a, _ = self.gate(torch.tanh(self.fc(x)), bias=self.bias, power=3)  # the second output goes unused
        return self.head(a)


class Twice(nn.Module):
    """One generic module called twice in a forward: its per-sample gradients add up over the calls."""

    def __init__(self):
        super().__init__()
        self.norm = RMSNorm(5)
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.fc(self.norm(x)))))


class Shift(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.shift = nn.Parameter(torch.linspace(-1, 1, d))

    def forward(self, x):
        return x + self.shift


class ShiftedInPlace(nn.Module):
    """The input of ``shift`` is changed in place after its forward (legal: ``+`` keeps no input for backward)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.shift = Shift(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        out = self.shift(h)
        h.mul_(2.0)
        return self.head(torch.tanh(out + h))


class Block(nn.Module):
    """A block with its own gain around a child BatchNorm2d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 3)[:, None, None])

    def forward(self, x):
        return self.gamma * torch.tanh(self.bn(self.conv(x)))


class UsedOutside(nn.Module):
    """``inner.offset`` is read by the parent, not by ``inner``'s forward."""

    def __init__(self):
        super().__init__()
        self.inner = Scale(5)
        self.inner.offset = nn.Parameter(torch.linspace(-1, 1, 5))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x) + self.inner.offset))


def _mlp_with(*middle, d_in=5, d_mid=7):
    return nn.Sequential(nn.Linear(d_in, d_mid), *middle, nn.Tanh(), nn.Linear(d_mid, 3))


# ----------------------------------------------------------------------------- reference
def loop_reference(model, x, y, batch_axis=0, reduction="mean", damping=DAMPING, rows=None, grads=None):
    """SENG's block-diagonal direction, densely: per module, ``(UᵀU + λI)^{-1} g`` over its own parameters,
    ``U`` rows ``∇ℓ_n/√N`` from one forward and backward per sample (samples ``rows`` only, if given)."""
    params = dict(model.named_parameters())
    n = x.shape[batch_axis]
    rows = range(n) if rows is None else rows
    per_sample = {k: [] for k in params}
    for i in rows:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.narrow(batch_axis, int(i), 1)), y[int(i):int(i) + 1]).backward()
        for k, p in params.items():
            per_sample[k].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    if grads is None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        grads = {k: p.grad.clone() for k, p in params.items()}
    model.zero_grad(set_to_none=True)
    blocks = {}
    for k in params:  # a parametrization's parameters are in the block of the module it parametrizes
        owner = ("." + k).split(".parametrizations.")[0][1:] if "parametrizations." in k else k.rpartition(".")[0]
        blocks.setdefault(owner, []).append(k)
    out = {}
    for block in blocks.values():
        out.update(dense_direction({k: torch.stack(per_sample[k]) for k in block}, {k: grads[k] for k in block},
                                   damping, len(rows) ** -0.5))
    return out


def _assert_exact(model, x, y, reduction="mean", generic=None, **kwargs):
    ref = loop_reference(model, x, y, kwargs.get("batch_axis", 0), reduction)
    got, seng = seng_direction(model, x, y, reduction, **kwargs)
    for k in ref:
        assert rel_err(got[k], ref[k]) < 1e-10, (k, rel_err(got[k], ref[k]))
    if generic is not None:
        assert {name for name, layer in seng.layers.items() if isinstance(layer, GenericLayer)} == generic
    assert all(layer.curvature is not None for layer in seng.layers.values())
    return seng


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("lightning_seng")]


def _assert_falls_back(model, x, y, module, reason, caplog, **kwargs):
    """``module`` gets ``g / (1 + λ)``, said in one WARNING with ``reason``; the rest stays exact."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    seng = SENG(model, damping=DAMPING, update_freq=1, **kwargs)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    raw = {k: p.grad.clone() for k, p in model.named_parameters()}
    seng.step()
    for k, p in model.named_parameters():
        if k.rpartition(".")[0] == module:
            assert torch.allclose(p.grad, raw[k] / (1 + DAMPING), rtol=1e-15, atol=0), k
    messages = [m for m in _warnings(caplog) if f"'{module}'" in m]
    assert len(messages) == 1 and reason in messages[0], _warnings(caplog)
    row = next(r for r in seng.coverage() if r.module == module)
    assert not row.curvature and reason in row.note
    assert all(layer.curvature is not None for name, layer in seng.layers.items() if name != module)
    return seng


def _data(shape, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


# ----------------------------------------------------------------------------- exact
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_conv1d_style_addmm_layer_matches_dense(reduction):
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    _assert_exact(model, *_data((5,)), reduction, generic={"0"})


def test_conv1d_style_layer_on_sequences_matches_dense():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 7), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 7, 3)).double()
    _assert_exact(model, *_data((4, 5)), generic={"0"})


def test_custom_rmsnorm_matches_dense():
    torch.manual_seed(0)
    _assert_exact(_mlp_with(RMSNorm(7)).double(), *_data((5,)), generic={"1"})


def test_layernorm2d_subclass_takes_the_generic_route_and_matches_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), LayerNorm2d(4), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 3)).double()
    seng = _assert_exact(model, *_data((2, 5, 5)), generic={"1"})
    assert seng.stats["layers/generic"] == 1 and seng.stats["layers/norm"] == 0


def test_batchnorm_act_subclass_in_eval_mode_matches_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), BatchNormAct2d(4), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 3)).double()
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    _assert_exact(model.eval(), *_data((2, 5, 5)), generic={"1"})


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM, nn.RNN])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_layer_matches_dense(cls, batch_first):
    torch.manual_seed(0)
    model = Recurrent(cls, batch_first).double()
    x, y = _data((3, 4), n=6)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()  # (T, N, d): the model's batch axis is 1
    seng = _assert_exact(model, x, y, generic={"rnn"}, batch_axis=0 if batch_first else 1)
    assert seng.layers["rnn"].per_sample_loop  # torch.func has no batching rule for the recurrent kernels


def test_keyword_shared_and_unused_inputs_and_outputs_match_dense():
    torch.manual_seed(0)
    _assert_exact(Gated().double(), *_data((5,)), generic={"gate"})


def test_a_module_called_twice_sums_its_calls():
    torch.manual_seed(0)
    _assert_exact(Twice().double(), *_data((5,)), generic={"norm"})


def test_raw_parameters_are_covered_on_their_owner_module():
    torch.manual_seed(0)
    model = Tokens().double()
    seng = _assert_exact(model, *_data((3, 4)), generic={""})
    row = next(r for r in seng.coverage() if r.module == "")
    assert row.curvature and row.parameters == 3 * 6 + 6 and row.route == "generic"


def test_children_of_a_generic_module_capture_nothing_during_its_refresh():
    """The owner's refresh runs its forward again, through its children's hooks: they must not record it."""
    torch.manual_seed(0)
    model = Tokens().double()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    for seed in range(2):
        x, y = _data((3, 4), seed=seed)
        ref = loop_reference(model, x, y)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        seng.step()
        assert all(not layer._calls for layer in seng.layers.values())
        for k, p in model.named_parameters():
            assert rel_err(p.grad, ref[k]) < 1e-10, (seed, k)


def test_sample_axis_is_found_for_a_linear_in_a_sequence_first_layout():
    torch.manual_seed(0)
    model = SeqFirstHead().double()
    x, y = _data((3, 4), n=5)
    _assert_exact(model, x.transpose(0, 1).contiguous(), y, generic={"proj"}, batch_axis=1)


def test_weight_norm_parametrization_is_covered_on_the_module_it_parametrizes():
    torch.manual_seed(0)
    model = _mlp_with(Scale(7)).double()
    parametrizations.weight_norm(model[0])
    parametrizations.weight_norm(model[1], "gain", dim=None)
    seng = _assert_exact(model, *_data((5,)), generic={"0", "1"})
    assert seng.coverage().percent == 100.0
    assert {p.shape for p in seng.layers["0"].parameters()} == {(7,), (7, 1), (7, 5)}


def test_weight_norm_pre_hook_makes_a_linear_generic():
    """The old ``weight_norm`` computes ``weight`` from ``weight_g`` and ``weight_v`` in a pre-hook."""
    torch.manual_seed(0)
    model = _mlp_with().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of the parametrization
        weight_norm(model[0])
    _assert_exact(model, *_data((5,)), generic={"0"})


@pytest.mark.parametrize("make, shape", [(lambda: _mlp_with(RMSNorm(7), Scale(7)), (5,)),
                                         (lambda: Recurrent(nn.GRU, True), (3, 4))], ids=["mapped", "loop"])
def test_curvature_samples_build_U_from_the_picked_samples(make, shape):
    torch.manual_seed(0)
    model = make().double()
    x, y = _data(shape, n=9)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    rows = sketch.sample_indices(9, 5, torch.Generator().manual_seed(3), torch.device("cpu"))
    ref = loop_reference(model, x, y, rows=rows.tolist(), grads=grads)
    got, seng = seng_direction(model, x, y, curvature_samples=5, seed=3)
    for k in ref:
        assert rel_err(got[k], ref[k]) < 1e-10, k
    assert all(layer.curvature.gram.shape == (5, 5) for layer in seng.layers.values())


def test_loss_scale_divides_the_captured_output_gradients():
    torch.manual_seed(0)
    model = _mlp_with(RMSNorm(7)).double()
    x, y = _data((5,))
    ref = loop_reference(model, x, y)
    seng = SENG(model, damping=DAMPING, update_freq=1)
    (F.cross_entropy(model(x), y) * 8).backward()
    for p in model.parameters():
        p.grad /= 8
    seng.step(loss_scale=8)
    for k, p in model.named_parameters():
        assert rel_err(p.grad, ref[k]) < 1e-10, k


def test_float32_model_curvature_in_float32_and_float64():
    torch.manual_seed(0)
    model = _mlp_with(RMSNorm(7))
    x, y = _data((5,))
    ref = loop_reference(model.double(), x, y)
    model.float()
    for dtype, tol in ((None, 1e-4), (torch.float64, 1e-5)):
        got, seng = seng_direction(model, x.float(), y, curvature_dtype=dtype)
        assert seng.layers["1"].curvature.gram.dtype == (dtype or torch.float32)
        for k in ref:
            assert rel_err(got[k].double(), ref[k]) < tol, (dtype, k)


def test_bf16_autocast_rounding_is_not_taken_for_coupling():
    """Under autocast the batch forward rounds to bf16 and the refresh recomputes in float32: the outputs
    differ by bf16 rounding, which the comparison must tolerate."""
    torch.manual_seed(0)
    model = _mlp_with(RMSNorm(7))
    x, y = _data((5,))
    ref = loop_reference(copy.deepcopy(model).double(), x, y)
    seng = SENG(model, damping=DAMPING, update_freq=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.float())
    F.cross_entropy(out.float(), y).backward()
    seng.step()
    assert not seng._reasons
    assert rel_err(model[1].weight.grad.double(), ref["1.weight"]) < 0.05


def test_sketch_size_samples_coordinates_of_the_explicit_U():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    _, seng = seng_direction(model, *_data((5,)), sketch_size=10)
    route = seng.layers["0"].curvature.route
    assert route.tensors["U"].shape == (8, 5 * 7 + 7) and route.tensors["index"].numel() == 10


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = _mlp_with(RMSNorm(7), Scale(7)).double()
    kwargs = dict(damping=DAMPING, update_freq=2, sketch_size=4)
    seng = SENG(model, **kwargs)
    batches = [_data((5,), seed=s) for s in range(4)]
    for x, y in batches[:3]:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        seng.step()
    twin = copy.deepcopy(model)
    twin_seng = SENG(twin, **kwargs)
    twin_seng.load_state_dict(copy.deepcopy(seng.state_dict()))
    x, y = batches[3]  # step 3 reuses the curvature of step 2
    for m, s in ((model, seng), (twin, twin_seng)):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        s.step()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), twin.parameters()))


def test_out_of_memory_halves_the_mapped_chunk(monkeypatch):
    chunks = []

    def small_memory_vmap(f, **kwargs):
        mapped = torch.func.vmap(f, **kwargs)

        def run(primals, xs, cots):
            chunks.append(cots[0].shape[0])
            if chunks[-1] > 2:
                raise torch.cuda.OutOfMemoryError("fake: more than 2 samples")
            return mapped(primals, xs, cots)
        return run

    monkeypatch.setattr(generic, "vmap", small_memory_vmap)
    torch.manual_seed(0)
    seng = _assert_exact(_mlp_with(RMSNorm(7)).double(), *_data((5,), n=9), generic={"1"})
    assert chunks == [9, 4, 2, 2, 2, 2, 1] and not seng.layers["1"].per_sample_loop


# ----------------------------------------------------------------------------- detected, fallback
def test_batchnorm_act_subclass_in_training_mode_falls_back_as_coupled(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), BatchNormAct2d(4), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 3)).double()
    _assert_falls_back(model, *_data((2, 5, 5)), "1", "couples the samples", caplog)


def test_batchnorm_act_subclass_without_running_statistics_falls_back_as_coupled(caplog):
    """No buffer to update, so vmap maps it: the comparison of outputs is what finds the coupling."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), BatchNormAct2d(4, track_running_stats=False),
                          nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()
    seng = _assert_falls_back(model, *_data((2, 5, 5)), "1", "couples the samples", caplog)
    assert not seng.layers["1"].per_sample_loop


def test_refresh_leaves_running_statistics_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Flatten(), nn.Linear(3 * 5 * 5, 3)).double()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    x, y = _data((2, 5, 5))
    F.cross_entropy(model(x), y).backward()
    before = {k: b.clone() for k, b in model.named_buffers()}
    seng.step()
    assert all(torch.equal(b, before[k]) for k, b in model.named_buffers())


def test_batchnorm_in_training_mode_inside_a_generic_module_is_detected(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Flatten(), nn.Linear(3 * 5 * 5, 3)).double()
    _assert_falls_back(model, *_data((2, 5, 5)), "0", "couples the samples", caplog)


def test_dropout_in_training_mode_falls_back_as_random(caplog):
    torch.manual_seed(0)
    model = _mlp_with(NoisyScale(7)).double()
    _assert_falls_back(model, *_data((5,)), "1", "draws random numbers", caplog)


def test_refresh_leaves_the_global_random_state_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), BatchNormAct2d(4), nn.Flatten(), nn.Dropout(0.2),
                          nn.Linear(4 * 5 * 5, 3), NoisyScale(3)).double()
    seng = SENG(model, damping=DAMPING, update_freq=1)
    x, y = _data((2, 5, 5))
    F.cross_entropy(model(x), y).backward()
    state = torch.get_rng_state()
    seng.step()
    assert torch.equal(torch.get_rng_state(), state)


def test_two_axes_of_the_batch_size_are_told_apart_by_the_probe_and_exact():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 7), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 7, 3)).double()
    _assert_exact(model, *_data((4, 5), n=4), generic={"0"})


class Branching(nn.Sequential):
    """Data-dependent control flow: a shape-only forward cannot decide the branch, so no probe runs."""

    def forward(self, x):
        return super().forward(x if bool(x.sum() > -1e9) else -x)


def test_two_axes_of_the_batch_size_fall_back_as_ambiguous_where_the_probe_cannot_run(caplog):
    torch.manual_seed(0)
    model = Branching(Conv1D(5, 7), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 7, 3)).double()
    _assert_falls_back(model, *_data((4, 5), n=4), "0", "several axes of the batch size 4", caplog)


def test_input_changed_in_place_after_the_forward_falls_back(caplog):
    torch.manual_seed(0)
    _assert_falls_back(ShiftedInPlace().double(), *_data((5,)), "shift", "modified in place", caplog)


def test_parameter_used_outside_the_forward_falls_back_named(caplog):
    torch.manual_seed(0)
    _assert_falls_back(UsedOutside().double(), *_data((5,)), "inner", "parameter 'offset'", caplog)


def test_per_sample_gradients_above_the_memory_cap_fall_back_with_their_size(caplog, monkeypatch):
    monkeypatch.setattr("lightning_seng.layers.generic.EXPLICIT_MAX_ELEMENTS", 100)
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    _assert_falls_back(model, *_data((5,)), "0", "8 × 42 = 336 elements", caplog)
