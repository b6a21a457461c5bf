"""The three ways of applying one layer's ``U``: explicit, Gram and implicit (low rank).

A route holds what a layer needs between curvature refreshes and answers three questions about a
gradient given as ``parts`` (the layer's trainable parameter gradients, weight first, in the route's
shapes: ``(groups, d_out, d_in)`` and ``(groups, d_out)`` for Linear/Conv, flat for norm layers):
``gram()`` (``UUᵀ``, possibly sketched, ``(N, N)``), ``u_dot(parts)`` (``U g``, ``(N,)``) and
``apply(parts, v, λ)`` (``(g − Uᵀv)/λ``, as parts). The factors it receives are already scaled so that
``U``'s rows are ``√N·J_n`` (mean reduction) or ``J_n/√N`` (sum reduction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import sketch

ROUTES = ("explicit", "gram", "implicit")
# Route rules besides a forced route: "auto" (ours, by cost) and "threshold" (the SENG authors' rule).
ROUTE_RULES = ("auto", "threshold")

# Above this many elements an explicit U is never chosen automatically (≈ 256 MiB in float32).
EXPLICIT_MAX_ELEMENTS = 1 << 26


class Route:
    """Base class; subclasses hold route-specific tensors in ``tensors`` and plain values in ``options``."""

    name = ""

    def __init__(self, tensors: Dict[str, Tensor], options: Optional[dict] = None):
        self.tensors = tensors
        self.options = dict(options or {})

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the route holds, caches included."""
        cached = [v for v in vars(self).values() if isinstance(v, Tensor)]
        return sum(t.nbytes for t in list(self.tensors.values()) + cached)

    def gram(self, generator: Optional[torch.Generator]) -> Tensor:
        raise NotImplementedError

    def u_dot(self, parts: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    def apply(self, parts: Sequence[Tensor], v: Tensor, damping: float) -> List[Tensor]:
        raise NotImplementedError

    def apply_(self, parts: Sequence[Tensor], v: Tensor, damping: float) -> None:
        """:meth:`apply` written into ``parts`` (the gradients' own storage); by default through a copy."""
        for part, d in zip(parts, self.apply(parts, v, damping)):
            part.copy_(d)

    def state_dict(self) -> dict:
        return {"name": self.name, "tensors": dict(self.tensors), "options": dict(self.options)}


class ExplicitRoute(Route):
    """``U`` materialised, ``(N, d)``, its columns in blocks of ``options["blocks"]`` sizes, one per part.
    With ``sketch_size = s < d`` the Gram and ``U g`` use ``s`` sampled coordinates rescaled by ``d/s``
    (unbiased); ``Uᵀ v`` uses all coordinates."""

    name = "explicit"

    @classmethod
    def build(cls, U: Tensor, blocks: Sequence[int], sketch_size: Optional[int], generator) -> "ExplicitRoute":
        tensors = {"U": U}
        d = U.shape[1]
        if sketch_size is not None and sketch_size < d:
            tensors["index"] = sketch.sample_indices(d, sketch_size, generator, U.device)
        return cls(tensors, {"blocks": [int(b) for b in blocks]})

    def _blocks(self):
        start = 0
        for size in self.options["blocks"]:
            yield slice(start, start + size)
            start += size

    def _sampled_columns(self) -> Tensor:
        """``U[:, index]``, gathered once per refresh (not per step) and kept beside ``U``."""
        cols = getattr(self, "_columns", None)
        if cols is None:
            cols = self._columns = self.tensors["U"].index_select(1, self.tensors["index"])
        return cols

    def gram(self, generator) -> Tensor:
        U, index = self.tensors["U"], self.tensors.get("index")
        if index is None:
            return sketch.self_gram(U)
        return sketch.self_gram(self._sampled_columns()).mul_(U.shape[1] / index.numel())

    def u_dot(self, parts: Sequence[Tensor]) -> Tensor:
        U, index = self.tensors["U"], self.tensors.get("index")
        if index is None:
            return sum(U[:, cols] @ part.reshape(-1) for cols, part in zip(self._blocks(), parts))
        flat = torch.cat([part.reshape(-1) for part in parts])
        return (self._sampled_columns() @ flat[index]) * (U.shape[1] / index.numel())

    def apply(self, parts: Sequence[Tensor], v: Tensor, damping: float) -> List[Tensor]:
        U = self.tensors["U"]
        return [torch.addmv(part.reshape(-1), U[:, cols].T, v, beta=1 / damping, alpha=-1 / damping).reshape(part.shape)
                for cols, part in zip(self._blocks(), parts)]

    def apply_(self, parts: Sequence[Tensor], v: Tensor, damping: float) -> None:
        U = self.tensors["U"]
        for cols, part in zip(self._blocks(), parts):
            part.view(-1).addmv_(U[:, cols].T, v, beta=1 / damping, alpha=-1 / damping)


class GramRoute(Route):
    """Factors ``G (N, groups, d_out, P)`` and ``X (N, groups, d_in, P)`` kept; ``U`` never built. The
    bias's input row is ones (``options["bias"]``) or, after a low-rank projection, ``xb (N, groups, P)``."""

    name = "gram"

    @classmethod
    def build(cls, G: Tensor, X: Tensor, bias: bool) -> "GramRoute":
        return cls({"G": G, "X": X}, {"bias": bias})

    def _split(self, parts: Sequence[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        has_weight = self.tensors["X"].shape[2] > 0
        return (parts[0] if has_weight else None), (parts[-1] if self.options["bias"] else None)

    def gram(self, generator) -> Tensor:
        return sketch.patch_gram(self.tensors["G"], self.tensors["X"], self.options["bias"])

    def plain(self) -> Optional[Tuple[Tensor, Tensor]]:
        """``(G (N, d_out), X (N, d_in))``, views, when the factors are a plain Linear's on 2-D inputs (one group,
        one position, the bias row ones), else ``None``; found once (a tuple, so ``nbytes`` does not count it)."""
        views = getattr(self, "_views", False)
        if views is False:
            G, X = self.tensors["G"], self.tensors["X"]
            plain = G.shape[1] == 1 and G.shape[3] == 1 and "xb" not in self.tensors
            views = self._views = (G[:, 0, :, 0], X[:, 0, :, 0]) if plain else None
        return views

    def u_dot(self, parts: Sequence[Tensor]) -> Tensor:
        views = self.plain()
        if views is not None:
            Ww, Wb = self._split(parts)
            return sketch.linear_u_dot(*views, None if Ww is None else Ww[0], None if Wb is None else Wb[0])
        return sketch.patch_u_dot(self.tensors["G"], self.tensors["X"], *self._split(parts), self.tensors.get("xb"))

    def apply(self, parts: Sequence[Tensor], v: Tensor, damping: float) -> List[Tensor]:
        Ww, Wb = self._split(parts)
        out = sketch.patch_apply(self.tensors["G"], self.tensors["X"], v, Ww, Wb, damping, self.tensors.get("xb"))
        return [d for d in out if d is not None]

    def apply_(self, parts: Sequence[Tensor], v: Tensor, damping: float) -> None:
        Ww, Wb = self._split(parts)
        views = self.plain()
        if views is not None:
            sketch.linear_apply(*views, v, None if Ww is None else Ww[0], None if Wb is None else Wb[0], damping,
                                inplace=True)
        else:
            sketch.patch_apply(self.tensors["G"], self.tensors["X"], v, Ww, Wb, damping, self.tensors.get("xb"),
                               inplace=True)


class ImplicitRoute(GramRoute):
    """The paper's sketch for large layers: each ``G_n`` truncated to rank ``p`` by SVD; the Gram
    optionally from ``sketch_size`` sampled rows of ``Ĝ`` and ``X̂`` (unbiased; a new draw every refresh).

    With ``sampled_u_dot`` (the SENG authors' column sampling) the rows drawn for the Gram are kept until the
    next refresh and ``U g`` uses them too, rescaled by ``(d_out/s_g)·(d_in/s_x)`` (unbiased); otherwise ``U g``
    is exact for the truncated factors. ``Uᵀv`` always uses all rows."""

    name = "implicit"

    @classmethod
    def build(cls, G: Tensor, X: Tensor, bias: bool, rank: int, sketch_size: Optional[int] = None,
              sampled_u_dot: bool = False) -> "ImplicitRoute":
        g_hat, x_hat, xb = sketch.low_rank(G, X, rank, bias)
        tensors = {"G": g_hat, "X": x_hat}
        if xb is not None:
            tensors["xb"] = xb
        return cls(tensors, {"bias": bias, "sketch_size": sketch_size, "sampled_u_dot": bool(sampled_u_dot)})

    def _inputs(self) -> Tensor:
        """``X̂`` with the projected bias row ``x̂b`` below it, where there is one: ``(N, groups, d_in', p)`` (the bias
        row is an ordinary input row for the Gram and for sampling)."""
        X, xb = self.tensors["X"], self.tensors.get("xb")
        return X if xb is None else torch.cat([X, xb[:, :, None, :]], dim=2)

    def gram(self, generator) -> Tensor:
        s = self.options.get("sketch_size")
        if s is not None and self.options.get("sampled_u_dot"):
            return sketch.patch_gram(*self._sampled(generator))
        G, X = self.tensors["G"], self._inputs()
        if s is not None:
            G = sketch.sample_rows(G, s, 2, generator)
            X = sketch.sample_rows(X, s, 2, generator)
        return sketch.patch_gram(G, X)

    def _sampled(self, generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
        """The rows of ``Ĝ`` and of ``X̂`` (its bias row one of them) drawn at this refresh, each scaled by
        ``sqrt(rows / drawn)``. The indices are drawn once and kept in ``tensors`` (so they are saved); the rows
        are cached beside them until the next refresh."""
        if getattr(self, "_rows_g", None) is None:
            G, X = self.tensors["G"], self._inputs()
            s = self.options["sketch_size"]
            if "index_g" not in self.tensors:
                self.tensors["index_g"] = sketch.sample_indices(G.shape[2], min(s, G.shape[2]), generator, G.device)
                self.tensors["index_x"] = sketch.sample_indices(X.shape[2], min(s, X.shape[2]), generator, X.device)
            ig, ix = self.tensors["index_g"], self.tensors["index_x"]
            self._rows_g = G.index_select(2, ig) * (G.shape[2] / ig.numel()) ** 0.5
            self._rows_x = X.index_select(2, ix) * (X.shape[2] / ix.numel()) ** 0.5
        return self._rows_g, self._rows_x

    def u_dot(self, parts: Sequence[Tensor]) -> Tensor:
        if self.options.get("sketch_size") is None or not self.options.get("sampled_u_dot"):
            return super().u_dot(parts)
        G, X = self._sampled(None)
        ig, ix = self.tensors["index_g"], self.tensors["index_x"]
        # the drawn output rows first (a copy of s_g rows, not of the whole gradient), then the bias column
        Ww, Wb = (None if W is None else W.index_select(1, ig) for W in self._split(parts))
        W = Ww if Wb is None else (Wb[..., None] if Ww is None else torch.cat([Ww, Wb[..., None]], dim=2))
        # the cached rows carry sqrt(rows/drawn) each; U g has one factor of each, so it needs the other root
        rows_x = self.tensors["X"].shape[2] + ("xb" in self.tensors)
        scale = (self.tensors["G"].shape[2] / ig.numel() * rows_x / ix.numel()) ** 0.5
        return sketch.patch_u_dot(G, X, W.index_select(2, ix)) * scale


ROUTE_CLASSES = {cls.name: cls for cls in (ExplicitRoute, GramRoute, ImplicitRoute)}


def route_from_state(state: dict) -> Route:
    cls = ROUTE_CLASSES[state["name"]]
    return cls(dict(state["tensors"]), state.get("options"))


@dataclass
class RouteSettings:
    """The knobs that choose and shape a route (validated by the preconditioner)."""

    route: str = "auto"
    sketch_size: Optional[int] = None
    column_sample_size: Optional[int] = None
    svd_rank: int = 16
    implicit_threshold: int = 700_000
    update_freq: int = 10

    @property
    def coordinates(self) -> Optional[int]:
        """Coordinates of ``U`` sampled on an explicit route: ``sketch_size``, or the authors' ``s²``."""
        s = self.column_sample_size
        return self.sketch_size if s is None else s * s

    @property
    def rows(self) -> Optional[int]:
        """Rows of ``Ĝ`` and of ``X̂`` sampled on an implicit route: ``sketch_size``, or the authors' ``s``."""
        return self.sketch_size if self.column_sample_size is None else self.column_sample_size


def route_costs(n: int, groups: int, d_out: int, d_in: int, positions: int, settings: RouteSettings) -> Dict[str, float]:
    """Multiply-adds of one refresh amortised over ``update_freq`` steps plus one apply, per route."""
    d = groups * d_out * d_in
    P = positions
    K = settings.update_freq
    s = min(settings.coordinates or d, d)
    explicit = (n * d * P + n * n * s) / K + 2 * n * d
    gram = (n * n * P * P * groups * (d_out + d_in)) / K + 2 * n * P * d
    p = min(settings.svd_rank, d_out, P)
    rows = min(settings.rows or (d_out + d_in), d_out + d_in)
    implicit = (n * groups * d_out * P * min(d_out, P) + n * n * p * p * groups * rows) / K + 2 * n * p * d
    return {"explicit": explicit, "gram": gram, "implicit": implicit}


def choose_route(n: int, groups: int, d_out: int, d_in: int, positions: int, settings: RouteSettings) -> str:
    """The forced route; in ``threshold`` mode the SENG authors' rule: implicit for layers with more than
    ``implicit_threshold`` parameters whatever their positions, explicit for all others (no memory cap); in
    ``auto`` mode: implicit for layers with at least ``implicit_threshold`` parameters whose positions exceed
    ``svd_rank``, otherwise the cheaper exact route (explicit only while ``N·d`` stays under a memory cap)."""
    d = groups * d_out * d_in
    if settings.route == "threshold":
        return "implicit" if d > settings.implicit_threshold else "explicit"
    if settings.route != "auto":
        return settings.route
    if d >= settings.implicit_threshold and positions > settings.svd_rank:
        return "implicit"
    costs = route_costs(n, groups, d_out, d_in, positions, settings)
    if n * d <= EXPLICIT_MAX_ELEMENTS and costs["explicit"] < costs["gram"]:
        return "explicit"
    return "gram"


def build_route(G: Tensor, X: Tensor, bias: bool, settings: RouteSettings, generator) -> Route:
    """Build the chosen route from scaled factors ``G (N, groups, d_out, P)``, ``X (N, groups, d_in, P)``
    (``bias``: an implicit row of ones below ``X``)."""
    n, groups, d_out, P = G.shape
    d_in = X.shape[2] + bias
    name = choose_route(n, groups, d_out, d_in, P, settings)
    if name == "explicit":
        blocks = ([groups * d_out * X.shape[2]] if X.shape[2] else []) + ([groups * d_out] if bias else [])
        return ExplicitRoute.build(sketch.per_sample_grads(G, X, bias), blocks, settings.coordinates, generator)
    if name == "implicit":
        return ImplicitRoute.build(G, X, bias, settings.svd_rank, settings.rows,
                                   sampled_u_dot=settings.column_sample_size is not None)
    return GramRoute.build(G, X, bias)
