"""The equal tuning budget: trial points drawn from each optimizer's own grid."""
import pytest
from omegaconf import OmegaConf

from benchmarks.tuning import describe, parse, trial_points, with_knobs


def test_a_grid_of_exactly_trials_points_is_tried_whole():
    points = trial_points("seng", {"lr": [0.1, 0.3], "damping": [0.5, 2.0]}, 4, 0)
    assert points == [{"lr": 0.1, "damping": 0.5}, {"lr": 0.1, "damping": 2.0},
                      {"lr": 0.3, "damping": 0.5}, {"lr": 0.3, "damping": 2.0}]


def test_a_larger_grid_gives_trials_distinct_points_the_same_on_every_call():
    search = {"lr": [0.01, 0.03, 0.1, 0.3, 1.0], "damping": [0.1, 0.5, 2.0]}
    points = trial_points("seng", search, 6, 0)
    assert len(points) == 6 and len({describe(p) for p in points}) == 6
    assert points == trial_points("seng", search, 6, 0)
    assert points != trial_points("seng", search, 6, 1)


def test_a_grid_smaller_than_the_budget_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"optim.sgd.search has 3 grid points, fewer than trials=4"):
        trial_points("sgd", {"lr": [0.1, 0.3, 1.0]}, 4, 0)


def test_damping_is_refused_for_an_optimizer_without_one():
    with pytest.raises(ValueError, match=r"optim.adamw.search.damping"):
        trial_points("adamw", {"lr": [1e-3], "damping": [0.1]}, 1, 0)


def test_an_unknown_knob_is_refused_naming_what_is_allowed():
    with pytest.raises(ValueError, match=r"optim.sgd.search.momentum .*allowed: \['lr', 'damping', 'weight_decay'\]"):
        trial_points("sgd", {"lr": [0.1], "momentum": [0.9]}, 1, 0)


def test_with_knobs_overrides_the_fixed_value_and_drops_the_grid():
    block = OmegaConf.create({"search": {"lr": [0.1]}, "damping": 0.5, "momentum": 0.9})
    merged = with_knobs(block, {"lr": 0.3, "damping": 2.0})
    assert merged.damping == 2.0 and merged.momentum == 0.9
    assert "search" not in merged and "lr" not in merged


def test_parse_inverts_describe():
    point = {"lr": 0.03, "damping": 2.0, "weight_decay": 1e-4}
    assert parse(describe(point)) == point
