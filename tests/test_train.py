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


def test_cnn_recipe_smoke_run(tmp_path):
    proc = train(tmp_path, "recipe=digits_cnn", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_results(proc.stdout)["test/acc"]) == 2


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


def test_missing_cifar_root_fails_naming_the_key(tmp_path):
    proc = train(tmp_path, "recipe=cifar10_resnet18", f"data.root={tmp_path / 'nowhere'}", "trainer=cpu", *TINY)
    assert proc.returncode != 0
    assert "data.root" in proc.stderr and "cifar-10-batches-py" in proc.stderr


def test_bad_seng_value_on_the_command_line_names_the_key(tmp_path):
    proc = train(tmp_path, "seng.update_freq=0", *TINY)
    assert proc.returncode != 0
    assert "update_freq must be an integer >= 1 (got 0)" in proc.stderr


def test_wandb_logger_works_offline(tmp_path):
    proc = train(tmp_path, "logger=wandb", f"log_dir={tmp_path / 'logs'}", "trainer.log_every_n_steps=1", *TINY,
                 env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # the SENG run, then the baseline run
    logs = [next(run.glob("*.wandb")).read_bytes() for run in runs]
    assert all(b"test/acc" in log and b"update_freq" in log for log in logs)  # metrics and the run config
    assert b"seng/damping" in logs[0] and b"seng/damping" not in logs[1]
