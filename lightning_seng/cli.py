"""Lightning's own CLI (``LightningCLI``), for users who configure runs with it rather than with Hydra::

    python -m lightning_seng.cli fit --config recipes/lightning_cli/digits_mlp.yaml
    python -m lightning_seng.cli fit --config recipes/lightning_cli/digits_mlp.yaml --trainer.callbacks.damping=0.3
    python -m lightning_seng.cli fit --config recipes/lightning_cli/digits_mlp.yaml \\
        --config recipes/lightning_cli/seng_ddp.yaml                   # two CPU processes, SENGStrategy
    python -m lightning_seng.cli --package lightning.pytorch fit --config my_lightning_run.yaml

The model and the data module are any classes named by ``class_path``, and SENG enters as Lightning objects do,
``trainer.callbacks: [{class_path: lightning_seng.SENGCallback, init_args: {...}}]`` (or
``--trainer.callbacks+=SENGCallback --trainer.callbacks.damping=0.3``) and ``trainer.strategy: {class_path:
lightning_seng.SENGStrategy, init_args: {...}}`` (or ``trainer.strategy: seng_ddp``). An existing
``LightningCLI`` script takes the same YAML once ``lightning_seng`` is installed. Needs ``jsonargparse[signatures]``.

What this CLI adds to ``LightningCLI`` (:class:`SENGArguments`)::

    python -m lightning_seng.cli fit --help                           # lists --seng.damping, --seng.update_freq, ...
    python -m lightning_seng.cli fit --config my_run.yaml --seng.enabled=true --seng.damping=0.3
    python -m lightning_seng.cli fit --trainer.callbacks.help SENGCallback

A bad value ends the command with one line naming the class, the key, the value and what is allowed
(``Error: lightning_seng.callback.SENGCallback: update_freq must be an int >= 1 (got 0)``) and exit code 2;
``LIGHTNING_SENG_FULL_ERROR=1`` shows the traceback instead.

``--package`` (``package=`` of :func:`main`) picks the Lightning package whose ``LightningCLI``, Trainer and base
classes the run uses: ``pytorch_lightning`` (the default; the recipes' model and data are its classes) or
``lightning.pytorch`` (``import lightning as L``), whose model and data classes must derive from
``lightning.pytorch``'s and whose strategy class is ``lightning_seng.lightning.SENGStrategy``;
``lightning_seng.SENGCallback`` and the names ``seng_ddp`` / ``seng_ddp_global`` serve both.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import traceback
from typing import Any

from lightning_seng._packages import PACKAGES

# `python -m lightning_seng.cli` ends a configuration error with its message; this variable set to 1 shows the
# traceback instead (as HYDRA_FULL_ERROR does for `python -m lightning_seng.train`)
FULL_ERROR = "LIGHTNING_SENG_FULL_ERROR"


def main(args: Any = None, run: bool = True, package: str = "pytorch_lightning") -> Any:
    """``LightningCLI`` of ``package`` over every LightningModule and LightningDataModule of that package, with the
    ``seng`` arguments (:class:`SENGArguments`); ``args`` as LightningCLI takes them."""
    if package not in PACKAGES:
        raise ValueError(f"package must be one of {list(PACKAGES)} (got {package!r})")
    lightning = importlib.import_module(package)
    cli = importlib.import_module(f"{package}.cli")
    # SENGCallback imported here is a known subclass of both Callback classes, so jsonargparse resolves the short
    # name (`--trainer.callbacks+=SENGCallback`, `--trainer.callbacks.help SENGCallback`)
    importlib.import_module("lightning_seng.callback")
    cli_class = type("LightningCLI", (SENGArguments, cli.LightningCLI), {"__module__": __name__})
    return cli_class(lightning.LightningModule, lightning.LightningDataModule, subclass_mode_model=True,
                     subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=args, run=run)


class SENGArguments:
    """What this module adds to a ``LightningCLI`` class (it comes first among the bases):

    - the ``seng`` group: :class:`~lightning_seng.SENGCallback`'s arguments (``--seng.damping``,
      ``--seng.update_freq``, ...; listed by ``fit --help``) and ``--seng.enabled``. With ``seng.enabled=true`` the
      callback built from them joins ``trainer.callbacks``, which must then hold no other SENGCallback; with
      ``false`` (the default) every ``seng.*`` argument must keep its default, since it would go unused.
    - a constructor's error named after its class (``lightning_seng.callback.SENGCallback: update_freq must be
      ...``) in place of jsonargparse's wrapping error, which buries it under every type it tried.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        from lightning_seng.callback import SENGCallback

        super().add_arguments_to_parser(parser)
        # not add_lightning_class_args: that would add the callback to every run, next to one in trainer.callbacks
        parser.add_class_arguments(SENGCallback, "seng", instantiate=False, fail_untyped=False, sub_configs=True)
        parser.groups["seng"].add_argument(
            "--seng.enabled", type=bool, default=False,
            help="add a SENGCallback with the seng.* arguments above to trainer.callbacks (which must then hold "
                 "no other); false: SENG only where trainer.callbacks has it, and seng.* keep their defaults")
        self._seng_defaults = {key: _plain(parser.get_default(f"seng.{key}")) for key in _seng_keys()}

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        # after LightningCLI's own instantiators (model, data), so it builds every other class
        self._constructor_errors: list[tuple[type, Exception]] = []
        self.parser.add_instantiator(self._instantiate, object)
        seng = self._section(self.config).seng
        if seng.enabled:
            return
        changed = [f"seng.{key}={seng[key]!r}" for key in _seng_keys()
                   if _plain(seng[key]) != self._seng_defaults[key]]
        if changed:
            raise ValueError(f"{', '.join(changed)} given, but seng.enabled is false (allowed: seng.enabled=true, "
                             "or the SENGCallback's arguments under trainer.callbacks)")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            raised = self._reported_constructor_error(err)
            if raised is None:
                raise
            cls, cause = raised
            raise ValueError(f"{cls.__module__}.{cls.__qualname__}: {cause}") from err

    def _reported_constructor_error(self, err: Exception) -> tuple[type, Exception] | None:
        """The class and the error of the constructor whose error ``err`` reports, else ``None``: from ``err``'s
        chain of causes, else the latest error a constructor raised whose first line ``err``'s message holds."""
        found = _constructor_error(err)
        if found is not None:
            return found
        for cls, raised in reversed(self._constructor_errors):
            first_line = str(raised).partition("\n")[0]
            if first_line and first_line in str(err):
                return cls, raised
        return None

    def _instantiate(self, class_type: type, *args: Any, **kwargs: Any) -> Any:
        """jsonargparse's default instantiator, keeping the error a constructor raises: when jsonargparse tries a
        ``Union``'s members (``trainer.callbacks`` is a list or one callback) it may chain another member's error."""
        try:
            return class_type(*args, **kwargs)
        except (ValueError, FileNotFoundError) as err:
            self._constructor_errors.append((class_type, err))
            raise

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        from lightning_seng.callback import SENGCallback

        seng = self._section(self.config_init).seng
        if seng.enabled:
            callbacks = kwargs.get("callbacks", self._section(self.config_init).trainer.get("callbacks")) or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            if any(isinstance(c, SENGCallback) for c in callbacks):
                raise ValueError("seng.enabled is true and trainer.callbacks holds a SENGCallback too: one SENG per "
                                 "model (allowed: seng.enabled=false, or no SENGCallback in trainer.callbacks)")
            try:
                callback = SENGCallback(**{key: seng[key] for key in _seng_keys()})
            except ValueError as err:
                # not `from err`: the constructor's error as cause would be named after its class by instantiate_classes
                raise ValueError(f"seng: {err}")  # noqa: B904
            kwargs["callbacks"] = [*callbacks, callback]
        return super().instantiate_trainer(**kwargs)

    def _section(self, config: Any) -> Any:
        """The part of ``config`` with this run's keys: the subcommand's (``fit``, ...) when there is one."""
        return config[self.subcommand] if self.subcommand else config


def _seng_keys() -> list[str]:
    """SENGCallback's arguments, the ``seng.*`` keys but ``seng.enabled``."""
    from lightning_seng.callback import SENGCallback

    return list(inspect.signature(SENGCallback.__init__).parameters)[1:]


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists: a default as the parser holds it, ``(0,)``, equals the parsed ``[0]``."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _constructor_error(err: BaseException) -> tuple[type, BaseException] | None:
    """The class whose constructor raised under ``err`` and the error it raised, else ``None``.

    jsonargparse wraps a constructor's error in its own (a ``Union`` type tries every member and reports them all),
    keeping the first member's error as ``__cause__``; the innermost cause is the constructor's when its traceback
    passes through an ``__init__``, whose ``self`` is the object being built.
    """
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if not isinstance(cause, (ValueError, FileNotFoundError)):
        return None
    for frame, _ in traceback.walk_tb(cause.__traceback__):
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            return type(frame.f_locals["self"]), cause
    return None


def command_line(argv: list[str]) -> None:
    """``python -m lightning_seng.cli [--package P] ARGS``: a configuration error (a bad value, a missing file)
    ends with its message on two lines and exit code 2; with ``LIGHTNING_SENG_FULL_ERROR=1`` it is raised."""
    package, rest = _command_line(argv)
    sys.argv[1:] = rest  # LightningCLI reads the command line itself (and warns when given both it and `args`)
    exceptions = importlib.import_module(f"{package}.utilities.exceptions")
    try:
        main(package=package)
    except (ValueError, FileNotFoundError, exceptions.MisconfigurationException) as err:
        if os.environ.get(FULL_ERROR) == "1":
            raise
        print(f"Error: {err}", file=sys.stderr)
        print(f"Set the environment variable {FULL_ERROR}=1 for a complete stack trace.", file=sys.stderr)
        raise SystemExit(2) from None


def _command_line(argv: list[str]) -> tuple[str, list[str]]:
    """``--package`` and the arguments left for LightningCLI."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--package", choices=list(PACKAGES), default="pytorch_lightning")
    known, rest = parser.parse_known_args(argv)
    return known.package, rest


if __name__ == "__main__":
    command_line(sys.argv[1:])
