"""The recipe application: what ``python -m lightning_seng.train`` runs (Hydra configs in ``conf/``).

The package reads core → Lightning → recipes: the torch-only core (``preconditioner``, ``layers/``, ``sketch``,
``schedules``, ``coverage``, ``axes``, ``hooks``, ``distributed``), the Lightning layer (``callback``, ``strategy``,
``mixin``, ``cli``, ``steps``), and here the application built on them:

- :mod:`.train`: the Hydra entry point (``python -m lightning_seng.train``);
- :mod:`.data`, :mod:`.models`, :mod:`.classifier`: data modules, networks and the LightningModule the recipes train;
- :mod:`.lr_schedules`: the learning-rate schedules of the SENG authors' recipes;
- :mod:`.report`: the results table, the plots and the divergence mark;
- :mod:`.sweep`: W&B sweep files run offline (``python -m lightning_seng.sweep``).
"""
