"""Lightning's own CLI (``LightningCLI``), for users who configure runs with it rather than with Hydra::

    python -m lightning_seng.cli fit --config recipes/lightning_cli/digits_mlp.yaml
    python -m lightning_seng.cli fit --config recipes/lightning_cli/digits_mlp.yaml --trainer.callbacks.damping=0.3
    python -m lightning_seng.cli fit --config recipes/lightning_cli/digits_mlp.yaml \\
        --config recipes/lightning_cli/seng_ddp.yaml                   # two CPU processes, SENGStrategy
    python -m lightning_seng.cli --package lightning.pytorch fit --config my_lightning_run.yaml

Nothing here is specific to SENG: the model and the data module are any classes named by ``class_path``,
and SENG enters as Lightning objects do, ``trainer.callbacks: [{class_path: lightning_seng.SENGCallback,
init_args: {...}}]`` and ``trainer.strategy: {class_path: lightning_seng.SENGStrategy, init_args: {...}}``
(or ``trainer.strategy: seng_ddp``). An existing ``LightningCLI`` script takes the same YAML once
``lightning_seng`` is installed. Needs ``jsonargparse[signatures]``.

``--package`` (``package=`` of :func:`main`) picks the Lightning package whose ``LightningCLI``, Trainer and base
classes the run uses: ``pytorch_lightning`` (the default; the recipes' model and data are its classes) or
``lightning.pytorch`` (``import lightning as L``), whose model and data classes must derive from
``lightning.pytorch``'s and whose strategy class is ``lightning_seng.lightning.SENGStrategy``;
``lightning_seng.SENGCallback`` and the names ``seng_ddp`` / ``seng_ddp_global`` serve both.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from lightning_seng._packages import PACKAGES


def main(args: Any = None, run: bool = True, package: str = "pytorch_lightning") -> Any:
    """``LightningCLI`` of ``package`` over every LightningModule and LightningDataModule of that package;
    ``args`` as LightningCLI takes them."""
    if package not in PACKAGES:
        raise ValueError(f"package must be one of {list(PACKAGES)} (got {package!r})")
    lightning = importlib.import_module(package)
    cli = importlib.import_module(f"{package}.cli")
    return cli.LightningCLI(lightning.LightningModule, lightning.LightningDataModule, subclass_mode_model=True,
                            subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=args, run=run)


def _command_line(argv: list[str]) -> tuple[str, list[str]]:
    """``--package`` and the arguments left for LightningCLI."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--package", choices=list(PACKAGES), default="pytorch_lightning")
    known, rest = parser.parse_known_args(argv)
    return known.package, rest


if __name__ == "__main__":
    package, rest = _command_line(sys.argv[1:])
    sys.argv[1:] = rest  # LightningCLI reads the command line itself (and warns when given both it and `args`)
    main(package=package)
