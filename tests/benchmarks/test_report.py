"""The computed verdict under the digits table: SENG against SGD, AdamW and K-FAC."""
from benchmarks.report import claim_lines


def _row(name, epochs, wall, reached=3):
    return dict(problem="mlp", optimizer=name, seeds=3, seeds_reached=reached,
                epochs_to_target_mean=epochs, wall_to_target_s_mean=wall)


def test_yes_needs_1_5x_fewer_epochs_than_sgd_and_adamw_and_less_wall_than_kfac():
    rows = [_row("seng", 4.0, 1.0), _row("sgd", 6.0, 0.5), _row("adamw", 6.5, 0.6),
            _row("kfac", 3.0, 1.1)]
    assert claim_lines(rows) == ["- mlp: yes — ≥ 1.5x fewer epochs than SGD and AdamW: yes; "
                                 "less wall time than K-FAC: yes."]


def test_a_peer_that_missed_a_seed_counts_as_slower_but_a_seng_miss_is_a_no():
    rows = [_row("seng", 4.0, 1.0), _row("sgd", 5.0, 0.5, reached=2), _row("adamw", 6.0, 0.6),
            _row("kfac", 3.0, 0.9)]
    assert claim_lines(rows)[0] == ("- mlp: no — ≥ 1.5x fewer epochs than SGD and AdamW: yes; "
                                    "less wall time than K-FAC: no.")
    rows[0]["seeds_reached"] = 2
    assert claim_lines(rows) == ["- mlp: no — SENG reached the target on 2/3 seeds."]
