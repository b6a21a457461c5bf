"""Owner assignment of ``global`` mode (greedy longest-processing-time) and mode validation;
pure functions, no process group."""

from __future__ import annotations

import pytest

from lightning_seng.distributed import assign_owners, make_comm


def test_owners_follow_longest_processing_time_first():
    costs = {"a": 7.0, "b": 6.0, "c": 5.0, "d": 4.0, "e": 3.0}
    # 7 -> r0; 6 -> r1; 5 -> r1 (6 < 7); 4 -> r0 (7 < 11); 3 -> r0 (11 = 11: the lower rank)
    owners = assign_owners(costs, 2)
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 0}
    loads = [sum(c for k, c in costs.items() if owners[k] == r) for r in range(2)]
    assert loads == [14.0, 11.0]


def test_owners_balance_one_large_layer_against_many_small_ones():
    costs = {"big": 10.0, **{f"small{i}": 1.0 for i in range(10)}}
    owners = assign_owners(costs, 2)
    assert owners["big"] == 0
    assert all(owners[f"small{i}"] == 1 for i in range(10))


def test_single_process_owns_every_layer():
    assert set(assign_owners({"a": 1.0, "b": 2.0}, 1).values()) == {0}


def test_unknown_mode_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match=r"seng_mode must be one of \['local', 'global'\] \(got 'sync'\)"):
        make_comm("sync")
