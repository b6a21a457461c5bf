"""SENGCallback: SENG for any LightningModule, added with ``Trainer(callbacks=[SENGCallback(...)])``.

One class serves both Lightning packages (:mod:`lightning_seng._packages`): it derives from the ``Callback`` of
each one installed, ``pytorch_lightning.Callback`` and ``lightning.pytorch.Callback``, so the same object goes to a
``pytorch_lightning.Trainer`` or an ``L.Trainer`` and validates in either package's ``LightningCLI``. Those bases
hold no state and only no-op hooks. Messages go through ``lightning_utilities``' rank-zero functions, which both
packages re-export as their own.

The callback only translates Lightning events into calls on :class:`lightning_seng.SENG`:

- ``on_fit_start``: ``SENG(pl_module, **knobs, comm=trainer.strategy.seng_comm)``; a damping schedule
  built with ``steps_per_epoch="auto"`` gets the trainer's optimizer steps per epoch (per-step damping
  in fractional epochs); apply the state restored from a checkpoint; print the coverage table
  (module, type, route, parameters; rank zero).
- ``on_train_epoch_start``: ``seng.set_epoch(trainer.current_epoch)`` (epoch-based damping).
- ``on_train_batch_start``: ``seng.observe_batch(batch)``: the batch size ``N`` of this step.
- ``on_before_backward``: ``seng.observe_loss(loss)``: how the loss weighs each sample, checked against
  ``loss_reduction`` at the refresh.
- ``on_before_optimizer_step``: ``seng.step(loss_scale)`` for the optimizers named in ``optimizers``.
- ``on_train_batch_end``: under a :class:`~lightning_seng.schedules.LevenbergMarquardt` damping, on its measured
  steps, ``training_step`` once more on the same batch (no grad, logging muted, the model's buffers such as
  BatchNorm's running statistics restored afterwards) and ``seng.adapt_damping(loss_before, loss_after)``; then
  log ``seng.stats`` as ``seng/<key>``.
- ``state_dict`` / ``load_state_dict``: ``seng.state_dict()`` / ``seng.load_state_dict()`` in checkpoints.
- ``teardown``: ``seng.remove()`` (hooks detached).

Order of gradient transformations in one optimizer step (automatic optimization)::

    backward (scaled loss / accumulate_grad_batches, summed over micro-batches)
    -> AMP unscale            (precision plugin)
    -> SENG direction         (this callback, in on_before_optimizer_step)
    -> gradient clipping      (Trainer(gradient_clip_val=...), applied to the SENG direction)
    -> optimizer.step()       (learning rate, momentum, weight decay)

``loss_scale`` passed to ``seng.step`` is ``amp_scale / accumulate_grad_batches``: the factor by which the
output gradients captured during backward differ from those of the batch-mean loss. The AMP scale is read
from ``trainer.precision_plugin.scaler`` when one exists (``precision="16-mixed"``), else 1. Under
accumulation the curvature comes from the last micro-batch of a refresh step.

Manual optimization: the hook fires inside ``LightningOptimizer.step()``, so ``self.optimizers()[i].step()``
is preconditioned when ``i`` is listed in ``optimizers``. Lightning does not divide the loss by
``accumulate_grad_batches`` there, so only the AMP scale enters ``loss_scale``; if you scale the loss yourself,
say so with ``manual_loss_scale``. SENG rewrites the gradient of every trainable parameter it sees, so with
several optimizers restrict it with ``include``/``exclude`` to the modules of the preconditioned optimizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn

from lightning_seng._packages import callback_bases
from lightning_seng.preconditioner import check_int, check_settings
from lightning_seng.schedules import DampingSchedule, LevenbergMarquardt
from lightning_seng.steps import steps_per_epoch

if TYPE_CHECKING:
    import pytorch_lightning as pl


class SENGCallback(*callback_bases()):
    r"""Precondition the gradients of a LightningModule with SENG before each optimizer step.

    For every supported layer SENG replaces the gradient :math:`g` by
    :math:`d = (F + \lambda I)^{-1} g` with :math:`F` the layer's empirical Fisher on the mini-batch
    (see :class:`lightning_seng.SENG`). The first-order optimizer then takes its step along ``d``.

    The arguments are written in plain text: ``LightningCLI``'s ``--help`` prints them as they are.

    Args:
        damping: the damping λ; a float, a schedule from lightning_seng.schedules (one built with
            steps_per_epoch="auto" is given the trainer's optimizer steps per epoch at fit start), a
            LevenbergMarquardt (adapted from the loss before and after the step: the callback runs training_step
            again on its measured steps), or a callable (step, epoch) -> float.
        update_freq: curvature refresh every update_freq optimizer steps (an int >= 1).
        sketch_size: sampling size of the sketched routes; None = exact (see SENG).
        curvature_samples: samples of the refresh batch that form U (uniform subset); None = all.
        svd_rank: rank of the implicit (low-rank) route.
        implicit_threshold: layers with at least this many parameters use the implicit route (route="auto").
        loss_reduction: "mean" or "sum": how training_step's loss reduces over the batch.
        include: module names (fnmatch patterns) or module types to precondition; None = every module.
        exclude: module names (fnmatch patterns) or module types to skip.
        route: "auto", "threshold" (the authors' rule), "explicit", "gram" or "implicit".
        curvature_dtype: dtype of the curvature solves; None follows the parameters.
        seed: seed of the sketch RNG.
        skip_nonfinite: zero all gradients of a step whose gradient holds NaN/Inf (see SENG).
        batch_axis: axis of the batch's first tensor that counts the samples (or a callable
            (args, kwargs) -> N, called with ((batch,), {}) here and with the model's forward arguments when the
            LightningModule's own forward runs); the two, and the modules' declared batch_first, must agree (see
            SENG).
        batch_shortcut: U g of plain Linear layers from the step's own batch when .grad is exactly that batch's
            gradient (see SENG).
        relative_damping: each layer's damping times the mean eigenvalue of its UUᵀ (see SENG).
        column_sample_size: the SENG authors' column sample size s instead of sketch_size (see SENG).
        fisher: "empirical" (the paper's: U from the training loss at the true labels) or "mc" (U from the
            negative log-likelihood at targets drawn from the model's predictive distribution, see SENG).
        likelihood: with fisher="mc": "categorical" (logits (N, C, ...), classes on axis 1 as F.cross_entropy
            takes them), "gaussian" (unit variance, F.mse_loss), "bernoulli" (logits,
            F.binary_cross_entropy_with_logits), a lightning_seng.fisher.Likelihood (e.g. Categorical(class_axis=-1)),
            or a callable (outputs, generator) -> per-sample loss (N,).
        output_module: with fisher="mc": the name of the submodule whose output the likelihood reads (e.g. "net"
            when training_step calls self.net(x)); None = the LightningModule itself (its forward must then run).
        optimizers: indices into trainer.optimizers whose steps are preconditioned.
        log_every_n_steps: log seng/* statistics every this many optimizer steps; None follows
            Trainer(log_every_n_steps=...); 0 disables logging.
        log_prog_bar: also show seng/damping in the progress bar.
        manual_loss_scale: extra factor the loss carried into backward under manual optimization
            (multiplies the AMP scale); ignored under automatic optimization.
    """

    def __init__(
        self,
        damping: float | Callable[[int, int], float] | Any = 0.5,
        update_freq: int = 10,
        sketch_size: int | None = None,
        curvature_samples: int | None = None,
        svd_rank: int = 16,
        implicit_threshold: int = 700_000,
        loss_reduction: str = "mean",
        include: Sequence[Any] | None = None,
        exclude: Sequence[Any] | None = None,
        route: str = "auto",
        curvature_dtype: torch.dtype | str | None = None,
        seed: int = 0,
        skip_nonfinite: bool = True,
        batch_axis: int | Callable[[tuple, dict], int] = 0,
        batch_shortcut: bool = True,
        relative_damping: bool = False,
        column_sample_size: int | None = None,
        fisher: str = "empirical",
        likelihood: str | Any = "categorical",
        output_module: str | None = None,
        optimizers: Sequence[int] = (0,),
        log_every_n_steps: int | None = None,
        log_prog_bar: bool = False,
        manual_loss_scale: float = 1.0,
    ) -> None:
        super().__init__()
        # SENG's own validation, run now so that a bad value fails before fit starts
        self.seng_kwargs: dict[str, Any] = check_settings(
            damping=damping, update_freq=update_freq, sketch_size=sketch_size,
            curvature_samples=curvature_samples, svd_rank=svd_rank,
            implicit_threshold=implicit_threshold, loss_reduction=loss_reduction, include=include, exclude=exclude,
            route=route, curvature_dtype=curvature_dtype, seed=seed, skip_nonfinite=skip_nonfinite,
            batch_axis=batch_axis, batch_shortcut=batch_shortcut, relative_damping=relative_damping,
            column_sample_size=column_sample_size, fisher=fisher, likelihood=likelihood, output_module=output_module)
        if isinstance(optimizers, int) and not isinstance(optimizers, bool):
            optimizers = (optimizers,)
        optimizers = tuple(optimizers)
        if not optimizers:
            raise ValueError("optimizers must list at least one optimizer index (got [])")
        for index in optimizers:
            check_int("optimizers", index, 0)
        if log_every_n_steps is not None:
            check_int("log_every_n_steps", log_every_n_steps, 0)
        if not manual_loss_scale > 0:
            raise ValueError(f"manual_loss_scale must be > 0 (got {manual_loss_scale!r})")
        self.optimizers = optimizers
        self.log_every_n_steps = log_every_n_steps
        self.log_prog_bar = log_prog_bar
        self.manual_loss_scale = float(manual_loss_scale)
        self.seng = None
        self._pending_state: dict[str, Any] | None = None
        self._stepped = False
        self._warned_feedback = False

    # ------------------------------------------------------------------ lifecycle
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n_optimizers = len(trainer.optimizers)
        out_of_range = [i for i in self.optimizers if i >= n_optimizers]
        if out_of_range:
            raise ValueError(
                f"optimizers must be indices into the module's {n_optimizers} optimizer(s), "
                f"i.e. in [0, {n_optimizers - 1}] (got {list(self.optimizers)})"
            )
        from lightning_seng import SENG

        damping = self.seng_kwargs["damping"]
        # several processes: SENG itself refuses LevenbergMarquardt with the communicator they need
        if (isinstance(damping, LevenbergMarquardt) and pl_module.automatic_optimization
                and trainer.accumulate_grad_batches != 1):
            raise ValueError("damping=LevenbergMarquardt(...) compares the loss of one batch before and after the "
                             "step, which gradient accumulation does not take on one batch (got "
                             f"accumulate_grad_batches={trainer.accumulate_grad_batches}; allowed: 1)")
        if isinstance(damping, DampingSchedule) and damping.steps_per_epoch == "auto":
            damping.set_steps_per_epoch(steps_per_epoch(trainer))
        if self.seng is not None:
            self.seng.remove()
        # SENG measures ‖g‖, ‖d‖ and cos(g, d) (a pass over every gradient) only on the steps this callback logs
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        # the table is printed once, here on rank zero, not also logged by SENG on every rank
        self.seng = SENG(pl_module, **self.seng_kwargs, stats_every=every or None, comm=self._communicator(trainer),
                         log_coverage=False)
        if self._pending_state is not None:
            self.seng.load_state_dict(_to_device(self._pending_state, pl_module.device))
            self._pending_state = None
        rank_zero_info(
            f"SENG preconditions {type(pl_module).__name__}:\n{self.seng.coverage()}")

    @staticmethod
    def _communicator(trainer: pl.Trainer):
        """SENGStrategy's ``seng_comm``; under another multi-process strategy the paper's ``local`` mode.

        Without a communicator each rank would apply its own local-batch direction and the replicas drift apart.
        """
        if hasattr(trainer.strategy, "seng_comm"):
            return trainer.strategy.seng_comm
        if trainer.world_size > 1:
            from lightning_seng.distributed import make_comm

            rank_zero_info(
                "SENGCallback: the strategy has no seng_comm; averaging the ranks' SENG directions "
                "(seng_mode='local'). Use strategy='seng_ddp_global' for exact global-batch SENG.")
            return make_comm("local")
        return None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.seng is not None:
            self.seng.remove()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seng.set_epoch(trainer.current_epoch)

    # ------------------------------------------------------------------ the step
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # training_step often calls a submodule rather than the LightningModule's own forward, so the batch
        # tells SENG its size (batch_axis of its first tensor)
        self.seng.observe_batch((batch,), {})

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # the loss's graph tells how it weighs each sample: checked against loss_reduction at the refresh
        self.seng.observe_loss(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._optimizer_index(trainer, optimizer) not in self.optimizers:
            return
        self.seng.step(loss_scale=self._loss_scale(trainer, pl_module))
        self._stepped = True

    def _loss_scale(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        amp_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        if pl_module.automatic_optimization:
            return amp_scale / trainer.accumulate_grad_batches
        return amp_scale * self.manual_loss_scale

    @staticmethod
    def _optimizer_index(trainer: pl.Trainer, optimizer: Any) -> int:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        for index, candidate in enumerate(trainer.optimizers):
            if getattr(candidate, "_optimizer", candidate) is optimizer:
                return index
        return -1

    # ------------------------------------------------------------------ logging
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._stepped:
            return
        self._stepped = False
        if self.seng.damping_feedback_due:
            self._adapt_damping(trainer, pl_module, outputs, batch, batch_idx)
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        if every == 0 or (self.seng.step_count - 1) % every != 0:
            return
        for key, value in self.seng.stats.items():
            pl_module.log(
                f"seng/{key}", float(value), on_step=True, on_epoch=False,
                prog_bar=self.log_prog_bar and key == "damping", batch_size=1,
            )

    def _adapt_damping(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                       batch_idx: int) -> None:
        """Levenberg–Marquardt feedback: the batch's loss after the optimizer step, from ``training_step`` run
        again without gradients, with ``log`` muted and the buffers (BatchNorm statistics) put back."""
        before = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not pl_module.automatic_optimization or not isinstance(before, torch.Tensor):
            if not self._warned_feedback:
                rank_zero_warn(
                    "SENGCallback: damping=LevenbergMarquardt(...) needs the batch's loss before and after the step; "
                    "under manual optimization call callback.seng.adapt_damping(before, after) in training_step after "
                    "the optimizer step. The damping is not adapted.")
                self._warned_feedback = True
            self.seng.discard_feedback()
            return
        buffers = [(b, b.detach().clone()) for b in pl_module.buffers()]
        pl_module.log = pl_module.log_dict = _muted
        try:
            with torch.no_grad(), trainer.precision_plugin.train_step_context():
                again = pl_module.training_step(batch, batch_idx)
        finally:
            del pl_module.log, pl_module.log_dict
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        after = again.get("loss") if isinstance(again, Mapping) else again
        if not isinstance(after, torch.Tensor):  # training_step skipped the batch this time: no information
            self.seng.discard_feedback()
            return
        self.seng.adapt_damping(float(before), float(after))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.seng is not None:
            return {"seng": self.seng.state_dict()}
        return {"seng": self._pending_state} if self._pending_state is not None else {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state = state_dict.get("seng")
        if state is None:
            return
        if self.seng is not None:
            self.seng.load_state_dict(_to_device(state, self.seng.model.device))
        else:
            # The SENG object is built at fit start, after Lightning restores callback states.
            self._pending_state = dict(state)


def _muted(*args: Any, **kwargs: Any) -> None:
    """``LightningModule.log`` while ``training_step`` runs again for the damping's feedback."""


def _to_device(state: Any, device: torch.device) -> Any:
    """Checkpoints load on CPU; the curvature must live with the gradients. RNG states stay on CPU."""
    if isinstance(state, Mapping):
        return {k: v if k == "generator" else _to_device(v, device) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_device(v, device) for v in state)
    if isinstance(state, torch.Tensor):
        return state.to(device)
    return state
