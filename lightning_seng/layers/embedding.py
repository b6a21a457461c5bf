"""``nn.Embedding``, and one weight tied between Embedding and Linear modules (a language model's input
embedding and its output head).

A table ``E (V, D)`` is looked up by Embedding modules (tokens ``tok``, output gradients ``G (D,)`` per
position) and multiplied by Linear modules ``y = x Eᵀ + b`` (inputs ``x (D,)``, output gradients
``a (V,)`` per position). Its per-sample gradient sums every use::

    J_n = Σ_t e_{tok[n,t]} ⊗ G[n,t]  +  Σ_s a[n,s] ⊗ x̃[n,s],     x̃ = [x; 1] with the Linear's bias,

as one matrix ``Θ = [E | b]`` of shape ``(V, D + 1)`` (embedding positions have ``0`` in the bias column,
positions holding ``padding_idx`` add nothing). The embedding terms are sparse: summed per (sample, token)
they are ``e_u ⊗ A`` rows (:func:`~lightning_seng.sketch.token_pairs`), and no ``V × D`` row is ever built.
``UUᵀ`` needs three kinds of inner products of the row vectors:

- one-hot · one-hot (token coincidences): :func:`~lightning_seng.sketch.token_gram`;
- dense · dense (the Linear's own Gram): :func:`~lightning_seng.sketch.patch_gram`;
- one-hot · dense (a gather of ``a`` at the tokens): :func:`~lightning_seng.sketch.token_cross_gram`.

``U g`` is a gather of ``g``'s rows at the tokens plus the Linear's ``Σ aᵀ g x̃``, and ``Uᵀ v`` an
``index_add`` plus the Linear's ``Σ v a x̃ᵀ``. A large head (``V·(D + 1) ≥ implicit_threshold`` with more
positions than ``svd_rank``) keeps its positions compressed per sample by a truncated SVD (the paper's
implicit route, :func:`~lightning_seng.sketch.low_rank`); the embedding positions stay exact.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import sketch
from .base import Call, Factors, LayerCurvature, Mask, NotExact, Pick, find_sample_axis
from .linear import LinearLayer
from .routes import ROUTE_CLASSES, Route, RouteSettings


def unsupported(module: nn.Embedding) -> Optional[str]:
    """Why the per-sample gradients of ``module``'s table cannot be built exactly, or ``None``."""
    if module.scale_grad_by_freq:
        return ("scale_grad_by_freq=True divides each token's gradient by its count in the whole batch, which "
                "couples the samples")
    if module.sparse:
        return "sparse=True gives it a sparse gradient, which SENG does not rewrite"
    return None


def group_refusal(embeddings: Sequence[nn.Embedding]) -> Optional[str]:
    """Why Embedding modules sharing one table cannot get one exact layer, or ``None``."""
    for module in embeddings:
        reason = unsupported(module)
        if reason is not None:
            return reason
    if len({module.padding_idx for module in embeddings}) > 1:
        return ("the Embedding modules sharing its table have different padding_idx, and SENG's hooks cannot "
                "tell their calls apart")
    return None


def _positions(parts: List[Tensor], empty: Tensor) -> Tensor:
    """The calls' positions side by side (axis 1), without a copy for a single call."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1) if parts else empty


class TokenRoute(Route):
    """Rows ``J_n = Σ_{p ∈ n} e_{token[p]} ⊗ [A[p]; 0] + Σ_s G[n,0,:,s] ⊗ X[n,0,:,s]`` of one matrix ``(V, D_t)``.

    Tensors: the embedding pairs ``sample (M,)``, ``token (M,)``, ``A (M, D)``, and where Linear modules share
    the table their factors ``G (N, 1, V, P)``, ``X (N, 1, D_t, P)`` (exact, or low rank under
    ``tokens-implicit``), all scaled to ``U``'s rows. Options: ``n`` (``N``). ``parts`` is ``[Θ (V, D_t)]``.
    """

    name = "tokens"

    def _pairs(self) -> Tuple[Tensor, Tensor, Tensor]:
        return self.tensors["sample"], self.tensors["token"], self.tensors["A"]

    def _dense(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        return self.tensors.get("G"), self.tensors.get("X")

    def gram(self, generator) -> Tensor:
        n = self.options["n"]
        sample, token, A = self._pairs()
        K = sketch.token_gram(sample, token, A, n)
        G, X = self._dense()
        if G is not None:
            K = K + sketch.patch_gram(G, X)
            if A.shape[0]:
                C = sketch.token_cross_gram(sample, token, A, G[:, 0], X[:, 0, :A.shape[1]], n)
                K = K + C + C.T
        return K

    def u_dot(self, parts: Sequence[Tensor]) -> Tensor:
        theta = parts[0]
        sample, token, A = self._pairs()
        out = sketch.token_u_dot(sample, token, A, theta[:, :A.shape[1]], self.options["n"])
        G, X = self._dense()
        return out if G is None else out + sketch.patch_u_dot(G, X, theta[None])

    def apply(self, parts: Sequence[Tensor], v: Tensor, damping: float) -> List[Tensor]:
        theta = parts[0]
        G, X = self._dense()
        out = theta / damping if G is None else sketch.patch_apply(G, X, v, theta[None], None, damping)[0][0]
        sample, token, A = self._pairs()
        if A.shape[0]:
            sketch.token_apply_(out[:, :A.shape[1]], sample, token, A, v, -1.0 / damping)
        return [out]


class ImplicitTokenRoute(TokenRoute):
    """:class:`TokenRoute` whose Linear factors were truncated per sample to rank ``svd_rank``."""

    name = "tokens-implicit"


ROUTE_CLASSES.update({cls.name: cls for cls in (TokenRoute, ImplicitTokenRoute)})


class EmbeddingLayer(LayerCurvature):
    """One table ``E`` and the modules that use it: one or more ``nn.Embedding`` and, when tied, ``nn.Linear``
    modules (with one shared bias or none). Kind ``embedding`` for a lone Embedding, ``tied`` otherwise.

    The factors travel batch first as two tensors (global DDP mode): ``grad_side`` holds, per sample, the
    embedding output gradients ``(T, D)`` then the Linear output gradients ``(S, V)``, flattened;
    ``input_side`` holds ``T`` itself, the ``T`` tokens (as floats of the curvature dtype: exact up to
    ``2^24`` in float32) and the Linear inputs ``x̃ (S, D_t)``. Rescaling ``grad_side`` rescales ``J_n``.

    Every refresh also checks that the gradient reaching the table is the sum of its captured calls (on a
    random projection): a table also used outside its modules' forward (``F.linear(h, emb.weight)``,
    ``emb.weight[:T]``) raises :class:`NotExact` instead of getting the curvature of some of its uses.
    """

    keeps_others_when_replaced = False  # a weight shared over modules: one replaced breaks the tie
    checks_own_uses = True  # _check_uses

    def __init__(self, name: str, modules: Sequence[nn.Module]):
        super().__init__(name, modules[0])
        self._modules = list(modules)
        self.embeddings = [m for m in modules if isinstance(m, nn.Embedding)]
        self.linears = [m for m in modules if isinstance(m, nn.Linear)]
        self.kind = "embedding" if len(modules) == 1 else "tied"
        self.positions = (1, 1)  # embedding and Linear positions per sample at the last refresh (cost estimates)
        self._probe: Optional[Dict[str, Any]] = None
        self._projection = torch.randn(self.module.weight.shape[1], generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64)

    def param_slots(self) -> Sequence[Optional[nn.Parameter]]:
        return (self.module.weight, self.linears[0].bias if self.linears else None)

    def modules(self) -> List[nn.Module]:
        return list(self._modules)

    # ----------------------------------------------------------------- capture
    def capture(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> List[Any]:
        edges = super().capture(args, kwargs, output)
        weight = self.module.weight
        # (not under torch.func.functional_call, where the module holds a plain tensor instead)
        if self._calls and self._probe is None and isinstance(weight, nn.Parameter) and weight.requires_grad:
            # The gradient reaching the table in each backward, projected on a fixed random vector c, from a
            # pre-hook on its accumulator node. Holding the node keeps it the node of every graph built
            # until the refresh (a dropped batch's graph may be freed before the next batch's backward).
            c = self._projection
            probe = {"c": c, "gc": None, "node": torch.autograd.graph.get_gradient_edge(weight).node}

            def keep_projection(grads: Tuple[Tensor, ...]) -> None:
                if grads[0] is not None:
                    gc = grads[0].detach().to(torch.float64) @ c.to(grads[0].device)
                    probe["gc"] = gc if probe["gc"] is None else probe["gc"] + gc
            probe["handle"] = probe["node"].register_prehook(keep_projection)
            self._probe = probe
        return edges

    def clear(self) -> None:
        super().clear()
        if self._probe is not None:
            self._probe["handle"].remove()
            self._probe = None

    def take_factors(self, loss_scale: float, dtype: torch.dtype, pick: Pick = None,
                     n: Optional[int] = None) -> Optional[Factors]:
        reason = group_refusal(self.embeddings)  # the flags may have changed since SENG was attached
        if reason is not None:
            self.clear()
            raise NotExact(reason)
        probe = self._probe
        self._probe = None  # the calls are taken now; the probe goes with them
        try:
            if probe is not None and any(c.done for c in self._calls):
                self._check_uses(probe["c"], probe["gc"])
            return super().take_factors(loss_scale, dtype, pick, n)
        finally:
            if probe is not None:
                probe["handle"].remove()

    def factor_sums(self, factors: Factors) -> None:
        """``None``: identity 1 is :meth:`_check_uses` here, on a projection (the table's dense sum would be
        ``V × D``)."""
        return None

    def _check_uses(self, c: Tensor, gc: Optional[Tensor]) -> None:
        """:class:`NotExact` unless ``Σ_calls J c`` equals the projection ``g c`` of the gradient that reached
        the table (``J``: a call's contribution to the table's gradient, summed over the batch)."""
        weight = self.module.weight
        total = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        c = c.to(weight.device)
        eps = torch.finfo(weight.dtype).eps
        for call in self._calls:
            if not call.done:
                continue
            eps = max(eps, torch.finfo(call.grads[0].dtype).eps)  # autocast: half-precision output gradients
            # made contiguous once, for this sum and the factors (a loss on logits.transpose(1, 2) sends a
            # transposed gradient)
            x, g = call.inputs, call.grads[0].contiguous()
            call.grads[0] = g
            g = g.reshape(-1, g.shape[-1])
            if x.is_floating_point():  # Linear: Σ_s a_s (x_s · c), without a float64 copy of the large a
                xc = x.reshape(-1, x.shape[-1]).to(torch.float64) @ c
                wide = torch.promote_types(g.dtype, torch.float32)
                total += (g.T.to(wide) @ xc.to(wide)).to(torch.float64)
            else:  # Embedding: Σ_t e_{tok_t} (G_t · c), padding positions excluded
                tokens, gc_rows = x.reshape(-1), g.to(torch.float64) @ c
                pad = self.embeddings[0].padding_idx
                if pad is not None:
                    tokens, gc_rows = tokens[tokens != pad], gc_rows[tokens != pad]
                total.index_add_(0, tokens, gc_rows)
        tol = max(1e-4, 20 * eps)
        if gc is None or (total - gc).norm() > tol * gc.norm() + 1e-300:
            self.clear()
            raise NotExact("the gradient reaching its weight is not the sum of its module calls (is the weight also "
                           "used outside the modules' forward, e.g. F.linear(h, emb.weight) or emb.weight[:T]?)")

    def sample_first(self, call: Call, n: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """``(tokens, output grad)`` of an Embedding call (tokens stay integers; the sample axis is the one
        of size ``n`` among all token axes) or ``(input, output grad)`` of a Linear call, sample axis first."""
        x, g = call.inputs, call.grads[0]
        if x.is_floating_point():  # a Linear's input (an Embedding looks up integer tokens)
            axis = find_sample_axis(x.shape, n, range(x.dim() - 1), "input", self.probed)
            return x.movedim(axis, 0).to(dtype), g.movedim(axis, 0).to(dtype)
        axis = find_sample_axis(x.shape, n, range(x.dim()), "tokens", self.probed)
        return x.movedim(axis, 0), g.movedim(axis, 0).to(dtype)

    def _factors(self, calls: List[Tuple[Tensor, Tensor]], mask: Mask) -> Factors:
        V, D = self.module.weight.shape
        n = calls[0][0].shape[0]
        dtype, device = calls[0][1].dtype, calls[0][1].device
        tokens, token_grads, inputs, input_grads = [], [], [], []
        for x, g in calls:
            if x.is_floating_point():
                inputs.append(x.reshape(n, -1, D))
                input_grads.append(g.reshape(n, -1, V))
            elif mask[0]:  # a frozen table has no embedding terms
                tokens.append(x.reshape(n, -1))
                token_grads.append(g.reshape(n, -1, D))
        limit = int(2 / torch.finfo(dtype).eps)  # every integer up to 2^(mantissa bits + 1) is exact
        if tokens and V > limit:
            raise NotExact(f"its {V} tokens cannot travel exactly as {dtype} (at most {limit}); use "
                           "curvature_dtype=torch.float64")
        tok = _positions(tokens, torch.zeros(n, 0, dtype=torch.long, device=device))
        G = _positions(token_grads, torch.zeros(n, 0, D, dtype=dtype, device=device))
        a = _positions(input_grads, torch.zeros(n, 0, V, dtype=dtype, device=device))
        x = _positions(inputs, torch.zeros(n, 0, D, dtype=dtype, device=device))
        columns = ([x] if mask[0] else []) + ([torch.ones_like(x[..., :1])] if mask[1] else [])
        x_tilde = torch.cat(columns, 2)
        count = torch.full((n, 1), tok.shape[1], dtype=dtype, device=device)
        return Factors(torch.cat([G.reshape(n, -1), a.reshape(n, -1)], 1),
                       torch.cat([count, tok.to(dtype), x_tilde.reshape(n, -1)], 1))

    def _unpack(self, factors: Factors) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Inverse of :meth:`_factors`: tokens ``(N, T)``, their output grads ``(N, T, D)``, the Linear
        inputs ``x̃ (N, S, D_t)`` and output grads ``(N, S, V)``."""
        V, D = self.module.weight.shape
        grad_side, input_side, mask = factors.grad_side, factors.input_side, factors.mask
        n = grad_side.shape[0]
        T = int(input_side[0, 0])
        S = (grad_side.shape[1] - T * D) // V
        tok = input_side[:, 1:1 + T].round().long()
        x_tilde = input_side[:, 1 + T:].reshape(n, S, D * mask[0] + mask[1])
        return tok, grad_side[:, :T * D].reshape(n, T, D), x_tilde, grad_side[:, T * D:].reshape(n, S, V)

    # ----------------------------------------------------------------- curvature
    def _implicit(self, settings: RouteSettings, d_t: int, positions: int) -> bool:
        """Whether the Linear positions are compressed: ``route="implicit"``, or in ``auto`` a head with at
        least ``implicit_threshold`` entries and more positions than ``svd_rank``."""
        if settings.route != "auto":
            return settings.route == "implicit"
        return self.module.weight.shape[0] * d_t >= settings.implicit_threshold and positions > settings.svd_rank

    def _route(self, factors: Factors, scale: float, settings: RouteSettings, generator) -> Route:
        tok, G, x_tilde, a = self._unpack(factors)
        n = tok.shape[0]
        padding_idx = self.embeddings[0].padding_idx if self.embeddings else None
        sample, token, A = sketch.token_pairs(tok, G * scale, padding_idx)
        tensors = {"sample": sample, "token": token, "A": A}
        self.positions = (tok.shape[1], x_tilde.shape[1])
        cls = TokenRoute
        if x_tilde.shape[1]:
            Gl = (a * scale).transpose(1, 2).unsqueeze(1)  # (N, 1, V, S)
            Xl = x_tilde.transpose(1, 2).unsqueeze(1)  # (N, 1, D_t, S)
            if self._implicit(settings, Xl.shape[2], Xl.shape[3]):
                Gl, Xl, _ = sketch.low_rank(Gl, Xl, settings.svd_rank)
                cls = ImplicitTokenRoute
            tensors.update(G=Gl, X=Xl)
        return cls(tensors, {"n": n})

    def estimated_cost(self, n: int, settings: RouteSettings) -> float:
        """Refresh (amortised) and apply: token coincidences ``≤ n²·T·D``, the Linear Gram ``(n·S)²·(V + D)``
        and the cross products ``n²·T·S·D``; the apply ``n·T·D + 2·n·S·V·D`` plus ``V·D``."""
        V, D = self.module.weight.shape
        T, S = self.positions
        if self.linears and self._implicit(settings, D + 1, S):
            S = min(S, settings.svd_rank)
        refresh = n * n * T * D + (n * S) ** 2 * (V + D) + n * n * T * S * D
        return refresh / settings.update_freq + n * T * D + 2 * n * S * V * D + V * D

    # ----------------------------------------------------------------- apply
    def grad_parts(self, mask: Mask, dtype: torch.dtype) -> Optional[List[Tensor]]:
        """``[Θ (V, D_t)]``: the table's gradient, with the bias's as a last column while both are trainable."""
        params = self.trainable_params(mask)
        if any(p.grad is None or p.grad.is_sparse for p in params):
            return None
        return self.parts_of([p.grad for p in params], mask, dtype)

    def parts_of(self, tensors: List[Tensor], mask: Mask, dtype: torch.dtype) -> List[Tensor]:
        columns = [t if t.dim() == 2 else t[:, None] for t in tensors]
        return [(columns[0] if len(columns) == 1 else torch.cat(columns, 1)).to(dtype)]

    def to_params(self, parts: List[Tensor], mask: Mask) -> List[Tensor]:
        theta, out, start = parts[0], [], 0
        for p in self.trainable_params(mask):
            width = p.shape[1] if p.dim() == 2 else 1
            out.append(theta[:, start:start + width].reshape(p.shape))
            start += width
        return out


class TiedLinearLayer(LinearLayer):
    """Linear modules sharing one weight (and one bias or none): one Linear layer whose calls from every
    module are further positions of the same per-sample gradient."""

    keeps_others_when_replaced = False  # a weight shared over modules: one replaced breaks the tie

    def __init__(self, name: str, modules: Sequence[nn.Module]):
        super().__init__(name, modules[0])
        self._modules = list(modules)

    def modules(self) -> List[nn.Module]:
        return list(self._modules)
