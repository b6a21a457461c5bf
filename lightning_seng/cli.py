"""Lightning's own CLI (``LightningCLI``), for users who configure runs with it rather than with Hydra::

    python -m lightning_seng.cli fit --config recipes/lightning_cli/digits_mlp.yaml
    python -m lightning_seng.cli fit --config recipes/lightning_cli/digits_mlp.yaml --trainer.callbacks.damping=0.3
    python -m lightning_seng.cli fit --config recipes/lightning_cli/digits_mlp.yaml \\
        --config recipes/lightning_cli/seng_ddp.yaml                   # two CPU processes, SENGStrategy

Nothing here is specific to SENG: the model and the data module are any classes named by ``class_path``,
and SENG enters as Lightning objects do, ``trainer.callbacks: [{class_path: lightning_seng.SENGCallback,
init_args: {...}}]`` and ``trainer.strategy: {class_path: lightning_seng.SENGStrategy, init_args: {...}}``
(or ``trainer.strategy: seng_ddp``). An existing ``LightningCLI`` script takes the same YAML once
``lightning_seng`` is installed. Needs ``jsonargparse[signatures]``.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI


def main(args: Any = None, run: bool = True) -> LightningCLI:
    """``LightningCLI`` over every LightningModule and LightningDataModule; ``args`` as LightningCLI takes them."""
    return LightningCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                        subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=args, run=run)


if __name__ == "__main__":
    main()
