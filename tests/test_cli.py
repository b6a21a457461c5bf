"""LightningCLI: SENGCallback and SENGStrategy from YAML by class_path (recipes/lightning_cli/), under the
LightningCLI of each Lightning package."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest

from lightning_seng import SENGCallback, SENGStrategy
from lightning_seng.cli import FULL_ERROR, _command_line, command_line, main

from .lightning_modules import ClassifierSteps, RandomData, for_package, seng_strategy_class

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "recipes" / "lightning_cli"
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


# ---------------------------------------------------------------- what a user meets: errors, --help, the seng group
BAD_VALUE = "lightning_seng.callback.SENGCallback: update_freq must be an int >= 1 (got 0)"


def test_bad_callback_value_ends_in_two_lines_naming_class_key_value_and_range(pl_package, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.delenv(FULL_ERROR, raising=False)
    with pytest.raises(SystemExit) as exit_:
        command_line(["--package", pl_package.__name__, "fit", *tiny_run(pl_package, tmp_path),
                      "--trainer.callbacks.update_freq=0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-2:] == [
        f"Error: {BAD_VALUE}", f"Set the environment variable {FULL_ERROR}=1 for a complete stack trace."]


def test_full_error_variable_raises_the_bad_value_with_its_traceback(pl_package, tmp_path, monkeypatch):
    monkeypatch.setenv(FULL_ERROR, "1")
    with pytest.raises(ValueError, match=re.escape(BAD_VALUE)) as raised:
        command_line(["--package", pl_package.__name__, "fit", *tiny_run(pl_package, tmp_path),
                      "--trainer.callbacks.update_freq=0"])
    # the chain reaches the frame that rejected the value
    assert "in check_settings" in "".join(traceback.format_exception(raised.value))


def test_bad_value_of_a_lone_callback_not_in_a_list_is_named_after_its_class():
    # jsonargparse tries trainer.callbacks as a list first and chains that failure, not the constructor's
    lone = "{class_path: lightning_seng.SENGCallback, init_args: {update_freq: 0}}"
    with pytest.raises(ValueError, match=f"^{re.escape(BAD_VALUE)}$"):
        main(["--config", str(EXAMPLES / "digits_mlp.yaml"), f"--trainer.callbacks={lone}"], run=False)


def test_fit_help_lists_seng_callbacks_arguments(pl_package, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"], package=pl_package.__name__)
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--seng.damping DAMPING" in out and "--seng.update_freq UPDATE_FREQ" in out


def test_callbacks_help_takes_the_short_name_and_prints_plain_text(pl_package):
    # a fresh process: the short name resolves only where the CLI itself imported SENGCallback
    done = subprocess.run([sys.executable, "-m", "lightning_seng.cli", "--package", pl_package.__name__, "fit",
                           "--trainer.callbacks.help", "SENGCallback"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--trainer.callbacks.damping DAMPING" in done.stdout and "the damping λ" in done.stdout
    assert re.findall(r":[a-z]+:`|``", done.stdout) == []  # no RST roles or literals


def test_seng_group_adds_the_callback_with_its_arguments(pl_package, tmp_path):
    cli = main([*tiny_run(pl_package, tmp_path), "--trainer.callbacks=[]", "--seng.enabled=true",
                "--seng.damping=0.3", "--seng.update_freq=5"], run=False, package=pl_package.__name__)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SENGCallback)]
    assert callback.seng_kwargs["damping"] == 0.3 and callback.seng_kwargs["update_freq"] == 5


def test_seng_arguments_without_seng_enabled_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"seng\.damping=0\.3 given, but seng\.enabled is false"):
        main(["--config", str(EXAMPLES / "digits_mlp.yaml"), "--seng.damping=0.3"], run=False)


def test_seng_group_beside_a_seng_callback_in_trainer_callbacks_is_refused():
    with pytest.raises(ValueError, match="trainer.callbacks holds a SENGCallback too: one SENG per model"):
        main(["--config", str(EXAMPLES / "digits_mlp.yaml"), "--seng.enabled=true"], run=False)


def test_bad_value_in_the_seng_group_names_the_group():
    with pytest.raises(ValueError, match=r"^seng: update_freq must be an int >= 1 \(got 0\)$"):
        main(["--config", str(EXAMPLES / "digits_mlp.yaml"), "--trainer.callbacks=[]", "--seng.enabled=true",
              "--seng.update_freq=0"], run=False)


def test_seng_group_passes_the_monte_carlo_fisher(pl_package, tmp_path):
    cli = main([*tiny_run(pl_package, tmp_path), "--trainer.callbacks=[]", "--seng.enabled=true",
                "--seng.fisher=mc", "--seng.likelihood=categorical", "--seng.output_module=net"], run=False,
               package=pl_package.__name__)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SENGCallback)]
    kwargs = callback.seng_kwargs
    assert (kwargs["fisher"], kwargs["likelihood"], kwargs["output_module"]) == ("mc", "categorical", "net")


def test_bad_fisher_in_the_seng_group_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"^seng: fisher must be one of \['empirical', 'mc'\] \(got 'exact'\)$"):
        main(["--config", str(EXAMPLES / "digits_mlp.yaml"), "--trainer.callbacks=[]", "--seng.enabled=true",
              "--seng.fisher=exact"], run=False)
