"""The equal tuning budget: every optimizer gets the same number of trials over its own knobs.

An optimizer's ``search`` block maps each knob it tunes to the values it may take, e.g.
``{lr: [0.03, 0.1, 0.3], damping: [0.5, 2.0]}``. The trials are points of the Cartesian product
of those lists: all of them when the product has exactly ``trials`` points, otherwise ``trials``
points drawn uniformly without replacement (random search on the grid), with a seed made from
``seed`` and the optimizer's name so that every run of the benchmark draws the same points.

Knobs: ``lr`` for every optimizer; ``damping`` (SENG, SENG MC, K-FAC, ASDL's SENG); ``weight_decay`` (any optimizer
whose recipe has one). A knob that is not searched keeps the value of the optimizer's block.
"""
from __future__ import annotations

import itertools
import random
from typing import Mapping

from omegaconf import DictConfig, OmegaConf

KNOBS = ("lr", "damping", "weight_decay")
NEEDS_DAMPING = ("seng", "seng_mc", "kfac", "asdl_seng")


def trial_points(optimizer: str, search: Mapping[str, list], trials: int, seed: int) -> list[dict]:
    """The ``trials`` settings optimizer ``optimizer`` is tried with, as ``{knob: value}`` dicts
    (every dict has ``lr``), in grid order."""
    key = f"optim.{optimizer}.search"
    if not search or "lr" not in search:
        raise ValueError(f"{key} must list lr values (got {dict(search or {})!r}); "
                         f"allowed knobs: {list(KNOBS)}")
    for knob, values in search.items():
        if knob not in KNOBS:
            raise ValueError(f"{key}.{knob} is not a knob the benchmark can tune "
                             f"(got {knob!r}); allowed: {list(KNOBS)}")
        if knob == "damping" and optimizer not in NEEDS_DAMPING:
            raise ValueError(f"{key}.damping: {optimizer} has no damping (allowed only for "
                             f"{list(NEEDS_DAMPING)})")
        if not values:
            raise ValueError(f"{key}.{knob} must hold at least one value (got {list(values)!r})")
    knobs = list(search)
    grid = [dict(zip(knobs, (float(v) for v in point)))
            for point in itertools.product(*(search[k] for k in knobs))]
    if trials < 1:
        raise ValueError(f"trials must be a positive integer (got {trials!r})")
    if len(grid) < trials:
        raise ValueError(f"{key} has {len(grid)} grid points, fewer than trials={trials}: every "
                         f"optimizer must get the same number of trials; list more values")
    if len(grid) == trials:
        return grid
    picked = sorted(random.Random(f"{seed}-{optimizer}").sample(range(len(grid)), trials))
    return [grid[i] for i in picked]


def with_knobs(block: DictConfig, point: Mapping[str, float]) -> DictConfig:
    """The optimizer's block with the trial's knobs (other than ``lr``) written over it."""
    merged = OmegaConf.to_container(block, resolve=True)
    merged.pop("search", None)
    merged.update({k: v for k, v in point.items() if k != "lr"})
    return OmegaConf.create(merged)


def describe(point: Mapping[str, float]) -> str:
    """``lr=0.1 damping=0.5``: a trial's knobs, in a fixed order."""
    return " ".join(f"{k}={point[k]:g}" for k in KNOBS if k in point)


def parse(settings: str) -> dict:
    """The inverse of ``describe``: ``"lr=0.1 damping=0.5"`` -> ``{"lr": 0.1, "damping": 0.5}``."""
    point = {}
    for item in settings.split():
        knob, _, value = item.partition("=")
        if knob not in KNOBS or not value:
            raise ValueError(f"settings must be knob=value pairs with knobs from {list(KNOBS)} "
                             f"(got {settings!r})")
        point[knob] = float(value)
    return point


def grid_edge(points: list[dict], chosen: dict) -> str:
    """Which knobs of the chosen trial sit at the low or high end of the values tried, e.g.
    ``"lr low"`` (a sign the grid may not hold the optimum); "" when none does. Knobs tried at
    fewer than three values are not flagged: there every value is an end."""
    edges = []
    for knob, value in chosen.items():
        values = sorted({p[knob] for p in points})
        if len(values) >= 3 and value in (values[0], values[-1]):
            edges.append(f"{knob} {'low' if value == values[0] else 'high'}")
    return ", ".join(edges)
