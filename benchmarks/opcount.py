"""Counting the aten ops a piece of code dispatches, views excluded (they launch no kernel), in torch only.

Used by ``benchmarks/overhead.py --ops`` and ``benchmarks/gpu_check.py``; it imports nothing beyond torch, so that
scripts meant for a bare GPU machine can use it.
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, by overload name (``"mv.default"``); views (ops whose outputs
    alias an input without writing it: ``view``, ``t``, ``select``, ...) are left out, as they launch no kernel, and
    so are the profiler's annotations (``_record_function_enter_new`` / ``_exit``, around every optimizer step).
    ``host_reads`` is the number of ``aten._local_scalar_dense`` calls, through which every ``.item()``,
    ``bool(tensor)`` and ``.tolist()`` reads a device tensor back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith("_record_function_"):
            return out
        if not any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            self.counts[func.__name__] += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def host_reads(self) -> int:
        return self.counts["_local_scalar_dense.default"]
