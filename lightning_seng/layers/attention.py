"""``nn.MultiheadAttention``: the input projections (packed or separate ``q/k/v`` weights, ``in_proj_bias``,
``bias_k``/``bias_v``) as one layer, and ``out_proj`` as a Linear layer fed by it.

The module calls ``F.multi_head_attention_forward`` with its weights, so no hook of ``out_proj`` fires and
the projections' outputs never appear outside. At a refresh each captured call is recomputed: with
``q' = query W_qᵀ + b_q`` (``k'``, ``v'`` likewise) as leaves, the attention runs on them through
``F.multi_head_attention_forward`` with identity projections (same masks, ``is_causal``, dropout and the
random state its dropout drew from), which gives ``ctx``, ``out_proj``'s input. The call counts only if
``out = ctx W_oᵀ + b_o`` reproduces the captured output (else :class:`NotExact`); then one backward of the
captured output gradient ``G_out`` gives ``G_q, G_k, G_v = ∂⟨out, G_out⟩/∂(q', k', v')``.

Per sample ``n`` the gradients are then those of linear maps:

    out_proj:  J_n = Σ_t G_out[n,t] ⊗ [ctx[n,t]; 1]
    in_proj:   J_n = [Σ_t G_q[n,t] ⊗ [query[n,t]; 1];  Σ_s G_k[n,s] ⊗ [key[n,s]; 1];  Σ_s G_v[n,s] ⊗ [value[n,s]; 1]]

and ``bias_k``, ``bias_v`` (an extra key/value position appended after projection) add ``G_k``/``G_v`` of
that position. In-proj factors are three groups ``(q, k, v)`` of a matrix ``M (3, E, D)``: columns ``0..d``
take the inputs (``d = max(E, kdim, vdim)``, narrower ones zero-padded), then one column for
``in_proj_bias`` (input 1) and one for ``bias_k``/``bias_v`` (input 1 at the extra position only); shorter
sequences are zero-padded. Padding adds zero rows and columns to ``U`` and nothing to ``UUᵀ``, so it is
exact. For self-attention (``query is key is value``) the three groups share their input and are packed as
one group of ``3E`` outputs.
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, Factors, Mask, MatrixLayer, NotExact, find_sample_axis, not_reached
from .linear import LinearLayer

_FORWARD = inspect.signature(nn.MultiheadAttention.forward)
_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v")

# Largest relative difference (per sample, in norm) between the recomputed and the captured output that
# still counts as the same call; a different dropout mask or mask reading moves it by orders more.
_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# float32 matmuls under torch.set_float32_matmul_precision: TF32 ("high") or bfloat16 ("medium") products
_REDUCED_FLOAT32 = {"high": 1e-2, "medium": 5e-2}


def plain_projections(module: nn.MultiheadAttention) -> bool:
    """Whether the projection tensors the forward reads are the module's registered parameters (not
    tensors computed from others by a weight-norm style pre-hook)."""
    return all(getattr(module, k, None) is module._parameters.get(k) for k in _PROJECTIONS)


def _rng_state(device: torch.device) -> Tensor:
    return torch.get_rng_state() if device.type == "cpu" else getattr(torch, device.type).get_rng_state(device)


def _autocast_state(device_type: str) -> Tuple[bool, torch.dtype]:
    """Whether autocast is on for ``device_type`` now, and its dtype."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    if device_type == "cpu":
        return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


@contextmanager
def _replayed_rng(saved: Optional[Tuple[torch.device, Tensor]]) -> Iterator[None]:
    """Draw from the random state ``saved`` (device, state) inside, and restore the current one after."""
    if saved is None:
        yield
        return
    device, state = saved
    current = _rng_state(device)
    restore = torch.set_rng_state if device.type == "cpu" else (
        lambda s: getattr(torch, device.type).set_rng_state(s, device))
    restore(state)
    try:
        yield
    finally:
        restore(current)


def _pad_key(mask: Optional[Tensor]) -> Optional[Tensor]:
    """One more key position, attended (``False`` / ``0.0``): room for ``bias_k``/``bias_v``."""
    return None if mask is None else torch.cat([mask, mask.new_zeros(mask.shape[:-1] + (1,))], dim=-1)


def _check_reproduced(recomputed: Tensor, captured: Tensor) -> None:
    """:class:`NotExact` unless ``recomputed`` equals ``captured`` (``(T, N, E)``) to the rounding of the
    computation's dtype, sample by sample (one host read)."""
    tol = _TOLERANCE.get(captured.dtype, 1e-2)
    if captured.dtype == torch.float32:
        tol = _REDUCED_FLOAT32.get(torch.get_float32_matmul_precision(), tol)
    err = torch.linalg.vector_norm((recomputed - captured).double(), dim=(0, 2))
    size = torch.linalg.vector_norm(captured.double(), dim=(0, 2))
    # the floor keeps a sample whose output is near zero from demanding more than the batch's rounding;
    # a NaN in the recompute fails; a non-finite call passes (SENG skips that refresh as a whole)
    same = (err <= tol * (size + 1e-3 * size.mean())).all() | ~torch.isfinite(captured).all()
    if not bool(same):
        worst = float((err / size.clamp_min(1e-300)).max())
        raise NotExact(f"recomputing its call did not reproduce the output (relative difference {worst:.2e}): "
                       "its dropout's random draws were consumed or changed between the forward pre-hook and the "
                       "attention, or the module was changed after the forward")


class AttentionLayer(MatrixLayer):
    """The input projections of one ``nn.MultiheadAttention`` (the parameters it owns itself)."""

    kind = "attention"
    groups = 3

    def __init__(self, name: str, module: nn.MultiheadAttention, with_out_proj: bool = True):
        """``with_out_proj``: give ``module.out_proj`` a layer this one feeds (the caller has checked that it
        is a plain ``nn.Linear``)."""
        super().__init__(name, module)
        out_name = f"{name}.out_proj" if name else "out_proj"
        self.feeds = [OutProjection(out_name, module.out_proj)] if with_out_proj else []
        self._rng: Optional[Tuple[torch.device, Tensor]] = None
        m = module
        self._width = max(m.embed_dim, m.kdim, m.vdim)  # d: input columns of M
        self._bias_col = self._width + (m.in_proj_bias is not None)  # column of bias_k / bias_v
        self._columns = self._bias_col + (m.bias_k is not None)  # D

    # ----------------------------------------------------------------- parameters
    def param_slots(self) -> Sequence[Optional[nn.Parameter]]:
        m = self.module
        weights = (m.in_proj_weight,) if m._qkv_same_embed_dim else (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        return weights + (m.in_proj_bias, m.bias_k, m.bias_v)

    def _slot_views(self, M: Tensor) -> List[Optional[Tensor]]:
        """Views of ``M (3, E, D)`` in :meth:`param_slots` order (``None`` for absent slots)."""
        m = self.module
        if m._qkv_same_embed_dim:
            views = [M[:, :, :m.embed_dim]]
        else:
            views = [M[g, :, :width] for g, width in enumerate((m.embed_dim, m.kdim, m.vdim))]
        views.append(M[:, :, self._width] if m.in_proj_bias is not None else None)
        has_kv = m.bias_k is not None
        views += [M[1, :, self._bias_col], M[2, :, self._bias_col]] if has_kv else [None, None]
        return views

    def _on(self, mask: Mask) -> Tuple[Tuple[bool, bool, bool], bool, bool, bool]:
        """Which parts are trainable: the ``(q, k, v)`` weights, ``in_proj_bias``, ``bias_k``, ``bias_v``."""
        weights = (mask[0],) * 3 if self.module._qkv_same_embed_dim else tuple(mask[:3])
        return weights, mask[-3], mask[-2], mask[-1]

    def _matrix_dims(self) -> Tuple[int, int]:
        return 3 * self.module.embed_dim // self.groups, self._columns

    def parts_of(self, tensors: List[Tensor], mask: Mask, dtype: torch.dtype) -> List[Tensor]:
        """The tensors as ``M`` shaped like the committed route's factors (``(1, 3E, D)`` packed or
        ``(3, E, D)``); frozen and padded entries are zero."""
        E = self.module.embed_dim
        M = torch.zeros(3, E, self._columns, dtype=dtype, device=tensors[0].device)
        given = iter(tensors)
        for view, on in zip(self._slot_views(M), mask):
            if on:
                view.copy_(next(given).reshape(view.shape))
        G = self.curvature.route.tensors.get("G") if self.curvature is not None else None
        groups = 1 if G is None else G.shape[1]  # an explicit U is the same for either grouping
        return [M.reshape(groups, 3 * E // groups, self._columns)]

    def to_params(self, parts: List[Tensor], mask: Mask) -> List[Tensor]:
        M = parts[0].reshape(3, self.module.embed_dim, self._columns)
        return [view.reshape(p.shape) for view, p, on in zip(self._slot_views(M), self.param_slots(), mask) if on]

    # ----------------------------------------------------------------- capture
    def before_call(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        m = self.module
        self._rng = None
        if m.training and m.dropout > 0:
            query = args[0] if args else kwargs["query"]
            self._rng = (query.device, _rng_state(query.device))

    def keep(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """Every argument of the call (bound to ``MultiheadAttention.forward``), detached, with whether
        it is self-attention, the training flag, dropout, random state and autocast state it ran with."""
        bound = _FORWARD.bind(self.module, *args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        del a["self"]
        a["self_attention"] = a["query"] is a["key"] and a["key"] is a["value"]
        for key in ("query", "key", "value", "key_padding_mask", "attn_mask"):
            if isinstance(a[key], Tensor):
                a[key] = a[key].detach()
        device = a["query"].device.type
        a.update(training=self.module.training, dropout=self.module.dropout, rng=self._rng, device_type=device,
                 autocast=_autocast_state(device))
        self._rng = None
        return a

    def output_tensors(self, output: Any) -> List[Tensor]:
        return [output[0]]  # attn_output; the attention weights are not a path to the parameters' use

    def capture(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> List[Any]:
        last = self._calls[-1] if self._calls else None
        edges = super().capture(args, kwargs, output)
        if self._calls and self._calls[-1] is not last:
            self._calls[-1].inputs["output"] = output[0].detach()
        return edges

    def clear(self) -> None:
        super().clear()
        self._rng = None

    # ----------------------------------------------------------------- refresh
    def take_calls(self) -> List[Call]:
        """The captured calls, recomputed (see the module docstring); feeds ``out_proj``'s layer its calls.
        Each returned call holds the batch-first projection inputs and output gradients."""
        calls = super().take_calls()
        if not calls or not (any(self.trainable()) or self.feeds):
            return []
        try:
            recomputed = [self._recompute(call) for call in calls]
        except NotExact as reason:
            for sub in self.feeds:
                sub.fail(f"its input is computed inside '{self.name}', which has no exact curvature now ({reason})")
            raise
        for call, (ctx, grad, sampled) in recomputed:
            for sub in self.feeds:
                sub.feed(ctx, grad, sampled)
        return [call for call, _ in recomputed]

    def sampled_calls(self, calls: List[Call]) -> List[Call]:
        """``fisher="mc"``: the recomputed calls' parts from the sampled loss's output gradient."""
        if any(call.inputs.get("sampled") is None for call in calls):
            raise not_reached()
        return [Call(call.inputs["sampled"], []) for call in calls]

    def _projections(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool) -> Tuple[Tensor, ...]:
        """``(q', k', v')`` as the module computes them (one packed product for self-attention)."""
        m = self.module
        bias = m.in_proj_bias.detach() if m.in_proj_bias is not None else None
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None,) * 3
        if m._qkv_same_embed_dim:
            weight = m.in_proj_weight.detach()
            if self_attention:
                return F.linear(query, weight, bias).chunk(3, dim=-1)
            w_q, w_k, w_v = weight.chunk(3)
        else:
            w_q, w_k, w_v = (w.detach() for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _recompute(self, call: Call) -> Tuple[Call, Tuple[Tensor, Tensor, Optional[Tensor]]]:
        """One call recomputed: ``(Call(parts), (ctx, G_out, sampled G_out or None))``, all batch first
        ``(N, T, ·)``; with ``fisher="mc"`` the parts hold those of the sampled output gradient at ``"sampled"``."""
        m, a = self.module, call.inputs
        query, key, value = a["query"], a["key"], a["value"]
        if query.dim() != 3:
            raise NotExact(f"its query of shape {tuple(query.shape)} is unbatched, so it has no sample axis")
        seq_first = (lambda t: t.transpose(0, 1)) if m.batch_first else (lambda t: t)  # F.mha's (T, N, ·)
        dropout = a["dropout"] if a["training"] else 0.0
        if dropout > 0 and a["rng"] is None:
            raise NotExact("its dropout drew from a random state that was not recorded (SENG's forward pre-hook "
                           "did not run)")
        E, n = m.embed_dim, query.shape[0 if m.batch_first else 1]
        weight_o = m.out_proj.weight.detach()
        bias_o = m.out_proj.bias.detach() if m.out_proj.bias is not None else None
        with torch.enable_grad(), _replayed_rng(a["rng"]), warnings.catch_warnings(), \
                torch.autocast(a["device_type"], a["autocast"][1], enabled=a["autocast"][0]):
            warnings.simplefilter("ignore")  # mask warnings were given by the call itself
            q, k, v = (t.detach().requires_grad_() for t in
                       self._projections(seq_first(query), seq_first(key), seq_first(value), a["self_attention"]))
            leaves = [q, k, v]
            key_padding_mask, attn_mask = a["key_padding_mask"], a["attn_mask"]
            if m.bias_k is not None:
                # one copy per sample, so that their gradients are the per-sample ones
                extra = [b.detach().to(k.dtype).expand(1, n, E).clone().requires_grad_() for b in (m.bias_k, m.bias_v)]
                leaves += extra
                k, v = torch.cat([k, extra[0]]), torch.cat([v, extra[1]])
                key_padding_mask, attn_mask = _pad_key(key_padding_mask), _pad_key(attn_mask)
            eye = torch.eye(E, dtype=q.dtype, device=q.device)
            ctx, _ = F.multi_head_attention_forward(
                q, k, v, E, m.num_heads, None, None, None, None, m.add_zero_attn, dropout, eye, None,
                training=a["training"], key_padding_mask=key_padding_mask, need_weights=a["need_weights"],
                attn_mask=attn_mask, use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
                v_proj_weight=eye, average_attn_weights=a["average_attn_weights"], is_causal=a["is_causal"])
            out = F.linear(ctx, weight_o, bias_o)
            _check_reproduced(out.detach(), seq_first(a["output"]))
            grad_out = seq_first(call.grads[0])
            # fisher="mc": the sampled loss's output gradient through the same recomputation (None where it
            # did not reach the call: its layers fall back)
            sampled = None
            if self.sampled_fisher and call.sampled is not None and call.sampled[0] is not None:
                sampled = seq_first(call.sampled[0])
            grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), retain_graph=sampled is not None)
            grads_s = torch.autograd.grad(out, leaves, sampled.to(out.dtype)) if sampled is not None else None
        batch_first = (lambda t: t.transpose(0, 1))

        def parts_of(grads):
            return dict(shape=tuple(query.shape), self_attention=a["self_attention"],
                        inputs=[batch_first(seq_first(t)) for t in (query, key, value)],
                        grads=[batch_first(g) for g in grads[:3]],
                        extra=[g[0] for g in grads[3:]])  # bias_k, bias_v: (N, E)
        parts = parts_of(grads)
        parts["sampled"] = None if grads_s is None else parts_of(grads_s)
        return Call(parts, []), (batch_first(ctx.detach()), batch_first(grad_out),
                                 None if sampled is None else batch_first(sampled))

    def sample_first(self, call: Call, n: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """``(X (N, groups, D, P), G (N, groups, d_out, P))`` of one recomputed call."""
        c = call.inputs
        find_sample_axis(c["shape"], n, (0 if self.module.batch_first else 1,), "query")
        weights_on, bias_on, k_on, v_on = self._on(self.trainable())
        query, key, value = (t.to(dtype) for t in c["inputs"])
        g_q, g_k, g_v = (g.to(dtype) for g in c["grads"])
        E, d, D = self.module.embed_dim, self._width, self._columns
        N, L, S = query.shape[0], query.shape[1], key.shape[1]
        extra = bool(c["extra"]) and (k_on or v_on)  # the bias_k/bias_v position, while it has a trainable part
        g_kv = [g.to(dtype) if on else None for g, on in zip(c["extra"], (k_on, v_on))] if extra else []
        if c["self_attention"]:
            X = query.new_zeros(N, 1, D, L + extra)
            G = query.new_zeros(N, 1, 3 * E, L + extra)
            if weights_on[0]:
                X[:, 0, :E, :L] = query.transpose(1, 2)
            G[:, 0, :, :L] = torch.cat([g_q, g_k, g_v], dim=2).transpose(1, 2)
            spans = [slice(0, L)]
        else:
            P = max(L, S + extra)
            X = query.new_zeros(N, 3, D, P)
            G = query.new_zeros(N, 3, E, P)
            for group, (x, g, on) in enumerate(zip((query, key, value), (g_q, g_k, g_v), weights_on)):
                if on:
                    X[:, group, :x.shape[2], :x.shape[1]] = x.transpose(1, 2)
                G[:, group, :, :x.shape[1]] = g.transpose(1, 2)
            spans = [slice(0, L), slice(0, S), slice(0, S)]
        if bias_on:
            for group, span in enumerate(spans):
                X[:, group, d, span] = 1
        if extra:  # input 1 in the bias_k/bias_v column at the extra key position, after the L (or S) others
            at = L if c["self_attention"] else S
            for part, g in zip((1, 2), g_kv):
                group, rows = (0, slice(part * E, (part + 1) * E)) if c["self_attention"] else (part, slice(None))
                X[:, group, self._bias_col, at] = 1
                if g is not None:
                    G[:, group, rows, at] = g
        return X, G

    def _factors(self, calls: List[Tuple[Tensor, Tensor]], mask: Mask) -> Factors:
        """The calls' factors joined as further positions (packed calls unpacked if the calls differ)."""
        if len({x.shape[1] for x, _ in calls}) > 1:
            calls = [(x.expand(-1, 3, -1, -1), g.reshape(g.shape[0], 3, -1, g.shape[3])) if x.shape[1] == 1
                     else (x, g) for x, g in calls]
        X = torch.cat([x for x, _ in calls], dim=3)
        G = torch.cat([g for _, g in calls], dim=3)
        self.groups = X.shape[1]
        return Factors(G, X)

    def bias_row(self, mask: Mask) -> bool:
        return False  # the biases' ones are rows of X (the projections' columns)


class _FedCall(Call):
    """A call computed by the attention layer: inputs ``(N, T, E)`` and output gradient, batch first."""


class OutProjection(LinearLayer):
    """``MultiheadAttention.out_proj``: its forward never runs inside the attention, so its calls come from
    the attention layer's recompute (:meth:`feed`). Calls of the module itself (used elsewhere too) are
    captured by its own hook as usual and add their positions."""

    def __init__(self, name: str, module: nn.Linear):
        super().__init__(name, module)
        self._fed: List[Call] = []
        self._failure: Optional[str] = None

    def feed(self, ctx: Tensor, grad: Tensor, sampled: Optional[Tensor] = None) -> None:
        self._fed.append(_FedCall(ctx, [grad], None if sampled is None else [sampled]))
        self.captured = True  # for SENG: the module's calls are seen, though its own hooks never fire

    def fail(self, reason: str) -> None:
        self._failure = reason

    def clear(self) -> None:
        super().clear()
        self._fed, self._failure = [], None

    def take_calls(self) -> List[Call]:
        fed, failure = self._fed, self._failure
        calls = super().take_calls()
        if failure is not None:
            raise NotExact(failure)
        return fed + calls

    def sample_first(self, call: Call, n: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        if isinstance(call, _FedCall):
            x, g = call.inputs, call.grads[0]
            find_sample_axis(x.shape, n, (0,), "input")
            return x.to(dtype), g.to(dtype)
        return super().sample_first(call, n, dtype)
