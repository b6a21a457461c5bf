"""Reduction of SENG over ``torch.distributed``.

:class:`Communicator` is the single-process identity that :class:`~lightning_seng.SENG` uses by
default; the ``local`` and ``global`` modes of DESIGN.md §1 subclass it.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from torch import Tensor

from .layers import Factors, LayerCurvature


class Communicator:
    """How one SENG step talks to the other ranks. The base class is one process on its own."""

    def setup(self, layers: Dict[str, LayerCurvature]) -> None:
        """Called once by SENG with the layers it preconditions, by module name."""
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
