"""The optimizers the benchmark compares, each behind one small class with the same duty:
``train_step(x, y) -> loss`` runs forward, backward and the update for one mini-batch.

- ``seng``: lightning_seng.SENG rewriting ``.grad``, then SGD with momentum (plain PyTorch loop).
- ``seng_mc``: the same with the Monte-Carlo Fisher (``SENG(fisher="mc", likelihood=...)``: rows of ``U`` are
  per-sample gradients at targets drawn from the model's predictive distribution). Skipped, with a line
  saying why, where the installed lightning_seng has no ``fisher`` argument yet.
- ``sgd``: SGD with momentum.
- ``adamw``: torch.optim.AdamW.
- ``kfac``: K-FAC from ``asdfghjkl`` (import name ``asdl``): its KfacGradientMaker builds the
  Kronecker factors (Monte-Carlo Fisher) and preconditions ``.grad``; SGD with momentum steps. ASDL leaves out ``nn.Embedding`` (asdfghjkl 0.1a5 builds no Kronecker
  inverse for it and fails) and the ``out_proj`` of ``nn.MultiheadAttention`` (its hooks never fire); both
  keep the plain gradient.
- ``asdl_seng``: ASDL's own SENG (``asdl.precondition.SengGradientMaker``), the other SENG a user can
  install, then SGD with momentum. It covers ``nn.Linear`` and ``nn.Conv2d`` only (other parameters keep
  their plain gradient, while covered layers get a direction of scale ``g/λ``), treats every position of a
  sequence as a sample (it flattens ``(B, T, d)`` to ``(B·T, d)``), samples ``sketching_size`` input and
  output coordinates for its Gram, truncates a Conv2d's output gradients to rank ``truncated_rank`` by SVD, and
  approximates ``Uᵀv`` by one outer product ``(Σ_n √|v_n| G_n)(Σ_n v_n X_n / Σ_n √|v_n|)ᵀ`` (cross terms
  between samples included). Its damping means what ours does (``(F + λI)⁻¹g`` with ``F`` the empirical
  Fisher of the averaged loss); it refreshes its curvature every ``update_freq`` steps like ours;
  ``sketching_size`` 256 is its default and its ``truncated_rank`` 16 equals our ``svd_rank``. As installed
  (asdfghjkl 0.1a5) its correction term carries an extra ``1/data_size``: on one Linear layer in float64 its
  direction is ``(g − Uᵀ(λI + UUᵀ)⁻¹U g / N) / λ`` up to the outer-product error, not ``(F + λI)⁻¹g``
  (tests/benchmarks/test_asdl_seng.py), so it moves little from ``g/λ`` at large ``N``. Where every
  per-sample output gradient of a layer is zero it divides 0 by 0 (NaN). We run it as it is.
- ``shampoo`` and ``soap``: ScalableShampoo (Shampoo with layer-wise grafting, the practical
  variant; the package's plain ``Shampoo`` diverged at every learning rate we tried with
  momentum) and SOAP, both from ``pytorch-optimizer``.

Peers are optional (``pip install ".[bench]"``); ``missing_reason`` tells why one cannot run.
"""
from __future__ import annotations

import importlib.util
import inspect
import warnings
from typing import Callable

import torch
import torch.nn as nn

OPTIMIZERS = ("seng", "sgd", "adamw", "kfac", "shampoo", "soap", "seng_mc", "asdl_seng")
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")

_REQUIRES = {
    "seng": ("lightning_seng", "the lightning_seng package (pip install .)"),
    "seng_mc": ("lightning_seng", "the lightning_seng package (pip install .)"),
    "kfac": ("asdl", "asdfghjkl (pip install '.[bench]')"),
    "asdl_seng": ("asdl", "asdfghjkl (pip install '.[bench]')"),
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
    if name in ("seng", "seng_mc"):
        try:
            from lightning_seng import SENG
        except ImportError as err:
            return f"skipping {name}: lightning_seng.SENG cannot be imported ({err})"
        if name == "seng_mc" and "fisher" not in inspect.signature(SENG).parameters:
            return ("skipping seng_mc: this lightning_seng's SENG has no `fisher` argument yet "
                    "(the Monte-Carlo Fisher, issue 20)")
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

        # the coverage table at INFO once per run would flood the benchmark's log; fallbacks still warn
        self.seng = SENG(model, seed=seed, log_coverage=False, **seng_kwargs)
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


def unhooked_linears(model: nn.Module) -> list[nn.Module]:
    """The ``out_proj`` of every ``nn.MultiheadAttention``: a Linear module whose hooks never fire (the attention
    calls ``F.multi_head_attention_forward`` with its weight), so ASDL must not count it as a layer it covers."""
    return [m.out_proj for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


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
            # asdfghjkl 0.1a5 builds no Kronecker inverse for nn.Embedding and then fails at the first step
            ignore_modules=unhooked_linears(model) + [nn.Embedding],
        )
        loss_type = asdl.LOSS_CROSS_ENTROPY if loss_kind == "cross_entropy" else asdl.LOSS_MSE
        self.maker = asdl.KfacGradientMaker(model, config, fisher_type=asdl.FISHER_MC,
                                            loss_type=loss_type)
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                   weight_decay=weight_decay)

    def train_step(self, x, y) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = _asdl_forward_backward(self.maker, self.model, self.loss_fn, x, y)
        self.opt.step()
        return float(loss.detach())


def _asdl_forward_backward(maker, model, loss_fn, x, y):
    """Forward and backward through an asdl gradient maker (it runs them itself); the loss."""
    dummy_out = maker.setup_model_call(model, x)
    maker.setup_loss_call(loss_fn, dummy_out, y)
    with warnings.catch_warnings():
        # asdl registers non-full backward hooks; torch warns about them on every call.
        warnings.simplefilter("ignore", FutureWarning)
        _, loss = maker.forward_and_backward()
    return loss


class AsdlSengStepper(Stepper):
    """ASDL's SENG through its SengGradientMaker, then SGD with momentum. The maker runs forward and backward
    itself (on refresh steps inside its curvature context) with the loss summed over the batch, and divides
    the gradients of the layers it covers by ``data_size``; the gradients of every other parameter it leaves
    summed, so the stepper divides those by ``data_size`` too, and they get the gradient of the averaged loss
    that every other optimizer sees. ``data_size`` is the number of terms the loss averages: the batch size,
    or batch x positions for a sequence model (ASDL takes each position as a sample)."""

    def __init__(self, model, loss_fn, lr: float, momentum: float, weight_decay: float,
                 damping: float, update_freq: int, data_size: int, sketching_size: int,
                 truncated_rank: int):
        super().__init__(model, loss_fn)
        from asdl.precondition import PreconditioningConfig, SengGradientMaker

        config = PreconditioningConfig(data_size=data_size, damping=damping,
                                       preconditioner_upd_interval=update_freq,
                                       curvature_upd_interval=update_freq,
                                       ignore_modules=unhooked_linears(model))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # one per module kind it does not cover
            self.maker = SengGradientMaker(model, config, sketching_size=sketching_size,
                                           truncated_rank=truncated_rank)
        covered = {id(p) for p in self.maker.module_dict.parameters()}
        self.uncovered = [p for p in model.parameters() if p.requires_grad and id(p) not in covered]
        self.data_size = data_size
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                   weight_decay=weight_decay)

    def train_step(self, x, y) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = _asdl_forward_backward(self.maker, self.model, self.loss_fn, x, y)
        with torch.no_grad():
            for p in self.uncovered:
                if p.grad is not None:
                    p.grad.div_(self.data_size)
        self.opt.step()
        return float(loss.detach())


def _seng_kwargs(cfg) -> dict:
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
    return dict(damping=damping, update_freq=cfg.update_freq, sketch_size=cfg.sketch_size,
                curvature_samples=cfg.get("curvature_samples"),
                relative_damping=bool(cfg.get("relative_damping", False)))


def likelihood_of(loss_kind: str, cfg) -> str:
    """``optim.seng_mc.likelihood``, or where it is null the one that matches the loss: categorical for
    cross-entropy, gaussian for squared error."""
    chosen = cfg.get("likelihood")
    if chosen is None:
        return {"cross_entropy": "categorical", "mse": "gaussian"}[loss_kind]
    if chosen not in LIKELIHOODS:
        raise ValueError(f"optim.seng_mc.likelihood must be null or one of {list(LIKELIHOODS)} "
                         f"(got {chosen!r})")
    return str(chosen)


def make_stepper(name: str, model: nn.Module, loss_fn: Callable, lr: float, cfg, seed: int,
                 loss_kind: str, batch_size: int) -> Stepper:
    """Build optimizer ``name`` with learning rate ``lr`` and the fixed settings in ``cfg``
    (the optimizer's block of the bench config). ``batch_size`` is what ASDL's peers average their curvature
    over (``data_size``): the number of terms the loss averages, i.e. batch x positions for a sequence model."""
    if name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        return FirstOrder(model, loss_fn, opt)
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(cfg.betas),
                                weight_decay=cfg.weight_decay)
        return FirstOrder(model, loss_fn, opt)
    if name == "seng":
        return SengStepper(model, loss_fn, lr, cfg.momentum, cfg.weight_decay, _seng_kwargs(cfg), seed)
    if name == "seng_mc":
        seng_kwargs = dict(_seng_kwargs(cfg), fisher="mc", likelihood=likelihood_of(loss_kind, cfg))
        return SengStepper(model, loss_fn, lr, cfg.momentum, cfg.weight_decay, seng_kwargs, seed)
    if name == "asdl_seng":
        return AsdlSengStepper(model, loss_fn, lr, cfg.momentum, cfg.weight_decay, cfg.damping,
                               cfg.update_freq, batch_size, int(cfg.sketching_size),
                               int(cfg.truncated_rank))
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
