"""Smoke test of the round-robin timing of the main job: tiny runs, the table's shape (never the times)."""

from benchmarks.main_job_timing import round_robin, table

TINY = ["trainer.max_epochs=2", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1"]


def test_round_robin_times_every_run_of_the_main_job_once_per_round():
    times = round_robin(TINY, rounds=2)
    assert list(times) == ["SENG+SGD", "SGD"]
    assert all(len(ms) == 2 and all(m > 0 for m in ms) for ms in times.values())


def test_round_robin_table_gives_the_ratio_of_medians_to_the_last_run():
    lines = table({"SENG+SGD": [3.0, 4.0, 3.2], "SGD": [2.0, 9.0, 1.0]}).splitlines()
    assert lines[1].split() == ["SENG+SGD", "3.20", "3.00", "4.00", "1.60"]
    assert lines[2].split() == ["SGD", "2.00", "1.00", "9.00", "1.00"]
