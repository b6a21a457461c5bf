"""The optimizers the benchmark compares, each behind one small class with the same duty:
``train_step(x, y) -> loss`` runs forward, backward and the update for one mini-batch.

- ``seng``: lightning_seng.SENG rewriting ``.grad``, then SGD with momentum (plain PyTorch loop).
- ``sgd``: SGD with momentum.
- ``adamw``: torch.optim.AdamW.
- ``kfac``: K-FAC from ``asdfghjkl`` (import name ``asdl``): its KfacGradientMaker builds the
  Kronecker factors (Monte-Carlo Fisher) and preconditions ``.grad``; SGD with momentum steps.
- ``shampoo`` and ``soap``: ScalableShampoo (Shampoo with layer-wise grafting, the practical
  variant; the package's plain ``Shampoo`` diverged at every learning rate we tried with
  momentum) and SOAP, both from ``pytorch-optimizer``.

Peers are optional (``pip install ".[bench]"``); ``missing_reason`` tells why one cannot run.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Callable

import torch
import torch.nn as nn

OPTIMIZERS = ("seng", "sgd", "adamw", "kfac", "shampoo", "soap")

_REQUIRES = {
    "seng": ("lightning_seng", "the lightning_seng package (pip install .)"),
    "kfac": ("asdl", "asdfghjkl (pip install '.[bench]')"),
    "shampoo": ("pytorch_optimizer", "pytorch-optimizer (pip install '.[bench]')"),
    "soap": ("pytorch_optimizer", "pytorch-optimizer (pip install '.[bench]')"),
}


def missing_reason(name: str) -> str | None:
    """None if optimizer ``name`` can run here, else a sentence saying what to install."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)} (got {name!r})")
    if name not in _REQUIRES:
        return None
    module, hint = _REQUIRES[name]
    if importlib.util.find_spec(module) is None:
        return f"skipping {name}: {module} is not installed; install {hint}"
    if name == "seng":
        try:
            from lightning_seng import SENG  # noqa: F401
        except ImportError as err:
            return f"skipping seng: lightning_seng.SENG cannot be imported ({err})"
    return None


def available(names) -> list[str]:
    """The optimizers of ``names`` that can run here, in order; for each other one, a line saying what to
    install."""
    out = []
    for name in names:
        reason = missing_reason(name)
        if reason is None:
            out.append(name)
        else:
            print(reason, flush=True)
    return out


class Stepper:
    """One optimizer bound to one model and loss: ``train_step(x, y)`` returns the batch loss.
    Subclasses keep the torch optimizer that owns the learning rate in ``self.opt``, so one
    learning-rate scheduler can drive every method alike."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        self.model = model
        self.loss_fn = loss_fn

    def set_epoch(self, epoch: int) -> None:
        """Hook for epoch-based schedules; most optimizers ignore it."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        raise NotImplementedError

    def _first_order_step(self, opt: torch.optim.Optimizer, x, y) -> float:
        opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())


class FirstOrder(Stepper):
    def __init__(self, model, loss_fn, opt: torch.optim.Optimizer):
        super().__init__(model, loss_fn)
        self.opt = opt

    def train_step(self, x, y) -> float:
        return self._first_order_step(self.opt, x, y)


class SengStepper(Stepper):
    """``loss.backward(); seng.step(); opt.step()`` with SGD + momentum as the wrapped optimizer."""

    def __init__(self, model, loss_fn, lr: float, momentum: float, weight_decay: float,
                 seng_kwargs: dict, seed: int):
        super().__init__(model, loss_fn)
        from lightning_seng import SENG

        self.seng = SENG(model, seed=seed, **seng_kwargs)
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                   weight_decay=weight_decay)

    def set_epoch(self, epoch: int) -> None:
        self.seng.set_epoch(epoch)

    def train_step(self, x, y) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.seng.step()
        self.opt.step()
        if self.seng.damping_feedback_due:  # Levenberg–Marquardt damping: the loss again, after the step
            with torch.no_grad():
                after = self.loss_fn(self.model(x), y)
            self.seng.adapt_damping(float(loss.detach()), float(after))
        return float(loss.detach())


class KfacStepper(Stepper):
    """K-FAC through asdl's KfacGradientMaker: it runs forward and backward itself (plus the
    Monte-Carlo backward on curvature steps) and leaves the preconditioned gradient in ``.grad``.
    Curvature and inverses are refreshed every ``update_freq`` steps, like SENG's."""

    def __init__(self, model, loss_fn, lr: float, momentum: float, weight_decay: float,
                 damping: float, update_freq: int, loss_kind: str, batch_size: int):
        super().__init__(model, loss_fn)
        import asdl

        config = asdl.PreconditioningConfig(
            data_size=batch_size,  # asdl averages the Fisher over this many samples
            damping=damping,
            preconditioner_upd_interval=update_freq,
            curvature_upd_interval=update_freq,
        )
        loss_type = asdl.LOSS_CROSS_ENTROPY if loss_kind == "cross_entropy" else asdl.LOSS_MSE
        self.maker = asdl.KfacGradientMaker(model, config, fisher_type=asdl.FISHER_MC,
                                            loss_type=loss_type)
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                   weight_decay=weight_decay)

    def train_step(self, x, y) -> float:
        self.opt.zero_grad(set_to_none=True)
        dummy_out = self.maker.setup_model_call(self.model, x)
        self.maker.setup_loss_call(self.loss_fn, dummy_out, y)
        with warnings.catch_warnings():
            # asdl registers non-full backward hooks; torch warns about them on every call.
            warnings.simplefilter("ignore", FutureWarning)
            _, loss = self.maker.forward_and_backward()
        self.opt.step()
        return float(loss.detach())


def make_stepper(name: str, model: nn.Module, loss_fn: Callable, lr: float, cfg, seed: int,
                 loss_kind: str, batch_size: int) -> Stepper:
    """Build optimizer ``name`` with learning rate ``lr`` and the fixed settings in ``cfg``
    (the optimizer's block of the bench config)."""
    if name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        return FirstOrder(model, loss_fn, opt)
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(cfg.betas),
                                weight_decay=cfg.weight_decay)
        return FirstOrder(model, loss_fn, opt)
    if name == "seng":
        damping = cfg.damping
        adaptation = cfg.get("damping_adaptation", "constant")
        if adaptation == "lm":
            from lightning_seng import LevenbergMarquardt

            damping = LevenbergMarquardt(float(cfg.damping), every=int(cfg.get("lm_every", 5)))
        elif adaptation == "paper_decay":  # the SENG authors' ImageNet decay, λ·0.9^(epoch/10)
            from lightning_seng import ExponentialDamping

            damping = ExponentialDamping(float(cfg.damping), rate=0.9, period=10)
        elif adaptation != "constant":
            raise ValueError("optim.seng.damping_adaptation must be one of ['constant', 'lm', 'paper_decay'] "
                             f"(got {adaptation!r})")
        seng_kwargs = dict(damping=damping, update_freq=cfg.update_freq,
                           sketch_size=cfg.sketch_size,
                           curvature_samples=cfg.get("curvature_samples"),
                           relative_damping=bool(cfg.get("relative_damping", False)))
        return SengStepper(model, loss_fn, lr, cfg.momentum, cfg.weight_decay, seng_kwargs, seed)
    if name == "kfac":
        return KfacStepper(model, loss_fn, lr, cfg.momentum, cfg.weight_decay, cfg.damping,
                           cfg.update_freq, loss_kind, batch_size)
    if name == "shampoo":
        import pytorch_optimizer

        from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

        opt = pytorch_optimizer.ScalableShampoo(
            model.parameters(), lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
            start_preconditioning_step=cfg.update_freq,
            preconditioning_compute_steps=cfg.update_freq,
            graft_type=LayerWiseGrafting[cfg.graft_type.upper()], matrix_eps=cfg.matrix_eps)
        return FirstOrder(model, loss_fn, opt)
    if name == "soap":
        import pytorch_optimizer

        opt = pytorch_optimizer.SOAP(model.parameters(), lr=lr, betas=tuple(cfg.betas),
                                     weight_decay=cfg.weight_decay,
                                     precondition_frequency=cfg.update_freq)
        return FirstOrder(model, loss_fn, opt)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)} (got {name!r})")
