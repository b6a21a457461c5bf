"""LightningCLI: SENGCallback and SENGStrategy from YAML by class_path (recipes/lightning_cli/)."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest

from lightning_seng import SENGCallback, SENGStrategy
from lightning_seng.cli import main

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
