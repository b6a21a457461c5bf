"""Which Fisher the rows of ``U`` come from: the empirical one (``fisher="empirical"``, the paper's) or the
Monte-Carlo one (``fisher="mc"``), and the likelihoods the Monte-Carlo draw comes from.

With ``fisher="mc"`` the rows of ``U`` on a refresh step are per-sample gradients of the negative log-likelihood
at targets ``ŷ`` drawn from the model's own predictive distribution ``p(y | f(x_n))``, one draw per sample (per
position for outputs with positions), instead of the training loss at the true labels:

    F_mc = (1/N) Σ_n ∇ℓ(f(x_n), ŷ_n) ∇ℓ(f(x_n), ŷ_n)ᵀ,   ŷ_n ~ p(y | f(x_n)),
    E_ŷ[F_mc] = (1/N) Σ_n J_nᵀ E_y[∇_f ℓ ∇_f ℓᵀ] J_n   (the true Fisher, in the loss's units),

``J_n = ∂f(x_n)/∂θ``. Each likelihood's ``ℓ`` is torch's own loss for it (what a user trains with), so the
Monte-Carlo rows are on the scale of the empirical rows and a damping means the same for both:

- :class:`Categorical`: logits ``(N, C, ...)`` with the classes on axis 1, torch's ``F.cross_entropy``
  convention (``class_axis=-1`` for ``(N, T, V)`` language-model logits: say it, it is never guessed);
  ``ŷ ~ softmax``; ``ℓ = F.cross_entropy``; ``E[∇_f ℓ ∇_f ℓᵀ] = diag(p) − ppᵀ``.
- :class:`Gaussian`: unit variance, ``ŷ = f + ε``, ``ε ~ N(0, I)``; ``ℓ = F.mse_loss = ‖ŷ − f‖²`` (not
  ``½‖ŷ − f‖²``), whose gradient is ``2(f − ŷ)``, so ``E[∇_f ℓ ∇_f ℓᵀ] = 4I``: four times the unit-variance
  Gaussian's Fisher, which is exactly what the empirical rows of ``F.mse_loss`` give at a correct model
  (data ``y = f + ε`` with unit noise). Both are twice the Gauss-Newton matrix of ``F.mse_loss`` (``2I``).
- :class:`Bernoulli`: logits of any shape ``(N, ...)``, ``ŷ ~ Bernoulli(sigmoid(f))``;
  ``ℓ = F.binary_cross_entropy_with_logits``; ``E[∇_f ℓ ∇_f ℓᵀ] = diag(σ(1 − σ))``.

The samples are on axis 0 of the output. The per-sample loss ``ℓ_n`` sums the sample's elements and, under
``loss_reduction="mean"``, divides by their number, so that ``mean_n ℓ_n`` is torch's default ``"mean"`` loss
(the mean over every element) and ``Σ_n ℓ_n`` its ``"sum"``. Anything else is a callable
``(outputs, generator) -> ℓ (N,)``, with ``mean_n ℓ_n`` (or ``Σ_n ℓ_n``) the loss on the scale of the
training loss; the classes' :meth:`Likelihood.per_sample` serve as building blocks for it.

Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

FISHERS = ("empirical", "mc")
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")


class Likelihood:
    """A predictive distribution of the model's output: draw targets from it, and the negative log-likelihood
    (torch's loss for it, per element, ``reduction="none"``)."""

    name = ""

    def check(self, outputs: Any) -> Optional[str]:
        """Why ``outputs`` cannot be read by this likelihood (``None`` if they can)."""
        if not isinstance(outputs, Tensor):
            return f"its output is a {type(outputs).__name__}, not a tensor"
        if not outputs.is_floating_point():
            return f"its output has dtype {outputs.dtype}, not a floating dtype"
        if outputs.dim() < 1:
            return "its output is a scalar, with no sample axis"
        return None

    def sample(self, outputs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """Targets drawn from ``p(y | outputs)``, one per element or position (no gradient)."""
        raise NotImplementedError

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Torch's loss for this likelihood, ``reduction="none"``: one value per element or position."""
        raise NotImplementedError

    def per_sample(self, outputs: Tensor, targets: Tensor, loss_reduction: str) -> Tensor:
        """``ℓ (N,)``: the loss of each sample (axis 0) at ``targets``, its elements summed, divided by their number
        under ``"mean"`` (so ``ℓ.mean()`` is torch's ``"mean"`` loss) and not under ``"sum"``."""
        losses = self.nll(outputs, targets)
        per = losses.reshape(losses.shape[0], -1)
        total = per.sum(1)
        return total / per.shape[1] if loss_reduction == "mean" else total

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Categorical(Likelihood):
    """Softmax over ``class_axis`` of logits ``(N, C, ...)`` (axis 1, as ``F.cross_entropy`` takes them);
    ``ℓ = F.cross_entropy``."""

    name = "categorical"

    def __init__(self, class_axis: int = 1):
        if isinstance(class_axis, bool) or not isinstance(class_axis, int) or class_axis == 0:
            raise ValueError(f"class_axis must be an int other than 0 (axis 0 holds the samples; got {class_axis!r})")
        self.class_axis = class_axis

    def _moved(self, outputs: Tensor) -> Tensor:
        """The logits with the classes on axis 1."""
        return outputs if self.class_axis == 1 else outputs.movedim(self.class_axis, 1)

    def check(self, outputs: Any) -> Optional[str]:
        why = super().check(outputs)
        if why is not None:
            return why
        axis = self.class_axis % outputs.dim() if -outputs.dim() <= self.class_axis < outputs.dim() else None
        if outputs.dim() < 2 or axis is None or axis == 0:
            return (f"its output of shape {tuple(outputs.shape)} has no class axis {self.class_axis} besides the "
                    "sample axis 0 (categorical logits are (N, C, ...) as F.cross_entropy takes them)")
        return None

    def sample(self, outputs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        logits = self._moved(outputs.detach())
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        flat = wide.movedim(1, -1).reshape(-1, wide.shape[1])
        drawn = torch.multinomial(torch.softmax(flat, -1), 1, generator=generator)
        return drawn.reshape(wide.movedim(1, -1).shape[:-1])

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(self._moved(outputs), targets, reduction="none")

    def __repr__(self) -> str:
        return f"Categorical(class_axis={self.class_axis})"


class Gaussian(Likelihood):
    """Unit variance around the output: ``ŷ = f + ε``, ``ε ~ N(0, I)``; ``ℓ = F.mse_loss = (ŷ − f)²`` per element."""

    name = "gaussian"

    def sample(self, outputs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        f = outputs.detach()
        return f + torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.mse_loss(outputs, targets, reduction="none")


class Bernoulli(Likelihood):
    """Independent Bernoulli per element, logits ``f``: ``ŷ ~ Bernoulli(σ(f))``;
    ``ℓ = F.binary_cross_entropy_with_logits``."""

    name = "bernoulli"

    def sample(self, outputs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        f = outputs.detach()
        p = torch.sigmoid(f.to(torch.promote_types(f.dtype, torch.float32)))
        return torch.bernoulli(p, generator=generator).to(f.dtype)

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(outputs, targets, reduction="none")


LikelihoodLike = Union[str, Likelihood, Callable[[Any, Optional[torch.Generator]], Tensor]]


def make_likelihood(value: LikelihoodLike) -> Union[Likelihood, Callable]:
    """``value`` as a likelihood: a name of :data:`LIKELIHOODS`, a :class:`Likelihood`, or a callable
    ``(outputs, generator) -> ℓ (N,)``; else ``ValueError`` naming the key, the value and what is allowed."""
    if isinstance(value, str):
        table = {"categorical": Categorical, "gaussian": Gaussian, "bernoulli": Bernoulli}
        if value in table:
            return table[value]()
    elif isinstance(value, Likelihood) or (callable(value) and not isinstance(value, type)):
        return value
    raise ValueError(f"likelihood must be one of {list(LIKELIHOODS)}, a lightning_seng.fisher.Likelihood, or a "
                     f"callable (outputs, generator) -> per-sample loss (N,) (got {value!r})")


@dataclass
class SampledPass:
    """What the preconditioner knows of the sampled loss of the current refresh step: the gradient edges of the
    captured layer outputs of this forward (where its backward goes), whether it ran, the output's shape and the
    number of per-sample losses (checked against the batch at the refresh), the drawn targets (built-in
    likelihoods), and why it could not be formed (then no layer gets Monte-Carlo rows from this refresh)."""

    edges: List[Any] = field(default_factory=list)
    ran: bool = False
    running: bool = False
    shape: Optional[Tuple[int, ...]] = None
    rows: Optional[int] = None
    targets: Any = None
    failure: Optional[str] = None
