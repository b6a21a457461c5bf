"""Round-robin step times of the settings compare.py chose: the table's shape (never the times)."""
from benchmarks.problems import build_problem
from benchmarks.step_time import markdown, time_problem
from tests.benchmarks.test_compare import compose_bench


def test_step_time_uses_the_chosen_settings_and_times_every_optimizer():
    cfg = compose_bench("quick", ["optimizers=[sgd,seng]", "step_time.rounds=2",
                                  "step_time.steps=2"])
    summary = {("mlp", "sgd"): {"settings": "lr=0.1", "epochs_to_target_mean": "3"},
               ("mlp", "seng"): {"settings": "lr=0.03 damping=2", "epochs_to_target_mean": "nan"}}
    rows = time_problem(build_problem("mlp", cfg.problem.mlp), summary, cfg)
    assert [(r["optimizer"], r["lr"]) for r in rows] == [("sgd", 0.1), ("seng", 0.03)]
    assert all(r["step_ms_median"] > 0 and r["rounds_restarted"] == 0 for r in rows)
    assert rows[0]["vs_sgd"] == 1.0
    assert len(markdown(rows).splitlines()) == 2 + 2
