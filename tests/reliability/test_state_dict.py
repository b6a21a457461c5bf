"""SENG state in process: a state_dict is a snapshot, survives ``torch.load(weights_only=True)`` and
resumes between refreshes bit for bit, for every route that draws from the sketch RNG."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG
from lightning_seng.schedules import ExponentialDamping

STEPS = 10
UPDATE_FREQ = 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 6, 10), nn.Tanh(), nn.Linear(10, 3))


def _batch(step):
    g = torch.Generator().manual_seed(50 + step)
    return torch.randn(8, 2, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


def _setup(route):
    model = _model()
    seng = SENG(model, damping=ExponentialDamping(0.6, rate=0.5), update_freq=UPDATE_FREQ, route=route,
                sketch_size=5, svd_rank=2, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, seng, opt


def _train(model, seng, opt, steps):
    for step in steps:
        seng.set_epoch(step // 4)
        x, y = _batch(step)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        seng.step()
        opt.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_equal(a, b, path=""):
    assert type(a) is type(b) or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert a == b, path


@pytest.mark.parametrize("route", ["explicit", "implicit", "gram"])
def test_resume_between_refreshes_is_bitwise(route):
    model, seng, opt = _setup(route)
    _train(model, seng, opt, range(5))                     # stop after step 4: step 5 does not refresh
    state = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "seng": seng.state_dict()})
    _train(model, seng, opt, range(5, STEPS))

    model2, seng2, opt2 = _setup(route)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    seng2.load_state_dict(state["seng"])
    assert not seng2.will_refresh
    _train(model2, seng2, opt2, range(5, STEPS))
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    _assert_equal(seng.state_dict(), seng2.state_dict())


def test_state_dict_is_a_snapshot_not_a_view():
    model, seng, opt = _setup("explicit")
    _train(model, seng, opt, range(4))
    state = seng.state_dict()
    frozen = copy.deepcopy(state)
    _train(model, seng, opt, range(4, STEPS))               # refreshes and damping changes in between
    _assert_equal(frozen, state)


def test_state_dict_loads_with_weights_only():
    model, seng, opt = _setup("implicit")
    _train(model, seng, opt, range(4))
    state = seng.state_dict()
    _assert_equal(state, _roundtrip(state))


def test_loading_state_of_another_model_names_the_layers():
    model, seng, opt = _setup("gram")
    _train(model, seng, opt, range(1))
    other = SENG(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="'1'"):
        other.load_state_dict(seng.state_dict())
