"""LightningCLI: SENGCallback and SENGStrategy from YAML by class_path (recipes/lightning_cli/), under the
LightningCLI of each Lightning package."""

from __future__ import annotations

import inspect
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_seng import SENGCallback, SENGStrategy
from lightning_seng.cli import _command_line, main

from .lightning_modules import ClassifierSteps, RandomData, for_package, seng_strategy_class

EXAMPLES = Path(__file__).resolve().parents[1] / "recipes" / "lightning_cli"
TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.logger=false"]


@pytest.fixture(autouse=True)
def _as_a_fresh_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # LightningCLI writes config.yaml to the run's directory
    monkeypatch.setattr(sys, "argv", ["lightning_seng.cli"])  # pytest's own arguments are not the CLI's


def test_seng_callback_signature_is_fully_annotated_for_jsonargparse():
    parameters = list(inspect.signature(SENGCallback.__init__).parameters.values())[1:]
    assert [p.name for p in parameters if p.annotation is inspect.Parameter.empty] == []


def test_example_config_trains_with_the_seng_callback_from_yaml():
    cli = main(["fit", "--config", str(EXAMPLES / "digits_mlp.yaml"), *TINY])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SENGCallback)]
    assert callback.seng.step_count == 3


def test_callback_init_args_from_the_command_line_reach_seng():
    cli = main(["--config", str(EXAMPLES / "digits_mlp.yaml"), "--trainer.callbacks.damping=0.3",
                "--trainer.callbacks.update_freq=5"], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SENGCallback)]
    assert callback.seng_kwargs["damping"] == 0.3 and callback.seng_kwargs["update_freq"] == 5


def test_ddp_example_builds_seng_strategy_from_its_class_path():
    cli = main(["--config", str(EXAMPLES / "digits_mlp.yaml"), "--config", str(EXAMPLES / "seng_ddp.yaml")],
               run=False)
    assert isinstance(cli.trainer.strategy, SENGStrategy) and cli.trainer.strategy.seng_mode == "global"


def test_strategy_by_registered_name_from_the_command_line():
    cli = main(["--config", str(EXAMPLES / "digits_mlp.yaml"), "--trainer.strategy=seng_ddp_global"], run=False)
    assert isinstance(cli.trainer.strategy, SENGStrategy) and cli.trainer.strategy.seng_mode == "global"


def tiny_run(package, tmp_path) -> list[str]:
    """A config for ``package``'s LightningCLI: this package's small classifier and data, SENG by class_path."""
    model = for_package(ClassifierSteps, package)
    data = for_package(RandomData, package, base="LightningDataModule")
    config = tmp_path / "tiny.yaml"
    config.write_text(textwrap.dedent(f"""
        trainer:
          accelerator: cpu
          max_steps: 2
          logger: false
          enable_checkpointing: false
          enable_progress_bar: false
          enable_model_summary: false
          callbacks:
            - class_path: lightning_seng.SENGCallback
              init_args: {{damping: 0.4, update_freq: 1}}
        model: {{class_path: {model.__module__}.{model.__name__}}}
        data: {{class_path: {data.__module__}.{data.__name__}}}
    """))
    return ["--config", str(config)]


def test_seng_callback_by_class_path_trains_under_either_packages_cli(pl_package, tmp_path):
    cli = main(["fit", *tiny_run(pl_package, tmp_path)], package=pl_package.__name__)
    assert isinstance(cli.trainer, pl_package.Trainer)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SENGCallback)]
    assert callback.seng.step_count == 2


def test_seng_callback_by_class_path_validates_in_the_packages_own_lightning_cli(pl_package, tmp_path):
    cli = pl_package.cli.LightningCLI(args=tiny_run(pl_package, tmp_path), run=False)
    assert any(isinstance(c, SENGCallback) for c in cli.trainer.callbacks)


@pytest.mark.parametrize("strategy", ["seng_ddp_global", "class_path"])
def test_strategy_by_name_or_class_path_builds_the_packages_seng_strategy(pl_package, tmp_path, strategy):
    cls = seng_strategy_class(pl_package)
    if strategy == "class_path":
        strategy = f"{{class_path: {cls.__module__}.SENGStrategy, init_args: {{seng_mode: global}}}}"
    cli = main([*tiny_run(pl_package, tmp_path), "--trainer.devices=2", f"--trainer.strategy={strategy}"], run=False,
               package=pl_package.__name__)
    assert isinstance(cli.trainer.strategy, cls) and cli.trainer.strategy.seng_mode == "global"


def test_package_is_named_on_the_command_line_before_lightning_clis_arguments():
    assert _command_line(["--package", "lightning.pytorch", "fit", "--config", "a.yaml"]) == \
        ("lightning.pytorch", ["fit", "--config", "a.yaml"])
    assert _command_line(["fit", "--config", "a.yaml"]) == ("pytorch_lightning", ["fit", "--config", "a.yaml"])


def test_unknown_package_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match=r"package must be one of \['pytorch_lightning', 'lightning.pytorch'\] "
                                         r"\(got 'lightning'\)"):
        main([], run=False, package="lightning")
