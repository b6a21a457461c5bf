"""Offline W&B sweeps (lightning_seng.sweep): every shipped sweep file is valid, and one runs end to end."""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from lightning_seng.recipes.sweep import (DIVERGED, FINISHED, OfflineSweep, build_command, hydra_value, load_sweep, main,
                                  read_metrics)
from lightning_seng.recipes.train import config_dir

pytest.importorskip("sweeps", reason="W&B's sweep engine: pip install '.[sweeps]' (dev installs it)")

CONF = Path(config_dir())
SHIPPED = sorted((CONF / "sweep").glob("wandb_*.yaml"))
TINY = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", "threads=1"]
COMMAND = """command: ["${env}", python, -m, lightning_seng.train, baseline.enabled=false,
          trainer.enable_progress_bar=false, "${args_no_hyphens}"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _hydra_overrides(argv):
    """The Hydra overrides of a run's argv (what follows ``-m lightning_seng.train``), ``hydra.*`` left out."""
    start = argv.index("lightning_seng.train") + 1
    return [arg for arg in argv[start:] if not arg.startswith("hydra.")]


def test_shipped_sweeps_are_found():
    assert [path.name for path in SHIPPED] == ["wandb_digits.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=[path.name for path in SHIPPED])
def test_shipped_sweep_is_valid_over_real_config_keys(path):
    spec = load_sweep(path)  # raises on a schema violation or a macro the offline runner cannot expand
    assert spec["command"][2:4] == ["-m", "lightning_seng.train"] and "${args_no_hyphens}" in spec["command"]
    fixed = [arg for arg in spec["command"] if "=" in arg and not arg.startswith("$")]
    cfg = _compose(fixed)
    for key in spec["parameters"]:
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", key
    assert re.fullmatch(r"(train|val|test)/\w+", spec["metric"]["name"])


def test_scientific_notation_loads_as_float(tmp_path):
    path = _write(tmp_path, "method: grid\nparameters:\n  optimizer.lr:\n    values: [1e-5, 2E+3, 0.5]\n" + COMMAND)
    assert yaml.safe_load(path.read_text())["parameters"]["optimizer.lr"]["values"][0] == "1e-5"  # PyYAML's reading
    assert load_sweep(path)["parameters"]["optimizer.lr"]["values"] == [1e-5, 2000.0, 0.5]


def test_scientific_notation_reaches_the_run_config_as_float(tmp_path):
    spec = load_sweep(_write(tmp_path, "method: grid\nparameters:\n  optimizer.lr:\n    values: [1e-5]\n" + COMMAND))
    ((value,),) = [param["values"] for param in spec["parameters"].values()]
    argv = build_command(spec, {"optimizer.lr": value}, tmp_path / "run-1")
    cfg = _compose(_hydra_overrides(argv))
    assert isinstance(cfg.optimizer.lr, float) and cfg.optimizer.lr == 1e-5


def test_schema_violation_names_the_file_and_the_value(tmp_path):
    path = _write(tmp_path, "method: annealing\nparameters:\n  seng.damping:\n    values: [0.1]\n")
    with pytest.raises(ValueError, match=r"sweep.yaml is not a valid W&B sweep configuration:\n.*annealing"):
        load_sweep(path)


def test_unknown_command_macro_is_refused(tmp_path):
    path = _write(tmp_path, "method: grid\nparameters:\n  seng.damping:\n    values: [0.1]\n"
                            "command: [python, -m, lightning_seng.train, '${args_json}']\n")
    with pytest.raises(ValueError, match=r"command macro \$\{args_json\} is not expanded offline"):
        load_sweep(path)


def test_macro_inside_an_argument_is_refused(tmp_path):
    path = _write(tmp_path, "method: grid\nparameters:\n  seng.damping:\n    values: [0.1]\n"
                            "command: [python, -m, lightning_seng.train, 'x${args_no_hyphens}']\n")
    with pytest.raises(ValueError, match=r"command argument 'x\$\{args_no_hyphens\}' embeds \$\{args_no_hyphens\}"):
        load_sweep(path)


def test_override_of_a_swept_key_is_refused(tmp_path):
    spec = load_sweep(SHIPPED[0])
    with pytest.raises(ValueError, match=r"override 'seng.damping=1.0' sets 'seng.damping', which the sweep sets"):
        OfflineSweep(spec, tmp_path, ["seng.damping=1.0"])


def test_output_folder_holding_runs_is_refused(tmp_path):
    (tmp_path / "run-1").mkdir()
    with pytest.raises(ValueError, match=r"already holds runs of a sweep"):
        OfflineSweep(load_sweep(SHIPPED[0]), tmp_path)


def test_seed_fixes_the_proposals(tmp_path):
    spec = load_sweep(SHIPPED[0])
    first, again, other = (OfflineSweep(spec, tmp_path, seed=seed).propose() for seed in (0, 0, 1))
    assert first == again and first != other
    assert set(first) == set(spec["parameters"]) and isinstance(first["seng.damping"], float)


@pytest.mark.parametrize("value", [1e-5, 0.1, 3, True, None, "explicit", "it's", [1, 2.5], {"a": 1}])
def test_hydra_value_parses_back_to_the_value(value):
    override = OverridesParser.create().parse_override(f"key={hydra_value(value)}")
    assert override.value() == value and type(override.value()) is type(value)


def test_two_metrics_files_fail_the_run(tmp_path):
    for name in ("seng-sgd", "sgd"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text("epoch,step,val/acc\n0,1,0.5\n")
    with pytest.raises(FileNotFoundError, match=r"one metrics.csv under .* \(found 2"):
        read_metrics(tmp_path)


@pytest.fixture(scope="module")
def shipped_run(tmp_path_factory):
    """``python -m lightning_seng.sweep conf/sweep/wandb_digits.yaml --runs 2`` with tiny budgets: (code, stdout, out)."""
    out = tmp_path_factory.mktemp("shipped")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([str(SHIPPED[0]), "--runs", "2", "--out", str(out), *TINY])
    return code, stdout.getvalue(), out


def test_shipped_sweep_runs_end_to_end_with_one_line_per_run(shipped_run):
    code, stdout, _ = shipped_run
    assert code == 0, stdout
    progress = [line for line in stdout.splitlines() if line.startswith("[")]
    assert [line[:5] for line in progress] == ["[1/2]", "[2/2]"]
    assert all(re.search(r"-> val/acc=0\.\d+ \(", line) for line in progress), progress


def test_summary_ranks_runs_by_the_sweeps_metric(shipped_run):
    _, stdout, _ = shipped_run
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["#", "run"])
    columns = lines[header].split()
    rows = [line.split() for line in lines[header + 1:header + 3]]
    assert [row[0] for row in rows] == ["1", "2"] and all(row[-1] == "finished" for row in rows)
    acc = [float(row[columns.index("val/acc")]) for row in rows]
    assert acc[0] >= acc[1]
    assert set(columns) >= {"seng.damping", "seng.sketch_size", "seng.update_freq", "optimizer.lr", "test/acc"}


def test_proposed_values_reach_each_run_config(shipped_run):
    _, stdout, out = shipped_run
    for k, line in enumerate(l for l in stdout.splitlines() if l.startswith("[")):
        run_cfg = OmegaConf.load(out / f"run-{k + 1}" / ".hydra" / "config.yaml")
        command = (out / f"run-{k + 1}" / "output.log").read_text().splitlines()[0]
        damping = float(re.search(r" seng\.damping=(\S+)", command).group(1))
        assert run_cfg.seng.damping == damping and run_cfg.baseline.enabled is False
        assert f"seng.damping={damping:.4g}" in line
        assert run_cfg.trainer.max_epochs == 1 and run_cfg.logger._target_.endswith("CSVLogger")


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    """A grid over two learning rates written in scientific notation: ``(results, table)``. At lr 1e4 the
    loss overflows within three steps (NaN from then on)."""
    tmp = tmp_path_factory.mktemp("grid")
    path = _write(tmp, "method: grid\nmetric: {name: val/acc, goal: maximize}\nparameters:\n"
                       "  optimizer.lr:\n    values: [1e4, 5e-2]\n" + COMMAND)
    from lightning_seng.recipes.sweep import format_summary

    budget = [arg.replace("limit_train_batches=2", "limit_train_batches=3") for arg in TINY]
    sweep = OfflineSweep(load_sweep(path), tmp / "out", budget, echo=lambda line: None)
    results = sweep.run(3)  # the grid has 2 points: the third proposal ends the sweep
    return results, format_summary(results, "val/acc", "maximize")


def test_grid_sweep_stops_when_exhausted(grid_run):
    results, _ = grid_run
    assert sorted(result.params["optimizer.lr"] for result in results) == [5e-2, 1e4]


def test_scientific_notation_reaches_the_run_as_float(grid_run):
    results, _ = grid_run
    for result in results:
        lr = OmegaConf.load(result.run_dir / ".hydra" / "config.yaml").optimizer.lr
        assert isinstance(lr, float) and lr == result.params["optimizer.lr"]


def test_diverged_run_is_marked_and_ranked_last(grid_run):
    results, table = grid_run
    states = {result.params["optimizer.lr"]: result.state for result in results}
    assert states == {1e4: DIVERGED, 5e-2: FINISHED}
    diverged = next(result for result in results if result.state == DIVERGED)
    assert not math.isfinite(diverged.metrics["val/loss"])
    last = table.splitlines()[-1].split()
    assert last[0] == "2" and last[-1] == "DIVERGED" and last[2] == "1e+04"


def test_run_with_a_bad_value_is_failed_with_its_error(tmp_path):
    path = _write(tmp_path, "method: grid\nmetric: {name: val/acc, goal: maximize}\nparameters:\n"
                            "  seng.damping:\n    values: [-1.0]\n" + COMMAND)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([str(path), "--runs", "1", "--out", str(tmp_path / "out"), *TINY])
    assert code == 1  # no run trained
    (progress,) = [line for line in stdout.getvalue().splitlines() if line.startswith("[1/1]")]
    assert re.search(r"failed \(exit code 2; log ends: Error: .*damping must be a finite number > 0 \(got -1.0\)", progress)
    assert stdout.getvalue().splitlines()[-1].split()[-1] == "failed"
