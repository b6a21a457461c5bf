"""What SENG preconditions, and how: one row per module with trainable parameters.

``SENG.coverage()`` returns a :class:`Coverage`; ``str(coverage)`` is a table in the style of Lightning's
``ModelSummary``::

      | Module  | Type   | Route       | Params | Note
    ----------------------------------------------------------------
    0 | 0       | Linear | linear/gram | 650    |
    1 | emb     | MyEmb  | fallback    | 70     | no route for MyEmb
    ----------------------------------------------------------------
    curvature on 90.3 % of 720 trainable parameters; 70 (1 module) get g / (1 + damping)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List


def human(count: int) -> str:
    """``1234`` -> ``"1.2 K"``, as Lightning's summary writes parameter counts."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return str(count)


@dataclass
class CoverageRow:
    """One module: its name, class, route (``"fallback"`` when its parameters get ``g / (1 + λ)``), the
    number of trainable parameters it holds, whether they have curvature, and why not."""

    module: str
    type: str
    route: str
    parameters: int
    curvature: bool
    note: str = ""

    def as_dict(self) -> Dict[str, object]:
        return dict(module=self.module, type=self.type, route=self.route, parameters=self.parameters,
                    curvature=self.curvature, note=self.note)


@dataclass
class Coverage:
    rows: List[CoverageRow] = field(default_factory=list)

    def __iter__(self) -> Iterator[CoverageRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def total(self) -> int:
        """Trainable parameters (each counted once)."""
        return sum(r.parameters for r in self.rows)

    @property
    def covered(self) -> int:
        """Trainable parameters with curvature."""
        return sum(r.parameters for r in self.rows if r.curvature)

    @property
    def percent(self) -> float:
        return 100.0 * self.covered / self.total if self.total else 100.0

    def fallbacks(self) -> List[CoverageRow]:
        return [r for r in self.rows if not r.curvature and r.parameters]

    def summary(self) -> str:
        line = f"curvature on {self.percent:.1f} % of {human(self.total)} trainable parameters"
        falling = self.fallbacks()
        if falling:
            count = sum(r.parameters for r in falling)
            line += f"; {human(count)} ({len(falling)} module{'s' * (len(falling) != 1)}) get g / (1 + damping)"
        return line

    def table(self) -> str:
        header = ["", "Module", "Type", "Route", "Params", "Note"]
        body = [[str(i), r.module or "(root)", r.type, r.route, human(r.parameters), r.note]
                for i, r in enumerate(self.rows)]
        widths = [max(len(row[c]) for row in [header] + body) for c in range(len(header))]

        def fmt(row: List[str]) -> str:
            return " | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()

        rule = "-" * max(len(fmt(header)), len(self.summary()))
        return "\n".join([fmt(header), rule] + [fmt(r) for r in body] + [rule, self.summary()])

    def __str__(self) -> str:
        return self.table()
