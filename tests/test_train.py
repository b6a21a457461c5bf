"""``python -m lightning_seng.train`` end to end, in subprocesses started outside the repository."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fakes import write_image_folder

REPO = Path(__file__).resolve().parents[1]
TINY = ["trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "hydra.run.dir=."]


def train(tmp_path: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI from ``tmp_path`` (configs must come from the package, not the working directory)."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lightning_seng.train", *overrides], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=300)


def _table(stdout: str) -> dict[str, list[str]]:
    """``{run: cells}`` of the main job's table: test/acc, test/loss, epochs, lr, ms/step[, ratio]."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["run", "test/acc"])
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("Validation curves:"):
            break
        label, *cells = line.split()
        rows[label] = cells
    return rows


@pytest.fixture(scope="module")
def main_job(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The default job, 2 short epochs (the first is warm-up, the second is timed), run once for this module."""
    tmp_path = tmp_path_factory.mktemp("main_job")
    proc = train(tmp_path, *TINY, "trainer.max_epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path, proc


def test_default_job_prints_one_table_of_seng_and_sgd(main_job):
    tmp_path, proc = main_job
    assert re.search(r"^run\s+test/acc\s+test/loss\s+epochs\s+lr\s+ms/step\s+x SGD$", proc.stdout, re.M), proc.stdout
    rows = _table(proc.stdout)
    assert list(rows) == ["SENG+SGD", "SGD"]
    for acc, loss, epochs, lr, ms, ratio in rows.values():
        assert 0.0 <= float(acc) <= 1.0 and float(loss) > 0 and epochs == "2" and float(ms) > 0
    assert not (tmp_path / "conf").exists()


def test_default_job_ratio_is_the_quotient_of_the_printed_step_times(main_job):
    rows = _table(main_job[1].stdout)
    seng_ms, sgd_ms = float(rows["SENG+SGD"][4]), float(rows["SGD"][4])
    assert float(rows["SGD"][5]) == 1.0
    assert float(rows["SENG+SGD"][5]) == pytest.approx(seng_ms / sgd_ms, rel=0.01, abs=0.01)


def test_default_job_writes_the_validation_curves_png_beside_its_log_and_prints_the_path(main_job):
    tmp_path, proc = main_job
    (path,) = re.findall(r"^Validation curves: (.*)$", proc.stdout, re.M)
    assert Path(path) == tmp_path / "val_curves.png" and (tmp_path / "train.log").is_file()
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake_cifar10(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 20).tolist()}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_resnet18_recipe_runs_on_a_local_pickle_directory(tmp_path):
    data = tmp_path / "cifar-10-batches-py"
    data.mkdir()
    _fake_cifar10(data)
    proc = train(tmp_path, "recipe=cifar10_resnet18", f"data.root={data}", "trainer=cpu", "data.batch_size=8",
                 "data.num_workers=0", "data.eval_batch_size=20", "seng.update_freq=2", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(_table(proc.stdout)) == ["SENG+SGD"]


def _last_lines(text: str, n: int) -> list[str]:
    return text.rstrip("\n").splitlines()[-n:]


def test_bad_seng_value_on_the_command_line_names_the_key(tmp_path):
    proc = train(tmp_path, "seng.update_freq=0", *TINY)
    assert proc.returncode != 0
    assert "update_freq must be an int >= 1 (got 0)" in proc.stderr


def test_bad_config_value_ends_with_two_lines_exit_code_2_and_no_traceback(tmp_path):
    proc = train(tmp_path, "seng.damping=-1", *TINY)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert _last_lines(proc.stderr, 2) == [
        "Error: seng: damping must be a finite number > 0 (got -1)",
        "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.",
    ]


def test_missing_data_path_ends_with_the_key_exit_code_2_and_no_traceback(tmp_path):
    proc = train(tmp_path, "recipe=cifar10_resnet18", f"data.root={tmp_path / 'nowhere'}", "trainer=cpu", *TINY)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    error, hint = _last_lines(proc.stderr, 2)
    assert error.startswith("Error: data.root: no CIFAR-10 python batches") and "nowhere" in error
    assert hint.startswith("Set the environment variable HYDRA_FULL_ERROR=1")


def test_hydra_full_error_shows_the_traceback_of_a_bad_value(tmp_path):
    proc = train(tmp_path, "seng.damping=-1", *TINY, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "damping must be a finite number > 0 (got -1)" in proc.stderr


def test_wandb_logger_works_offline(tmp_path):
    proc = train(tmp_path, "logger=wandb", f"log_dir={tmp_path / 'logs'}", "trainer.log_every_n_steps=1", *TINY,
                 env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # the SENG run, then the baseline run
    logs = [next(run.glob("*.wandb")).read_bytes() for run in runs]
    assert all(b"test/acc" in log and b"update_freq" in log for log in logs)  # metrics and the run config
    # both runs may start within one second, so the directory names do not order them: the run name does
    (seng_log,) = [log for log in logs if b"seng-sgd" in log]
    (sgd_log,) = [log for log in logs if b"seng-sgd" not in log]
    assert b"seng/damping" in seng_log and b"seng/damping" not in sgd_log


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from lightning_seng.recipes.train import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=[*TINY[:-1], "logger=none", *overrides])


def test_cnn_recipe_smoke_run():
    from lightning_seng.recipes.train import run

    results = run(_compose(["recipe=digits_cnn"]))
    assert list(results) == ["SENG+SGD", "SGD"] and all(0 <= r.metrics["test/acc"] <= 1 for r in results.values())


def test_imagenet_resnet50_recipe_smoke_run_on_a_local_folder(tmp_path):
    from lightning_seng.recipes.train import run

    write_image_folder(tmp_path, 36, 36, "png")
    cfg = _compose(["recipe=imagenet_resnet50", f"data.root={tmp_path}", "trainer=cpu", "trainer.precision=32-true",
                    "num_classes=2", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
                    "seng.update_freq=1", "trainer.limit_train_batches=1"])
    results = run(cfg)
    assert list(results) == ["SENG+SGD"] and 0 <= results["SENG+SGD"].metrics["test/acc"] <= 1


def test_cli_resume_from_ckpt_path_reproduces_the_uninterrupted_run(tmp_path):
    from lightning_seng.recipes.train import run

    # T_max fixed: by default it follows trainer.max_epochs, which differs between the 2- and 3-epoch runs.
    common = ["baseline.enabled=false", "trainer.enable_checkpointing=true", "trainer.limit_train_batches=4",
              "seng.update_freq=3", "scheduler.T_max=3"]
    full = run(_compose([*common, "trainer.max_epochs=3", f"log_dir={tmp_path / 'full'}"]))
    run(_compose([*common, "trainer.max_epochs=2", f"log_dir={tmp_path / 'part'}"]))
    (ckpt,) = (tmp_path / "part").rglob("*.ckpt")
    resume = [f"log_dir={tmp_path / 'resumed'}", f"ckpt_path='{ckpt}'"]  # quoted: the file name holds '='
    resumed = run(_compose([*common, "trainer.max_epochs=3", *resume]))
    assert resumed["SENG+SGD"].metrics["test/loss"] == full["SENG+SGD"].metrics["test/loss"]
    assert resumed["SENG+SGD"].metrics["test/acc"] == full["SENG+SGD"].metrics["test/acc"]


def test_ckpt_path_with_baseline_is_rejected():
    from lightning_seng.recipes.train import plan_runs

    with pytest.raises(ValueError, match=r"set baseline.enabled=false with ckpt_path"):
        plan_runs(_compose(["ckpt_path=/some/last.ckpt"]))


def _config(*overrides: str):
    from hydra import compose, initialize_config_dir

    from lightning_seng.recipes.train import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("overrides, title", [
    ((), "MLP on Digits"),
    (("model=small_cnn", "data=digits_images"), "SmallCNN on Digits"),
    (("recipe=digits_cnn",), "SmallCNN on Digits"),
    (("recipe=cifar10_resnet18", "model=resnet50"), "SENG authors' CIFAR-10 recipe: resnet50 on CIFAR10"),
])
def test_table_title_names_the_model_and_data_the_config_builds(overrides, title):
    from lightning_seng.recipes.train import run_title

    assert run_title(_config(*overrides)) == title


def _one_result():
    from lightning_seng.recipes.report import RunResult

    return {"SENG+SGD": RunResult({"test/acc": 0.9, "test/loss": 0.3, "epochs": 1, "optimizer.lr": 0.05,
                                   "ms_per_step": 2.0}, {"val/loss": [0.4], "val/acc": [0.9]})}


def test_report_is_printed_and_plotted_by_rank_zero_only(tmp_path, monkeypatch, capsys):
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from lightning_seng.recipes.train import emit_report

    cfg = _config()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert emit_report(cfg, _one_result(), tmp_path) is None
    assert capsys.readouterr().out == "" and not (tmp_path / "val_curves.png").exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    text = emit_report(cfg, _one_result(), tmp_path)
    assert text in capsys.readouterr().out and (tmp_path / "val_curves.png").is_file()


def test_console_log_records_follow_a_redirected_stdout(monkeypatch):
    """Rich's progress bar swaps sys.stdout for a proxy that prints above the bar: a handler created before
    must write to the proxy, not into the bar's line."""
    import contextlib
    import io
    import logging

    from lightning_seng.recipes.train import follow_redirected_streams

    logger = logging.getLogger("tests.follow_redirected_streams")
    monkeypatch.setattr(logger, "propagate", False)
    handler = logging.StreamHandler(sys.stdout)
    logger.addHandler(handler)
    try:
        follow_redirected_streams(logger)
        proxy = io.StringIO()
        with contextlib.redirect_stdout(proxy):
            logger.warning("SENG: non-finite gradient")
        assert proxy.getvalue() == "SENG: non-finite gradient\n"
    finally:
        logger.removeHandler(handler)
