"""Hydra configs: every file composes, overrides reach the preconditioner, bad values name their key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightning_seng.callback import SENGCallback
from lightning_seng.recipes.train import build, config_dir, plan_runs, run

CONF = Path(config_dir())
FAST = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "logger=none"]


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _is_wandb_sweep(path: Path) -> bool:
    return path.parent.name == "sweep" and path.name.startswith("wandb_")


def _group_options():
    """(override, path) for every option of every config group, recipes included."""
    options = []
    for path in sorted(CONF.rglob("*.yaml")):
        rel = path.relative_to(CONF)
        if rel.parent == Path(".") or _is_wandb_sweep(path):
            continue
        group = rel.parent.as_posix()
        prefix = "+" if group == "sweep" else ""
        options.append(pytest.param(f"{prefix}{group}={path.stem}", id=rel.as_posix()))
    return options


def test_config_dir_is_the_repository_conf():
    assert (CONF / "train.yaml").is_file() and (CONF / "__init__.py").is_file()


@pytest.mark.parametrize("override", _group_options())
def test_every_config_file_composes_and_resolves(override):
    cfg = _compose([override])
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in ("data", "model", "trainer", "optimizer", "seed", "baseline"):
        assert key in container, key
    assert container["model"]["num_classes"] == container["num_classes"]


@pytest.mark.parametrize("recipe, model, data", [
    ("digits_mlp", "MLP", "DigitsDataModule"),
    ("digits_cnn", "SmallCNN", "DigitsDataModule"),
    ("cifar10_resnet18", "resnet18_cifar", "CIFAR10DataModule"),
    ("imagenet_resnet50", "resnet50", "ImageNetDataModule"),
])
def test_recipes_select_their_model_and_data(recipe, model, data):
    cfg = _compose([f"recipe={recipe}"])
    assert cfg.model._target_.endswith(model)
    assert cfg.data._target_.endswith(data)


def test_default_run_is_the_digits_comparison():
    cfg = _compose()
    labels = [label for label, _, _ in plan_runs(cfg)]
    assert labels == ["SENG+SGD", "SGD"]
    _, seng_cfg, seng_opt = plan_runs(cfg)[0]
    _, baseline_seng, baseline_opt = plan_runs(cfg)[1]
    assert seng_cfg is not None and baseline_seng is None
    assert baseline_opt.lr == cfg.baseline.lr and seng_opt.lr == cfg.optimizer.lr


def test_paper_presets_keep_every_knob():
    default = set(_compose(["seng=default"]).seng)
    for preset in ("paper_cifar", "paper_imagenet"):
        assert set(_compose([f"seng={preset}"]).seng) == default, preset


def test_cli_overrides_reach_the_preconditioner():
    cfg = _compose(["seng.damping=0.3", "seng.update_freq=20", "seng.sketch_size=16", "seng.route=explicit",
                    "baseline.enabled=false", *FAST])
    ((_, seng_cfg, opt_cfg),) = plan_runs(cfg)
    module, datamodule, trainer = build(cfg, seng_cfg, opt_cfg)
    trainer.fit(module, datamodule=datamodule)
    (callback,) = [c for c in trainer.callbacks if isinstance(c, SENGCallback)]
    seng = callback.seng
    assert seng.damping == 0.3
    assert seng.settings.update_freq == 20 and seng.settings.sketch_size == 16 and seng.settings.route == "explicit"
    assert seng.step_count == 2


def test_monte_carlo_fisher_overrides_reach_the_preconditioner():
    cfg = _compose(["seng.fisher=mc", "seng.likelihood=categorical", "baseline.enabled=false", *FAST])
    ((_, seng_cfg, opt_cfg),) = plan_runs(cfg)
    module, datamodule, trainer = build(cfg, seng_cfg, opt_cfg)
    trainer.fit(module, datamodule=datamodule)
    (callback,) = [c for c in trainer.callbacks if isinstance(c, SENGCallback)]
    seng = callback.seng
    assert seng.fisher == "mc" and seng.likelihood.name == "categorical" and seng.output_module is None
    assert seng.sampled_targets is not None and not seng._reasons


def test_a_likelihood_object_from_its_target():
    cfg = _compose(["seng.fisher=mc", "seng.likelihood={_target_: lightning_seng.fisher.Categorical, class_axis: -1}",
                    "baseline.enabled=false", *FAST])
    from lightning_seng.mixin import build_seng_callback

    ((_, seng_cfg, _),) = plan_runs(cfg)
    callback = build_seng_callback(OmegaConf.to_container(seng_cfg))
    assert repr(callback.seng_kwargs["likelihood"]) == "Categorical(class_axis=-1)"


def test_seng_none_trains_without_the_callback():
    cfg = _compose(["seng=none", *FAST])
    ((label, seng_cfg, opt_cfg),) = plan_runs(cfg)
    assert label == "SGD" and seng_cfg is None
    module, datamodule, trainer = build(cfg, seng_cfg, opt_cfg)
    trainer.fit(module, datamodule=datamodule)
    assert not any(isinstance(c, SENGCallback) for c in trainer.callbacks)


@pytest.mark.parametrize("override, pattern", [
    ("seng.update_freq=0", r"update_freq must be an int >= 1 \(got 0\)"),
    ("seng.damping=-1", r"damping must be a finite number > 0 \(got -1\)"),
    ("seng.route=fastest", r"route must be one of \['auto', 'threshold', 'explicit', 'gram', 'implicit'\] \(got 'fastest'\)"),
    ("seng.loss_reduction=avg", r"loss_reduction must be one of \['mean', 'sum'\]"),
    ("data.batch_size=0", r"data.batch_size must be a positive integer \(got 0\)"),
    ("model.hidden=[0]", r"model.hidden must be a positive integer \(got 0\)"),
    ("optimizer.lr=-0.1", r"optimizer: cannot build torch.optim.SGD .*'lr': -0.1"),
    ("baseline.lr=0", r"baseline.lr must be null .* \(got 0\)"),
    ("threads=0", r"threads must be null \(torch's default\) or an integer >= 1 \(got 0\)"),
])
def test_bad_value_names_the_key(override, pattern):
    cfg = _compose([override, *FAST])
    with pytest.raises(ValueError, match=pattern):
        run(cfg)


def test_missing_data_root_names_the_key():
    cfg = _compose(["recipe=cifar10_resnet18", "data.root=null", "trainer=cpu", *FAST])
    with pytest.raises(FileNotFoundError, match=r"data.root is not set.*data.root=/path/to/cifar-10-batches-py"):
        run(cfg)


def test_hydra_multirun_example_declares_a_sweep():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["+sweep=digits_grid"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert set(params) == {"seng.damping", "seng.update_freq", "optimizer.lr"}
    for key in params:  # every swept key exists in the composed config
        assert OmegaConf.select(cfg, key) is not None, key


def test_wandb_sweep_is_a_valid_sweep_over_real_config_keys():
    spec = yaml.safe_load((CONF / "sweep" / "wandb_digits.yaml").read_text())
    assert spec["method"] in ("grid", "random", "bayes")
    assert spec["metric"]["goal"] in ("maximize", "minimize")
    assert "${args_no_hyphens}" in spec["command"]
    assert spec["command"][2:4] == ["-m", "lightning_seng.train"]
    assert {"seng.damping", "seng.sketch_size", "seng.update_freq", "optimizer.lr"} <= set(spec["parameters"])
    fixed = [arg for arg in spec["command"] if "=" in arg and not arg.startswith("$")]
    cfg = _compose(fixed)
    for key, param in spec["parameters"].items():
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", key
        if "distribution" in param:
            assert param["distribution"] in ("log_uniform_values", "uniform", "int_uniform", "q_log_uniform_values")
            assert 0 < param["min"] < param["max"]
        else:
            assert param["values"]
    sweeps = pytest.importorskip("sweeps", reason="wandb[sweeps] validates the schema when installed")
    assert sweeps.schema_violations_from_proposed_config(spec) == []


def test_trainer_strategy_config_is_built_into_an_object():
    from lightning_seng.strategy import SENGStrategy
    from lightning_seng.recipes.train import _instantiate

    cfg = _compose(["trainer=ddp", "trainer.strategy.seng_mode=global"])
    kwargs = _instantiate("trainer", cfg.trainer)
    assert isinstance(kwargs["strategy"], SENGStrategy) and kwargs["strategy"].seng_mode == "global"
    assert kwargs["accelerator"] == "gpu" and kwargs["precision"] == "16-mixed"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "seng").glob("*.yaml") if p.stem != "none"))
def test_every_seng_preset_builds_a_callback(preset):
    from lightning_seng.mixin import build_seng_callback

    callback = build_seng_callback(_compose([f"seng={preset}"]).seng)
    assert isinstance(callback, SENGCallback)
    damping = callback.seng_kwargs["damping"]
    if getattr(damping, "steps_per_epoch", None) == "auto":  # the callback fills it from the trainer at fit start
        damping.set_steps_per_epoch(10)
    assert (damping(0, 0) if callable(damping) else damping) > 0
