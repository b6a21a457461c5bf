"""The SENG authors' recipes as presets: each composes with Hydra and builds the optimizer, LR schedule and SENG
callback whose values are those of the official code (DESIGN.md §5), computed here from the authors' formulas."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from pytorch_lightning.callbacks import Callback
from torch import nn

from lightning_seng.layers.routes import RouteSettings, choose_route
from lightning_seng.mixin import build_optimizer, build_scheduler, build_seng_callback
from lightning_seng.schedules import ExponentialDamping
from lightning_seng.recipes.train import _instantiate, build, config_dir, plan_runs
from tests.recipe_formulas import cifar_lr, imagenet_damping, imagenet_lr


def _compose(overrides=()):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _built(recipe, steps_per_epoch, overrides=()):
    """(config, model, optimizer, Lightning scheduler dict, SENG callback) of a recipe, as the Trainer would build them."""
    cfg = _compose([f"recipe={recipe}", *overrides])
    model = instantiate(cfg.model)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=steps_per_epoch)
    return cfg, model, optimizer, scheduler, build_seng_callback(cfg.seng)


def _lr_at(scheduler, steps):
    """``{k: lr of optimizer step k}`` for the steps asked (LambdaLR stepped after every optimizer step)."""
    out, wanted = {}, set(steps)
    for k in range(max(steps) + 1):
        if k in wanted:
            out[k] = scheduler.optimizer.param_groups[0]["lr"]
        scheduler.optimizer.step()  # no gradients: changes nothing, keeps torch's step-order check quiet
        scheduler.step()
    return out


def test_cifar_recipe_is_the_authors_setting():
    batches = 196  # 50,000 images at batch 256
    cfg, model, optimizer, scheduler, callback = _built("cifar10_resnet18", batches)
    assert cfg.data.batch_size == 256 and cfg.data.augment and cfg.trainer.max_epochs == 65
    assert cfg.label_smoothing == 0.0 and cfg.trainer.precision == "32-true"
    (group,) = optimizer.param_groups  # weight decay on every parameter, BatchNorm and biases included
    assert len(group["params"]) == len(list(model.parameters()))
    assert isinstance(optimizer, torch.optim.SGD)
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 1e-2, False)
    assert scheduler["interval"] == "step"
    knobs = callback.seng_kwargs
    assert (knobs["damping"], knobs["update_freq"], knobs["svd_rank"], knobs["implicit_threshold"]) == (2.0, 200, 16, 700000)
    assert knobs["sketch_size"] is None and knobs["column_sample_size"] == 256 and knobs["route"] == "threshold"
    assert knobs["exclude"] == []
    # their rule: implicit exactly for the layers over 700 000 parameters (layer4's 3x3 convolutions, 4x4 positions),
    # explicit for all others
    settings = RouteSettings(route="threshold", implicit_threshold=700000, column_sample_size=256)
    routes = {name: choose_route(256, 1, m.out_channels, m.weight[0].numel(), 16, settings)
              for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert {name for name, r in routes.items() if r == "implicit"} == {
        "layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"}
    assert (settings.coordinates, settings.rows) == (65536, 256)


@pytest.mark.parametrize("k", [0, 1, 195, 196, 30 * 196 + 17, 65 * 196 - 1])
def test_cifar_recipe_lr_is_the_authors_formula(k):
    batches = 196
    *_, scheduler, _ = _built("cifar10_resnet18", batches)
    assert _lr_at(scheduler["scheduler"], [k])[k] == pytest.approx(cifar_lr(k, batches), rel=1e-12)


def test_imagenet_recipe_is_the_authors_setting():
    cfg, model, optimizer, scheduler, callback = _built("imagenet_resnet50", 5005)
    assert cfg.data.batch_size * cfg.trainer.devices == 256 and cfg.data.batch_size == 64
    assert cfg.label_smoothing == 0.1 and cfg.trainer.max_epochs == 50
    assert cfg.trainer.strategy.seng_mode == "local"
    assert all(block.bn3.weight.abs().sum() == 0 for block in model.modules() if hasattr(block, "bn3"))
    (group,) = optimizer.param_groups  # the misspelt key decays BatchNorm and biases too
    assert len(group["params"]) == len(list(model.parameters()))
    assert (group["momentum"], group["weight_decay"]) == (0.9, 1e-4)
    knobs = callback.seng_kwargs
    assert (knobs["update_freq"], knobs["svd_rank"], knobs["implicit_threshold"]) == (1000, 256, 700000)
    assert knobs["sketch_size"] is None and knobs["column_sample_size"] == 128 and knobs["route"] == "threshold"
    assert knobs["exclude"] == ["BatchNorm2d"]
    assert isinstance(knobs["damping"], ExponentialDamping) and knobs["damping"].steps_per_epoch == "auto"


def test_imagenet_recipe_lr_and_damping_are_the_authors_formulas():
    batches = 50  # any count: the recipe takes it from the trainer
    *_, scheduler, callback = _built("imagenet_resnet50", batches)
    steps = [0, 1, 5 * batches - 1, 5 * batches, 39 * batches + 7, 40 * batches - 1, 40 * batches, 50 * batches - 1]
    lrs = _lr_at(scheduler["scheduler"], steps)
    for k in steps:
        assert lrs[k] == pytest.approx(imagenet_lr(k, batches), rel=1e-12), k
    damping = callback.seng_kwargs["damping"]
    damping.set_steps_per_epoch(batches)
    for k in steps:
        assert damping(k, k // batches) == pytest.approx(imagenet_damping(k, batches), rel=1e-14), k


def test_imagenet_trainer_starts_the_grad_scaler_at_1024():
    from pytorch_lightning.plugins.precision import MixedPrecision

    cfg = _compose(["recipe=imagenet_resnet50"])
    assert cfg.trainer.plugins[0].device == "cuda" and cfg.trainer.plugins[0].scaler.device == "cuda"
    # without CUDA a CUDA GradScaler is disabled (its scale reads 1.0): build the same config's scaler on the CPU
    kwargs = _instantiate("trainer", _compose(["recipe=imagenet_resnet50", "trainer.plugins.0.scaler.device=cpu"]).trainer)
    assert kwargs["precision"] is None and kwargs["devices"] == 4
    (plugin,) = kwargs["plugins"]
    assert isinstance(plugin, MixedPrecision) and plugin.precision == "16-mixed"
    assert plugin.scaler.is_enabled() and plugin.scaler.get_scale() == 1024.0


def _fake_cifar10(root):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, 20).tolist()}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


class _RecordLR(Callback):
    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_cifar_recipe_trains_with_the_lr_schedule_sized_by_the_trainer(tmp_path):
    _fake_cifar10(tmp_path)
    cfg = _compose(["recipe=cifar10_resnet18", f"data.root={tmp_path}", "trainer=cpu", "model=small_cnn",
                    "model.in_channels=3", "data.batch_size=16", "data.num_workers=0", "trainer.max_epochs=2",
                    "trainer.enable_progress_bar=false", "logger=none", f"log_dir={tmp_path}"])
    ((_, seng_cfg, opt_cfg),) = plan_runs(cfg)
    record = _RecordLR()
    module, datamodule, trainer = build(cfg, seng_cfg, opt_cfg, callbacks=[record])
    trainer.fit(module, datamodule=datamodule)
    batches = 7  # 100 training images at batch 16, the last batch partial
    assert record.lrs == pytest.approx([cifar_lr(k, batches) for k in range(2 * batches)], rel=1e-12)


@pytest.mark.parametrize("override, pattern", [
    ("scheduler.power=-1", r"scheduler: cannot build lightning_seng.recipes.lr_schedules.warmup_poly .*power must be a finite number > 0 \(got -1\)"),
    ("scheduler.milestones=[0]", r"milestones must be a list of epochs, each an int >= 1 \(got \[0\]\)"),
    ("scheduler.steps_per_epoch=0", r"steps_per_epoch must be an int >= 1 \(got 0\)"),
    ("seng.damping.steps_per_epoch=each", r"steps_per_epoch must be None, 'auto' or an int >= 1 \(got 'each'\)"),
    ("seng.damping.step_offset=-1", r"step_offset must be an int >= 0 \(got -1\)"),
])
def test_bad_recipe_values_name_the_key_the_value_and_what_is_allowed(override, pattern):
    cfg = _compose(["recipe=imagenet_resnet50", override])
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=pattern):
        build_seng_callback(cfg.seng)
        build_scheduler(cfg.scheduler, build_optimizer(cfg.optimizer, model.parameters()), steps_per_epoch=10)
