"""Reduction of SENG over ``torch.distributed``.

:class:`Communicator` is the single-process identity that :class:`~lightning_seng.SENG` uses by
default; the ``local`` and ``global`` modes of DESIGN.md §1 subclass it.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .layers import Factors, LayerCurvature, RouteSettings


class Communicator:
    """How one SENG step talks to the other ranks. The base class is one process on its own."""

    def setup(self, layers: Dict[str, LayerCurvature], seng=None) -> None:
        """Called once by SENG with the layers it preconditions, by module name, and itself (for its
        settings: ``seng.loss_reduction``, ``seng.settings``, ``seng.curvature_dtype``)."""
        self.layers = layers

    def gather_factors(self, factors: Dict[str, Optional[Factors]]) -> Dict[str, Optional[Factors]]:
        """Refresh steps: the factors each layer builds its curvature from on this rank
        (``None``: build nothing here)."""
        return factors

    def agree(self, ok: bool) -> bool:
        """``True`` iff ``ok`` holds on every rank (a failed refresh is skipped everywhere)."""
        return ok

    def owns(self, name: str) -> bool:
        """Whether this rank computes the direction of layer ``name``."""
        return True

    def reduce_directions(self, directions: Dict[str, Optional[List[Tensor]]]) -> Dict[str, Optional[List[Tensor]]]:
        """Every step: this rank's directions (``None`` where not owner) to the final ones."""
        return directions


# ---------------------------------------------------------------------------------------------------
# DDP: the ``local`` and ``global`` modes over a ``torch.distributed`` process group.
#
# Every collective below is issued by every rank in the same order whatever its batch size, with
# buffer sizes derived either from the model (identical on all ranks) or from a small metadata
# exchange, so ranks with different batch sizes (the last batch of an epoch) cannot deadlock.
# ---------------------------------------------------------------------------------------------------

SENG_MODES = ("local", "global")

# Factor dtypes that can travel, by code in the metadata exchange.
_WIRE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Dimensions of one factor tensor described in the metadata (batch dimension included).
_MAX_NDIM = 6
# Metadata row of one layer on one rank: [present, dtype code, (ndim, *shape) for grad_side and input_side].
_META_WIDTH = 2 + 2 * (1 + _MAX_NDIM)
_N_COLUMN = 3  # grad_side.shape[0]: the layer's number of samples on that rank


def assign_owners(costs: Mapping[str, float], world_size: int) -> Dict[str, int]:
    """Owner rank of each layer by greedy longest-processing-time scheduling.

    Layers in decreasing ``costs`` order each go to the rank with the least cost assigned so far
    (ties: the lower rank; equal costs keep the mapping's order). The result is a pure function of
    its arguments, so every rank computes the same assignment without communicating.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1 (got {world_size!r})")
    loads = [0.0] * world_size
    owners: Dict[str, int] = {}
    for name in sorted(costs, key=lambda k: -costs[k]):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += costs[name]
    return owners


def make_comm(mode: str, **kwargs) -> "ProcessGroupComm":
    """The communicator of a distributed ``mode``: ``"local"`` -> :class:`LocalComm`,
    ``"global"`` -> :class:`GlobalComm` (``kwargs`` go to its constructor)."""
    if mode == "local":
        return LocalComm(**kwargs)
    if mode == "global":
        return GlobalComm(**kwargs)
    raise ValueError(f"seng_mode must be one of {list(SENG_MODES)} (got {mode!r})")


class ProcessGroupComm(Communicator):
    """What both DDP modes share: the process group, :meth:`agree`, and traffic counters.

    ``calls`` counts collectives issued by this rank and ``bytes_received`` the payload it received
    from other ranks, counted logically and independent of the backend's algorithm: ``S`` for an
    all-reduce or a broadcast (non-source ranks) of ``S`` bytes, the other ranks' parts for an
    all-gather or all-to-all. Both are cumulative; :meth:`traffic` returns them.

    Args:
        group: the process group (``None``: the default group). It must be initialised already.
    """

    def __init__(self, group: Optional["dist.ProcessGroup"] = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{type(self).__name__} needs an initialised torch.distributed process group "
                               "(torch.distributed.init_process_group, or a Lightning DDP strategy)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = torch.device("cpu")
        self.calls = 0
        self.bytes_received = 0

    def setup(self, layers: Dict[str, LayerCurvature], seng=None) -> None:
        super().setup(layers, seng)
        self.names = list(layers)
        params = [p for layer in layers.values() for p in layer.parameters()]
        if params:
            self.device = params[0].device
        # Directions travel in one dtype every rank derives from the model alone; SENG casts them to
        # the parameter dtype when it writes ``.grad``.
        self.wire_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32

    def traffic(self) -> Dict[str, int]:
        """Cumulative ``{"calls", "bytes_received"}`` of this rank."""
        return {"calls": self.calls, "bytes_received": self.bytes_received}

    def agree(self, ok: bool) -> bool:
        """One all-reduce (MIN) of a flag: a rank with a failed refresh makes every rank skip it."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        self._all_reduce(flag, dist.ReduceOp.MIN)
        return bool(flag.item())

    # ------------------------------------------------------------------ collectives, counted
    def _global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _all_reduce(self, tensor: Tensor, op: Optional["dist.ReduceOp"] = None) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        self.calls += 1
        if self.world_size > 1:
            self.bytes_received += tensor.numel() * tensor.element_size()

    def _broadcast(self, tensor: Tensor, src: int) -> None:
        dist.broadcast(tensor, src=self._global_rank(src), group=self.group)
        self.calls += 1
        if self.rank != src:
            self.bytes_received += tensor.numel() * tensor.element_size()

    def _all_gather(self, tensor: Tensor) -> List[Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.group)
        self.calls += 1
        self.bytes_received += (self.world_size - 1) * tensor.numel() * tensor.element_size()
        return parts

    def _all_to_all(self, send: Tensor, send_sizes: List[int], recv_sizes: List[int]) -> Tensor:
        recv = send.new_empty(sum(recv_sizes))
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group)
        self.calls += 1
        self.bytes_received += (sum(recv_sizes) - recv_sizes[self.rank]) * send.element_size()
        return recv

    # ------------------------------------------------------------------ direction buffers
    def _slots(self, names: Sequence[str]) -> List[Tuple[str, int, torch.Size]]:
        """``(layer, index, shape)`` of every trainable parameter of ``names``, in SENG's order."""
        slots = []
        for name in names:
            layer = self.layers[name]
            for i, p in enumerate(layer.trainable_params(layer.trainable())):
                slots.append((name, i, p.shape))
        return slots

    def _pack(self, slots, directions: Dict[str, Optional[List[Optional[Tensor]]]]) -> Tensor:
        """One flat buffer ``[flags | values]``: a presence flag per slot, then every slot's values
        (zeros where this rank has no direction)."""
        sizes = [shape.numel() for _, _, shape in slots]
        buffer = torch.zeros(len(slots) + sum(sizes), dtype=self.wire_dtype, device=self.device)
        offset = len(slots)
        for k, ((name, i, _), size) in enumerate(zip(slots, sizes)):
            d = directions.get(name)
            if d is not None and d[i] is not None:
                buffer[k] = 1
                buffer[offset:offset + size].copy_(d[i].reshape(-1))
            offset += size
        return buffer

    def _unpack(self, slots, buffer: Tensor, out: Dict[str, List[Optional[Tensor]]]) -> None:
        """Inverse of :meth:`_pack`; the flag holds how many ranks contributed (the values their sum)."""
        counts = buffer[:len(slots)].tolist()
        offset = len(slots)
        for (name, i, shape), count in zip(slots, counts):
            size = shape.numel()
            out.setdefault(name, []).append(buffer[offset:offset + size].reshape(shape) / count if count else None)
            offset += size


class LocalComm(ProcessGroupComm):
    """The paper's DDP mode: each rank's curvature comes from its local batch only.

    Every rank preconditions the (already all-reduced) gradient ``g`` with its own factors and the
    directions are averaged::

        d = (1/W) Σ_r (F_r + λI)^{-1} g,

    with ONE all-reduce per step of a buffer holding all layers' directions (``[flags | values]``;
    a rank without a direction for a parameter leaves it out of that parameter's average).
    """

    def reduce_directions(self, directions):
        slots = self._slots(self.names)
        buffer = self._pack(slots, directions)
        self._all_reduce(buffer)
        out: Dict[str, List[Optional[Tensor]]] = {}
        self._unpack(slots, buffer, out)
        return {name: out.get(name) for name in self.names}


class GlobalComm(ProcessGroupComm):
    """Exact SENG on the global batch: every layer's curvature uses the factors of all ranks.

    Layers are assigned to owner ranks by estimated cost (:func:`assign_owners`, greedy LPT). On a
    refresh step, after a small all-gather of the factor shapes, ONE all-to-all sends each owner the
    factors of its layers from every rank; the owner concatenates them in rank order (the global
    batch ``[batch of rank 0; batch of rank 1; ...]``). Under mean reduction rank ``r``'s loss is its
    local mean, so its output-gradient factors are rescaled by ``n_r / N`` first: the per-sample
    gradients are then those of the global mean loss. Every step, each owner broadcasts the
    directions of its layers in one buffer (at most one broadcast per rank).

    With the same gradient ``g`` (DDP's average, which is the global-batch gradient when the ranks'
    batches are equal) the direction equals one process on the concatenated batch, for the exact
    routes; sketched routes draw from each owner's own generator and so differ in their samples.

    Args:
        loss_reduction: ``"mean"`` or ``"sum"``, as given to SENG.
        group: the process group (``None``: the default group).
        batch_size_hint: samples per rank assumed when estimating the layers' costs for balancing.
        route_settings: the settings whose costs are estimated (default: SENG's defaults).
    """

    def __init__(self, loss_reduction: str = "mean", group: Optional["dist.ProcessGroup"] = None,
                 batch_size_hint: int = 128, route_settings: Optional[RouteSettings] = None):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be one of ['mean', 'sum'] (got {loss_reduction!r})")
        if isinstance(batch_size_hint, bool) or not isinstance(batch_size_hint, int) or batch_size_hint < 1:
            raise ValueError(f"batch_size_hint must be an int >= 1 (got {batch_size_hint!r})")
        super().__init__(group)
        self.loss_reduction = loss_reduction
        self.batch_size_hint = batch_size_hint
        self.route_settings = route_settings if route_settings is not None else RouteSettings()

    def setup(self, layers: Dict[str, LayerCurvature], seng=None) -> None:
        super().setup(layers, seng)
        if seng is not None:  # SENG's own settings win over the constructor's
            self.loss_reduction = seng.loss_reduction
            self.route_settings = seng.settings
        n = self.batch_size_hint * self.world_size
        costs = {name: float(layer.estimated_cost(n, self.route_settings)) for name, layer in layers.items()}
        self.owners = assign_owners(costs, self.world_size)
        self.owned = [[name for name in self.names if self.owners[name] == r] for r in range(self.world_size)]

    def owns(self, name: str) -> bool:
        return self.owners[name] == self.rank

    # ------------------------------------------------------------------ refresh: factors to owners
    def gather_factors(self, factors):
        metas = self._exchange_meta(factors)  # metas[rank][layer]: that rank's metadata row (a list of ints)
        rows = [row for rank_rows in metas for row in rank_rows if row[0] == 1]
        if not rows:
            return {name: None for name in self.names}
        self._check_shapes(metas)
        dtype = self._promoted([_WIRE_DTYPES[code] for code in {row[1] for row in rows}])
        # N of each layer over all ranks
        totals = [sum(metas[r][k][_N_COLUMN] for r in range(self.world_size) if metas[r][k][0] == 1)
                  for k in range(len(self.names))]

        index = {name: k for k, name in enumerate(self.names)}
        send_parts: List[Tensor] = []
        send_sizes = []
        for owner in range(self.world_size):
            size = 0
            for name in self.owned[owner]:
                f = factors.get(name)
                if f is None:
                    continue
                grad_side = f.grad_side
                if self.loss_reduction == "mean":
                    grad_side = grad_side * (f.n / totals[index[name]])
                for t in (grad_side, f.input_side):
                    if t is not None:
                        send_parts.append(t.reshape(-1).to(dtype))
                        size += t.numel()
            send_sizes.append(size)
        recv_sizes = [sum(self._numel(metas[src][index[name]]) for name in self.owned[self.rank])
                      for src in range(self.world_size)]
        send = torch.cat(send_parts) if send_parts else torch.empty(0, dtype=dtype, device=self.device)
        recv = self._all_to_all(send.to(self.device), send_sizes, recv_sizes)

        out: Dict[str, Optional[Factors]] = {name: None for name in self.names}
        pieces: Dict[str, List[Tuple[Tensor, Optional[Tensor]]]] = {name: [] for name in self.owned[self.rank]}
        offset = 0
        for src in range(self.world_size):
            for name in self.owned[self.rank]:
                row = metas[src][index[name]]
                if row[0] != 1:
                    continue
                tensors = []
                for side in range(2):
                    shape = self._shape(row, side)
                    if shape is None:
                        tensors.append(None)
                        continue
                    size = math.prod(shape)
                    tensors.append(recv[offset:offset + size].reshape(shape))
                    offset += size
                pieces[name].append((tensors[0], tensors[1]))
        for name, parts in pieces.items():
            if not parts:
                continue
            grad_side = torch.cat([g for g, _ in parts])
            input_side = None if parts[0][1] is None else torch.cat([x for _, x in parts])
            layer = self.layers[name]
            out[name] = Factors(grad_side, input_side, layer.trainable())
        return out

    def _exchange_meta(self, factors) -> List[List[List[int]]]:
        rows = torch.zeros(len(self.names), _META_WIDTH, dtype=torch.int64)
        for k, name in enumerate(self.names):
            f = factors.get(name)
            if f is None:
                continue
            rows[k, 0] = 1
            dtypes = [t.dtype for t in (f.grad_side, f.input_side) if t is not None]
            rows[k, 1] = _WIRE_DTYPES.index(self._promoted(dtypes))
            for side, t in enumerate((f.grad_side, f.input_side)):
                base = 2 + side * (1 + _MAX_NDIM)
                if t is None:
                    rows[k, base] = -1
                    continue
                if t.dim() > _MAX_NDIM:
                    raise ValueError(f"layer '{name}': factors with more than {_MAX_NDIM} dimensions "
                                     f"cannot be gathered (got shape {tuple(t.shape)})")
                rows[k, base] = t.dim()
                rows[k, base + 1:base + 1 + t.dim()] = torch.tensor(t.shape)
        return [part.tolist() for part in self._all_gather(rows.to(self.device))]

    def _check_shapes(self, metas: List[List[List[int]]]) -> None:
        """All ranks see all metadata, so all raise together: trailing dimensions must agree."""
        for k, name in enumerate(self.names):
            ranks = [r for r in range(self.world_size) if metas[r][k][0] == 1]
            shapes = {r: tuple(None if s is None else s[1:] for s in (self._shape(metas[r][k], 0),
                                                                    self._shape(metas[r][k], 1)))
                      for r in ranks}
            first = ranks[0] if ranks else None
            for r in ranks[1:]:
                if shapes[r] != shapes[first]:
                    raise ValueError(
                        f"global mode: layer '{name}' has per-sample factor shapes {shapes[first]} on rank "
                        f"{first} but {shapes[r]} on rank {r}; all dimensions but the batch must agree "
                        "across ranks (e.g. equal sequence lengths or image sizes)")

    @staticmethod
    def _shape(row: List[int], side: int) -> Optional[Tuple[int, ...]]:
        base = 2 + side * (1 + _MAX_NDIM)
        ndim = row[base]
        if ndim < 0:
            return None
        return tuple(row[base + 1:base + 1 + ndim])

    def _numel(self, row: List[int]) -> int:
        if row[0] != 1:
            return 0
        return sum(math.prod(s) for s in (self._shape(row, 0), self._shape(row, 1)) if s is not None)

    @staticmethod
    def _promoted(dtypes: Sequence[torch.dtype]) -> torch.dtype:
        out = dtypes[0]
        for d in dtypes[1:]:
            out = torch.promote_types(out, d)
        return out

    # ------------------------------------------------------------------ every step: owners broadcast
    def reduce_directions(self, directions):
        out: Dict[str, List[Optional[Tensor]]] = {}
        for owner in range(self.world_size):
            slots = self._slots(self.owned[owner])
            if not slots:
                continue
            if owner == self.rank:
                buffer = self._pack(slots, directions)
            else:
                buffer = torch.empty(len(slots) + sum(s.numel() for _, _, s in slots), dtype=self.wire_dtype,
                                     device=self.device)
            self._broadcast(buffer, owner)
            self._unpack(slots, buffer, out)
        return {name: out.get(name) for name in self.names}
