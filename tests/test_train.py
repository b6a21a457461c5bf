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


def _results(stdout: str) -> dict[str, list[float]]:
    rows = {}
    for line in stdout.splitlines():
        match = re.match(r"^(test/acc|test/loss|fit_time_s)\s+(.*)$", line)
        if match:
            rows[match.group(1)] = [float(v) for v in match.group(2).split()]
    return rows


def test_default_job_prints_seng_and_sgd_side_by_side(tmp_path):
    proc = train(tmp_path, *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^metric\s+SENG\+SGD\s+SGD$", proc.stdout, re.M), proc.stdout
    results = _results(proc.stdout)
    assert len(results["test/acc"]) == 2 and all(0.0 <= a <= 1.0 for a in results["test/acc"])
    assert not (tmp_path / "conf").exists()


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
    assert re.search(r"^metric\s+SENG\+SGD$", proc.stdout, re.M), proc.stdout


def test_bad_seng_value_on_the_command_line_names_the_key(tmp_path):
    proc = train(tmp_path, "seng.update_freq=0", *TINY)
    assert proc.returncode != 0
    assert "update_freq must be an int >= 1 (got 0)" in proc.stderr


def test_wandb_logger_works_offline(tmp_path):
    proc = train(tmp_path, "logger=wandb", f"log_dir={tmp_path / 'logs'}", "trainer.log_every_n_steps=1", *TINY,
                 env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # the SENG run, then the baseline run
    logs = [next(run.glob("*.wandb")).read_bytes() for run in runs]
    assert all(b"test/acc" in log and b"update_freq" in log for log in logs)  # metrics and the run config
    assert b"seng/damping" in logs[0] and b"seng/damping" not in logs[1]


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from lightning_seng.train import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=[*TINY[:-1], "logger=none", *overrides])


def test_cnn_recipe_smoke_run():
    from lightning_seng.train import run

    results = run(_compose(["recipe=digits_cnn"]))
    assert list(results) == ["SENG+SGD", "SGD"] and all(0 <= r["test/acc"] <= 1 for r in results.values())


def test_imagenet_resnet50_recipe_smoke_run_on_a_local_folder(tmp_path):
    from lightning_seng.train import run

    write_image_folder(tmp_path, 36, 36, "png")
    cfg = _compose(["recipe=imagenet_resnet50", f"data.root={tmp_path}", "trainer=cpu", "trainer.precision=32-true",
                    "num_classes=2", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
                    "seng.update_freq=1", "trainer.limit_train_batches=1"])
    results = run(cfg)
    assert list(results) == ["SENG+SGD"] and 0 <= results["SENG+SGD"]["test/acc"] <= 1


def test_cli_resume_from_ckpt_path_reproduces_the_uninterrupted_run(tmp_path):
    from lightning_seng.train import run

    # T_max fixed: by default it follows trainer.max_epochs, which differs between the 2- and 3-epoch runs.
    common = ["baseline.enabled=false", "trainer.enable_checkpointing=true", "trainer.limit_train_batches=4",
              "seng.update_freq=3", "scheduler.T_max=3"]
    full = run(_compose([*common, "trainer.max_epochs=3", f"log_dir={tmp_path / 'full'}"]))
    run(_compose([*common, "trainer.max_epochs=2", f"log_dir={tmp_path / 'part'}"]))
    (ckpt,) = (tmp_path / "part").rglob("*.ckpt")
    resume = [f"log_dir={tmp_path / 'resumed'}", f"ckpt_path='{ckpt}'"]  # quoted: the file name holds '='
    resumed = run(_compose([*common, "trainer.max_epochs=3", *resume]))
    assert resumed["SENG+SGD"]["test/loss"] == full["SENG+SGD"]["test/loss"]
    assert resumed["SENG+SGD"]["test/acc"] == full["SENG+SGD"]["test/acc"]


def test_ckpt_path_with_baseline_is_rejected():
    from lightning_seng.train import plan_runs

    with pytest.raises(ValueError, match=r"set baseline.enabled=false with ckpt_path"):
        plan_runs(_compose(["ckpt_path=/some/last.ckpt"]))
