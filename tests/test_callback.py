"""SENGCallback on an unmodified LightningModule, against SENG applied by hand in a plain loop."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_seng.distributed
from lightning_seng import SENG, ExponentialDamping
from lightning_seng._packages import callback_bases
from lightning_seng.callback import SENGCallback
from lightning_seng.recipes.data import EpochSeededSampler

from .lightning_modules import ClassifierSteps, for_package, seng_strategy_class

N_SAMPLES, BATCH = 48, 8


def make_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(N_SAMPLES, 6, generator=g), torch.randint(3, (N_SAMPLES,), generator=g))


class BoringClassifier(ClassifierSteps, pl.LightningModule):
    """A plain LightningModule that knows nothing about SENG."""


def boring_classifier(net: nn.Module, package=pl) -> nn.Module:
    """:class:`BoringClassifier` on ``package``'s LightningModule."""
    return BoringClassifier(net) if package is pl else for_package(ClassifierSteps, package)(net)


class GradRecorder(*callback_bases()):
    """Copies every gradient at on_before_optimizer_step (runs after SENGCallback: listed after it); a callback of
    either Lightning package."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.detach().clone() for p in pl_module.parameters()])


def trainer(callbacks, package=pl, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, max_epochs=1)
    defaults.update(kwargs)
    return package.Trainer(callbacks=callbacks, **defaults)


def loader(dataset: TensorDataset) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH, shuffle=False)


def plain_loop(net, dataset, knobs, steps, accumulate=1, clip=None, lr=0.1, momentum=0.9):
    """SENG applied by hand: backward -> seng.step(loss_scale) -> clip -> SGD step; returns the gradients seen."""
    seng = SENG(net, **knobs)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    batches = list(loader(dataset))
    seen = []
    for k in range(steps):
        opt.zero_grad()
        for x, y in batches[k * accumulate:(k + 1) * accumulate]:
            (nn.functional.cross_entropy(net(x), y) / accumulate).backward()
        seng.step(loss_scale=1.0 / accumulate)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        seen.append([p.grad.detach().clone() for p in net.parameters()])
        opt.step()
    return seen


KNOBS = dict(damping=0.3, update_freq=2, seed=0)


def test_grad_is_the_seng_direction_of_the_same_batch(pl_package):
    net = make_net()
    reference_net = copy.deepcopy(net)
    raw_net = copy.deepcopy(net)
    recorder = GradRecorder()
    trainer([SENGCallback(**KNOBS), recorder], pl_package, max_steps=1).fit(
        boring_classifier(net, pl_package), loader(make_data()))

    expected = plain_loop(reference_net, make_data(), KNOBS, steps=1)[0]
    x, y = next(iter(loader(make_data())))
    nn.functional.cross_entropy(raw_net(x), y).backward()
    raw = [p.grad for p in raw_net.parameters()]
    for got, want, g in zip(recorder.grads[0], expected, raw, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(got, g, rtol=1e-3, atol=0), "the callback left the raw gradient in place"


def test_training_follows_the_plain_loop_over_refresh_and_reuse_steps():
    net = make_net()
    reference_net = copy.deepcopy(net)
    callback = SENGCallback(**KNOBS)
    trainer([callback], max_steps=5).fit(BoringClassifier(net), loader(make_data()))
    plain_loop(reference_net, make_data(), KNOBS, steps=5)
    assert callback.seng.step_count == 5
    for p, q in zip(net.parameters(), reference_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_accumulation_and_clipping_apply_after_seng_with_scaled_loss():
    net = make_net()
    reference_net = copy.deepcopy(net)
    recorder = GradRecorder()
    t = trainer([SENGCallback(**KNOBS), recorder], max_steps=3, accumulate_grad_batches=2, gradient_clip_val=0.05)
    t.fit(BoringClassifier(net), loader(make_data()))
    plain_loop(reference_net, make_data(), KNOBS, steps=3, accumulate=2, clip=0.05)
    for p, q in zip(net.parameters(), reference_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # The recorder sees the SENG direction before clipping: it is longer than the clip threshold.
    assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in recorder.grads[0]])) > 0.05


def test_loss_scale_divides_by_accumulate_grad_batches(monkeypatch):
    scales = []
    original = SENG.step
    def recording_step(self, loss_scale=1.0):
        scales.append(loss_scale)
        return original(self, loss_scale)

    monkeypatch.setattr(SENG, "step", recording_step)
    trainer([SENGCallback(**KNOBS)], max_steps=2, accumulate_grad_batches=3).fit(
        BoringClassifier(make_net()), loader(make_data()))
    assert scales == [pytest.approx(1 / 3)] * 2


def _resumable_run(tmp_path, max_epochs, ckpt_path=None, save=False, package=pl):
    net = make_net()
    dataset = make_data()
    train_loader = DataLoader(dataset, batch_size=BATCH, sampler=EpochSeededSampler(len(dataset), seed=3))
    damping = ExponentialDamping(1.0, rate=0.5, period=1.0)
    callback = SENGCallback(damping=damping, update_freq=4, sketch_size=5, route="explicit", seed=7)
    callbacks = [callback]
    if save:
        callbacks.append(package.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0))
    t = trainer(callbacks, package, max_epochs=max_epochs, enable_checkpointing=save)
    module = boring_classifier(net, package)
    t.fit(module, train_loader, ckpt_path=ckpt_path)
    return module, callback


def test_checkpoint_resume_matches_the_uninterrupted_run_bit_for_bit(tmp_path, pl_package):
    # 6 steps per epoch, refresh every 4: the resume point (step 12) falls between refreshes (8, 16).
    uninterrupted, _ = _resumable_run(tmp_path / "a", max_epochs=4, package=pl_package)
    _resumable_run(tmp_path / "b", max_epochs=2, save=True, package=pl_package)
    ckpt = torch.load(tmp_path / "b" / "last.ckpt", weights_only=False)
    state = ckpt["callbacks"]["SENGCallback"]["seng"]
    assert state["step_count"] == 12 and state["layers"], "the checkpoint lacks SENG's state"
    resumed, callback = _resumable_run(tmp_path / "c", max_epochs=4, ckpt_path=tmp_path / "b" / "last.ckpt",
                                       package=pl_package)
    assert callback.seng.step_count == 24 and callback.seng.epoch == 3
    for (name, p), q in zip(uninterrupted.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs after resume"


def test_resume_without_seng_state_would_differ(tmp_path):
    """Control for the bit-exact test: dropping the SENG state changes the trajectory."""
    uninterrupted, _ = _resumable_run(tmp_path / "a", max_epochs=4)
    _resumable_run(tmp_path / "b", max_epochs=2, save=True)
    ckpt_file = tmp_path / "b" / "last.ckpt"
    ckpt = torch.load(ckpt_file, weights_only=False)
    ckpt["callbacks"]["SENGCallback"] = {}
    torch.save(ckpt, ckpt_file)
    resumed, _ = _resumable_run(tmp_path / "c", max_epochs=4, ckpt_path=ckpt_file)
    assert not all(torch.equal(p, q) for p, q in zip(uninterrupted.parameters(), resumed.parameters(), strict=True))


def test_damping_schedule_follows_the_epoch():
    callback = SENGCallback(damping=ExponentialDamping(1.0, rate=0.5, period=1.0), update_freq=2)
    seen = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                seen.append(callback.seng.stats["damping"])

    trainer([callback, Probe()], max_epochs=3).fit(BoringClassifier(make_net()), loader(make_data()))
    assert seen == [1.0, 0.5, 0.25]


def test_logs_seng_stats_with_prefix():
    t = trainer([SENGCallback(**KNOBS, log_every_n_steps=1)], max_steps=3)
    t.fit(BoringClassifier(make_net()), loader(make_data()))
    metrics = t.callback_metrics
    for key in ("damping", "refresh_time", "grad_norm", "direction_norm", "cosine", "coverage", "layers/gram",
                "layers/explicit", "layers/implicit", "layers/diagonal"):
        assert f"seng/{key}" in metrics, key
    assert metrics["seng/damping"] == pytest.approx(0.3)
    assert 0 < metrics["seng/cosine"] <= 1
    assert metrics["seng/coverage"] == pytest.approx(100.0)


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.gain


def test_fit_start_prints_the_coverage_table_with_routes_and_fallbacks(caplog, pl_package):
    net = nn.Sequential(make_net(), Scale())
    module = boring_classifier(net, pl_package)
    with caplog.at_level("INFO"):
        trainer([SENGCallback(**KNOBS, exclude=[Scale])], pl_package, max_steps=1).fit(module, loader(make_data()))
    tables = [r.getMessage() for r in caplog.records if f"SENG preconditions {type(module).__name__}" in r.getMessage()]
    assert len(tables) == 1
    lines = tables[0].splitlines()
    assert "Route" in lines[1] and "Params" in lines[1]
    first, second = [i for i, line in enumerate(lines) if set(line) == {"-"}]
    rows = {line.split("|")[1].strip(): line for line in lines[first + 1:second]}
    assert set(rows) == {"net.0.0", "net.0.2", "net.0.4", "net.1"}
    assert "linear" in rows["net.0.0"] and "fallback" in rows["net.1"] and "excluded" in rows["net.1"]
    assert lines[second + 1].startswith("curvature on 98.")


def test_fit_start_shows_the_coverage_table_once(caplog):
    with caplog.at_level("INFO"):
        trainer([SENGCallback(**KNOBS)], max_steps=1).fit(BoringClassifier(make_net()), loader(make_data()))
    assert sum(r.getMessage().count("| Route") for r in caplog.records) == 1


def test_logging_can_be_turned_off():
    t = trainer([SENGCallback(**KNOBS, log_every_n_steps=0)], max_steps=2)
    t.fit(BoringClassifier(make_net()), loader(make_data()))
    assert not any(k.startswith("seng/") for k in t.callback_metrics)


def test_progress_bar_shows_few_short_seng_entries():
    t = trainer([SENGCallback(**KNOBS, log_every_n_steps=1, log_prog_bar=True)], max_steps=3)
    t.fit(BoringClassifier(make_net()), loader(make_data()))
    shown = [k for k in t.progress_bar_metrics if k.startswith("seng/")]
    assert "seng/damping" in shown
    assert len(shown) <= 2 and all(len(k) <= 16 for k in shown), shown  # the rest goes to the loggers only


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: optimizer 0 trains ``a``, optimizer 1 trains ``b``, both from one loss."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(4)
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        loss = nn.functional.cross_entropy(self.b(torch.tanh(self.a(x))), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        self.raw = [p.grad.clone() for p in self.parameters()]
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)


def test_only_the_named_optimizers_are_preconditioned():
    module = TwoOptimizers()
    steps = []

    class Probe(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            index = [o for o in trainer.optimizers].index(optimizer)
            steps.append((index, [p.grad.clone() for p in pl_module.parameters()], pl_module.raw))

    callback = SENGCallback(damping=0.3, update_freq=1, include=["b"], optimizers=[1])
    trainer([callback, Probe()], max_steps=2).fit(module, loader(make_data()))
    first_a, first_b = steps[0], steps[1]
    assert first_a[0] == 0 and first_b[0] == 1
    assert all(torch.equal(g, r) for g, r in zip(first_a[1], first_a[2], strict=True)), "optimizer 0 was preconditioned"
    assert not torch.allclose(first_b[1][2], first_b[2][2]), "optimizer 1 was not preconditioned"
    assert callback.seng.step_count == 1


def test_optimizer_index_out_of_range_names_the_key():
    with pytest.raises(ValueError, match=r"optimizers must be indices .* \[0, 0\] \(got \[1\]\)"):
        trainer([SENGCallback(optimizers=[1])], max_steps=1).fit(BoringClassifier(make_net()), loader(make_data()))


@pytest.mark.parametrize("key, value, pattern", [
    ("update_freq", 0, r"update_freq must be an int >= 1 \(got 0\)"),
    ("damping", -1.0, r"damping must be a finite number > 0 \(got -1.0\)"),
    ("route", "fast", r"route must be one of \['auto', 'threshold', 'explicit', 'gram', 'implicit'\] \(got 'fast'\)"),
    ("loss_reduction", "avg", r"loss_reduction must be one of \['mean', 'sum'\] \(got 'avg'\)"),
    ("curvature_dtype", "float16", r"curvature_dtype must be torch.float32, torch.float64 or None.* \(got 'float16'\)"),
    ("optimizers", [], r"optimizers must list at least one"),
])
def test_bad_knob_is_rejected_with_its_name(key, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        SENGCallback(**{key: value})


def test_state_loaded_before_fit_is_applied_when_seng_is_created():
    source = SENGCallback(**KNOBS)
    trainer([source], max_steps=3).fit(BoringClassifier(make_net()), loader(make_data()))
    target = SENGCallback(**KNOBS)
    target.load_state_dict(source.state_dict())
    assert target.seng is None and target.state_dict()["seng"]["step_count"] == 3  # kept while pending
    trainer([target], max_steps=1).fit(BoringClassifier(make_net()), loader(make_data()))
    assert target.seng.step_count == 4


class _Scaler:
    def __init__(self, scale: float, enabled: bool = True) -> None:
        self.scale, self.enabled = scale, enabled

    def get_scale(self) -> float:
        return self.scale

    def is_enabled(self) -> bool:
        return self.enabled


@pytest.mark.parametrize("automatic, scaler, accumulate, manual_scale, expected", [
    (True, _Scaler(1024.0), 4, 1.0, 256.0),      # AMP scale / accumulate_grad_batches
    (True, None, 2, 1.0, 0.5),                   # no scaler (fp32, bf16)
    (True, _Scaler(1024.0, enabled=False), 1, 1.0, 1.0),
    (False, _Scaler(8.0), 4, 0.25, 2.0),         # manual: Lightning does not divide by accumulation
])
def test_loss_scale_combines_amp_scale_and_accumulation(automatic, scaler, accumulate, manual_scale, expected):
    from types import SimpleNamespace

    callback = SENGCallback(manual_loss_scale=manual_scale)
    trainer_stub = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), accumulate_grad_batches=accumulate)
    module_stub = SimpleNamespace(automatic_optimization=automatic)
    assert callback._loss_scale(trainer_stub, module_stub) == pytest.approx(expected)


def test_ddp_hint_names_a_strategy_that_the_trainers_package_builds(caplog, monkeypatch, pl_package):
    monkeypatch.setattr(lightning_seng.distributed, "make_comm", lambda mode: f"{mode} communicator")
    ddp = pl_package.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False)
    with caplog.at_level("INFO"):
        assert SENGCallback._communicator(ddp) == "local communicator"
    (hint,) = [r.getMessage() for r in caplog.records if "the strategy has no seng_comm" in r.getMessage()]
    name = re.search(r"strategy='(\w+)'", hint).group(1)
    suggested = pl_package.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False).strategy
    assert isinstance(suggested, seng_strategy_class(pl_package)) and suggested.seng_mode == "global"


class SumLossSteps(ClassifierSteps):
    """Cross-entropy summed over the batch (not averaged)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y, reduction="sum")


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_loss_reduction_the_loss_contradicts_is_announced_through_the_callback(accumulate, caplog, pl_package):
    """The callback hands SENG the loss before backward (``on_before_backward``): a summed loss under the default
    ``loss_reduction="mean"`` gets no curvature and one warning naming the setting, also under accumulation
    (whose ``1/k`` the loss scale accounts for); the matching setting keeps every layer's curvature."""
    caplog.set_level(logging.WARNING, logger="lightning_seng")
    for setting, expect_warning in (("mean", True), ("sum", False)):
        caplog.clear()
        callback = SENGCallback(damping=0.3, update_freq=1, loss_reduction=setting)
        module = for_package(SumLossSteps, pl_package)(make_net())
        trainer([callback], pl_package, max_steps=2, accumulate_grad_batches=accumulate).fit(
            module, loader(make_data()))
        warned = [r.getMessage() for r in caplog.records if "loss_reduction" in r.getMessage()]
        assert bool(warned) == expect_warning, warned
        assert (callback.seng.coverage().percent == 0.0) == expect_warning
