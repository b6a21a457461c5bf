"""SENGOptimizerMixin: ``configure_optimizers`` and the SENG callback from the module's hyper-parameters.

A LightningModule that inherits the mixin and saves ``optimizer``, ``scheduler`` and ``seng`` in its
hyper-parameters (``self.save_hyperparameters()``) needs no optimizer code::

    class Net(SENGOptimizerMixin, pl.LightningModule):
        def __init__(self, optimizer=None, scheduler=None, seng=None):
            super().__init__()
            self.save_hyperparameters()
            ...

    Net(optimizer={"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9},
        scheduler={"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 20},
        seng={"damping": 0.5, "update_freq": 10})

- ``optimizer``: a ``_target_`` config (Hydra style) built with ``params=self.parameters()``; missing or
  ``None`` gives :data:`DEFAULT_OPTIMIZER` (SGD with momentum).
- ``scheduler``: a ``_target_`` config built with ``optimizer=...``; the keys ``interval`` (``"epoch"`` or
  ``"step"``), ``frequency`` and ``monitor`` are Lightning's and are passed to Lightning, not the scheduler.
  ``steps_per_epoch: auto`` becomes the trainer's optimizer steps per epoch
  (:func:`lightning_seng.steps.steps_per_epoch`), for per-step schedules such as ``scheduler=poly``
  (:func:`lightning_seng.recipes.lr_schedules.warmup_poly`) or ``OneCycleLR``. Missing or ``None``: no scheduler.
- ``seng``: keyword arguments of :class:`~lightning_seng.callback.SENGCallback` (a ``_target_`` is optional);
  the callback is returned by ``configure_callbacks`` so Lightning attaches it to the Trainer.
  Missing or ``None``: no SENG, the module trains with the first-order optimizer alone.

Learning rate, momentum and weight decay stay with the first-order optimizer; SENG only rewrites ``.grad``.
The mixin imports no Lightning class: it serves a ``pytorch_lightning.LightningModule`` and a
``lightning.pytorch.LightningModule`` (``L.LightningModule``) alike, and so does the callback it returns.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_seng.callback import SENGCallback
from lightning_seng.steps import steps_per_epoch as trainer_steps_per_epoch

DEFAULT_OPTIMIZER: dict[str, Any] = {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9}
LIGHTNING_SCHEDULER_KEYS = ("interval", "frequency", "monitor")


def _as_dict(key: str, cfg: Any) -> dict[str, Any] | None:
    if cfg is None:
        return None
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"{key} must be a mapping with a '_target_' key or null (got {type(cfg).__name__}: {cfg!r})")


def build_optimizer(cfg: Mapping[str, Any] | None, params) -> Any:
    """``instantiate(cfg, params=params)``; errors name the ``optimizer`` key and show the config."""
    cfg = _as_dict("optimizer", cfg) or dict(DEFAULT_OPTIMIZER)
    if "_target_" not in cfg:
        raise ValueError(f"optimizer must have a '_target_' such as 'torch.optim.SGD' (got {cfg})")
    try:
        return instantiate(cfg, params=params, _convert_="all")
    except Exception as err:  # torch reports e.g. "Invalid learning rate: -1.0" without the key
        raise ValueError(f"optimizer: cannot build {cfg['_target_']} from {cfg}: {root_cause(err)}") from err


def build_scheduler(cfg: Mapping[str, Any] | None, optimizer,
                    steps_per_epoch: Union[int, Callable[[], int], None] = None) -> dict[str, Any] | None:
    """Lightning's ``lr_scheduler`` dict from a ``_target_`` config, or ``None`` without one.

    ``steps_per_epoch`` (an int, or a function returning it, called only when needed) replaces a
    ``steps_per_epoch: auto`` entry of the config; without it such an entry is an error.
    """
    cfg = _as_dict("scheduler", cfg)
    if not cfg:
        return None
    lightning_keys = {k: cfg.pop(k) for k in LIGHTNING_SCHEDULER_KEYS if k in cfg}
    if lightning_keys.get("interval", "epoch") not in ("epoch", "step"):
        raise ValueError(f"scheduler.interval must be one of ['epoch', 'step'] (got {lightning_keys['interval']!r})")
    if "_target_" not in cfg:
        raise ValueError(f"scheduler must have a '_target_' such as 'torch.optim.lr_scheduler.CosineAnnealingLR' "
                         f"(got {cfg})")
    if cfg.get("steps_per_epoch") == "auto":
        if steps_per_epoch is None:
            raise ValueError("scheduler.steps_per_epoch='auto' needs the trainer's steps per epoch: build the scheduler "
                             "from a LightningModule attached to a Trainer, or set scheduler.steps_per_epoch to an int")
        cfg["steps_per_epoch"] = steps_per_epoch() if callable(steps_per_epoch) else steps_per_epoch
    try:
        scheduler = instantiate(cfg, optimizer=optimizer, _convert_="all")
    except Exception as err:
        raise ValueError(f"scheduler: cannot build {cfg['_target_']} from {cfg}: {root_cause(err)}") from err
    return {"scheduler": scheduler, **lightning_keys}


def build_seng_callback(cfg: Mapping[str, Any] | None) -> SENGCallback | None:
    """A :class:`SENGCallback` from its keyword arguments (``_target_`` optional), or ``None`` without config."""
    cfg = _as_dict("seng", cfg)
    if cfg is None:
        return None
    cfg.setdefault("_target_", f"{SENGCallback.__module__}.{SENGCallback.__qualname__}")
    try:
        callback = instantiate(cfg, _convert_="all")
    except Exception as err:
        raise ValueError(f"seng: {root_cause(err)}") from err
    if not isinstance(callback, SENGCallback):
        raise TypeError(f"seng._target_ must build a SENGCallback (got {type(callback).__name__})")
    return callback


def root_cause(err: BaseException) -> str:
    """Hydra wraps constructor errors in InstantiationException; the innermost message names the key.

    A ValueError's message is enough (ours say key, value and what is allowed); other types keep their name.
    """
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"


class SENGOptimizerMixin:
    """LightningModule mixin: optimizer, scheduler and SENG from ``self.hparams``; see the module docstring."""

    def _seng_hparam(self, key: str) -> Any:
        hparams = getattr(self, "hparams", None)
        return hparams.get(key) if hparams is not None else None

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self._seng_hparam("optimizer"), self.parameters())
        scheduler = build_scheduler(self._seng_hparam("scheduler"), optimizer,
                                    steps_per_epoch=lambda: trainer_steps_per_epoch(self.trainer))
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def configure_callbacks(self) -> list:
        callback = build_seng_callback(self._seng_hparam("seng"))
        return [callback] if callback is not None else []
