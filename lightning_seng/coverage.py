"""What SENG preconditions, and how: one row per module with trainable parameters.

``SENG.coverage()`` returns a :class:`Coverage`; ``str(coverage)`` is a table in the style of Lightning's
``ModelSummary``, at most :data:`TABLE_WIDTH` (100) columns wide (:meth:`Coverage.table`)::

      | Module  | Type   | Route       | Params | Note
    ----------------------------------------------------------------
    0 | 0       | Linear | linear/gram | 650    |
    1 | emb     | MyEmb  | fallback    | 70     | no route for MyEmb
    ----------------------------------------------------------------
    curvature on 90.3 % of 720 trainable parameters; 70 (1 module) get g / (1 + damping)

Before a layer's first refresh its Route says how the route will be chosen (:func:`pending_route`):
``linear/auto`` (by cost, at the refresh), ``linear/threshold`` (the SENG authors' rule), or the forced
route itself (``linear/gram``); after the refresh, the route chosen.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence

# Columns of the table: a 100-column terminal shows each row on one line (the Note column wraps).
TABLE_WIDTH = 100
# What a Route of the form ``<kind>/<rule>`` means before the layer's first refresh.
RULE_LEGEND = {
    "auto": "auto: the cheapest exact route (implicit for large layers) is chosen at each refresh",
    "threshold": "threshold: implicit above implicit_threshold parameters, else explicit, chosen at each refresh",
}
# Narrowest the Module, Type and Note columns get before a row may exceed the width.
MIN_WIDTHS = {"Module": 16, "Type": 10, "Note": 24}


def pending_route(kind: str, route: str) -> str:
    """The Route cell of a Linear/Conv/attention layer before its first refresh: ``kind/route`` with ``route``
    the setting, a forced route (``explicit``, ``gram``, ``implicit``) or a rule (``auto``, ``threshold``, see
    :data:`RULE_LEGEND`)."""
    return f"{kind}/{route}"


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

    def table(self, width: int = TABLE_WIDTH) -> str:
        """The rows as a table at most ``width`` columns wide: the Note column wraps onto continuation lines;
        where that is not enough, Type names lose their end and Module paths their start (marked ``…``),
        down to :data:`MIN_WIDTHS`. Below the table: the summary line and what each route rule means."""
        header = ["", "Module", "Type", "Route", "Params", "Note"]
        body = [[str(i), r.module or "(root)", r.type, r.route, human(r.parameters), r.note]
                for i, r in enumerate(self.rows)]
        widths = _fit_widths([max(len(row[c]) for row in [header] + body) for c in range(len(header))], width)
        lines = [_row(header, widths)]
        for row in body:
            lines += _row_lines(row, widths)
        rules = sorted({r.route.rsplit("/", 1)[1] for r in self.rows if "/" in r.route} & set(RULE_LEGEND))
        footer = [self.summary()] + ["route " + RULE_LEGEND[rule] for rule in rules]
        footer = [part for line in footer for part in textwrap.wrap(line, width, subsequent_indent="  ")]
        rule = "-" * min(width, max(len(line) for line in lines + footer))
        return "\n".join([lines[0], rule] + lines[1:] + [rule] + footer)

    def __str__(self) -> str:
        return self.table()


_SEP = " | "
_MODULE, _TYPE, _NOTE = 1, 2, 5


def _fit_widths(widths: List[int], width: int) -> List[int]:
    """Column widths whose row fits ``width``: the Note column takes what is left, once Module and Type (the
    wider first) have been narrowed so that the Note column gets at least its minimum."""
    widths = list(widths)
    fixed = lambda: sum(widths[:_NOTE]) + len(_SEP) * _NOTE  # noqa: E731  everything left of the Note column
    floor = {_MODULE: MIN_WIDTHS["Module"], _TYPE: MIN_WIDTHS["Type"]}
    while fixed() + min(widths[_NOTE], MIN_WIDTHS["Note"]) > width:
        column = max((c for c in floor if widths[c] > floor[c]), key=lambda c: widths[c], default=None)
        if column is None:
            break
        widths[column] -= 1
    widths[_NOTE] = max(min(widths[_NOTE], width - fixed()), min(widths[_NOTE], MIN_WIDTHS["Note"]))
    return widths


def _shorten(text: str, width: int, keep_end: bool) -> str:
    """``text`` in ``width`` characters: the end kept (module paths) or the start (type names), ``…`` marking
    the cut."""
    if len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1:] if keep_end else text[:width - 1] + "…"


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return _SEP.join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()


def _row_lines(cells: Sequence[str], widths: Sequence[int]) -> List[str]:
    """One row; a Note wider than its column continues on the next lines, under the Note column."""
    cells = list(cells)
    cells[_MODULE] = _shorten(cells[_MODULE], widths[_MODULE], keep_end=True)
    cells[_TYPE] = _shorten(cells[_TYPE], widths[_TYPE], keep_end=False)
    notes = textwrap.wrap(cells[_NOTE], widths[_NOTE], break_on_hyphens=False) or [""]
    lines = [_row(cells[:_NOTE] + [notes[0]], widths)]
    blank = [""] * _NOTE
    lines += [_row(blank + [note], widths) for note in notes[1:]]
    return lines
