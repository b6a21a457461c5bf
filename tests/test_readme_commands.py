"""Every ``python -m lightning_seng.train`` command of the README runs to a sensible result.

The commands are read from the README (fenced code blocks and inline code) and must be exactly the keys of
:data:`COMMANDS`, so a command added to or changed in the README without an entry here fails
:func:`test_every_readme_command_has_an_entry`. Each entry says how the command runs here: the digits MLP
commands run as documented (their budget is seconds; a damping or learning-rate schedule only shows what
it does over the documented epochs), slower ones with a shorter budget, the ones that need data on disk not
at all (their recipes run on fake data in ``tests/test_train.py``). A run is sensible when the command exits
with 0, prints one results table whose runs are the expected ones, with test accuracy above the entry's
floor (chance is 0.1), and marks no run as diverged unless the entry documents that it does.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PROGRAM = "python -m lightning_seng.train"
QUIET = ["trainer.enable_progress_bar=false", "hydra.run.dir=."]
TINY = ["trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1"]
BOTH = ("SENG+SGD", "SGD")


@dataclass(frozen=True)
class Entry:
    """How a README command runs here. ``extra``: overrides appended (a shorter budget); ``runs``: the rows
    of its table; ``min_acc``: the lowest sensible test accuracy; ``skip``: why it does not run here;
    ``config_only``: it prints the composed config, no table; ``sweep_diverges``: for a multirun, the
    override that every job documented to diverge carries."""

    extra: tuple[str, ...] = ()
    runs: tuple[str, ...] = BOTH
    min_acc: float = 0.9
    skip: str = ""
    config_only: bool = False
    sweep_diverges: str = ""
    env: dict = field(default_factory=dict, hash=False)


EXP_DAMPING = ("'seng.damping={_target_: lightning_seng.schedules.ExponentialDamping, damping: 1.0, rate: 0.5, "
               "min_damping: 0.3}'")
NEEDS_DATA = "needs the dataset on disk; tests/test_train.py runs this recipe on a fake local copy"

COMMANDS = {
    PROGRAM: Entry(),
    f"{PROGRAM} seng.damping=0.3 seng.update_freq=20 seng.sketch_size=64": Entry(),
    f"{PROGRAM} optimizer=adamw optimizer.lr=3e-3 scheduler=none": Entry(runs=("SENG+AdamW", "AdamW")),
    f"{PROGRAM} {EXP_DAMPING}": Entry(),
    f"{PROGRAM} scheduler=poly scheduler.power=6 scheduler.warmup_epochs=1 scheduler.warmup_start_lr=0.01": Entry(),
    f"{PROGRAM} seng.fisher=mc seng.likelihood=categorical": Entry(),
    f"{PROGRAM} seng=none": Entry(runs=("SGD",)),
    f"{PROGRAM} baseline.enabled=false": Entry(runs=("SENG+SGD",)),
    # a quarter of the optimizer steps in the same 10 epochs
    f"{PROGRAM} trainer.gradient_clip_val=1.0 trainer.accumulate_grad_batches=4": Entry(min_acc=0.8),
    f"{PROGRAM} --cfg job": Entry(config_only=True),
    f"{PROGRAM} recipe=digits_cnn": Entry(extra=("trainer.max_epochs=2",), min_acc=0.3),
    f"{PROGRAM} recipe=cifar10_resnet18 data.root=/path/to/cifar-10-batches-py": Entry(skip=NEEDS_DATA),
    f"{PROGRAM} recipe=imagenet_resnet50 data.root=/path/to/imagenet": Entry(skip=NEEDS_DATA),
    f"WANDB_MODE=offline {PROGRAM} logger=wandb": Entry(extra=("log_dir=logs",), env={"WANDB_SILENT": "true"}),
    # 3 of the 12 jobs (update_freq 5, lr 0.05): the damping 0.1 job stops training, as the README says
    f"{PROGRAM} +sweep=digits_grid": Entry(extra=("seng.update_freq=5", "optimizer.lr=0.05"), runs=("SENG+SGD",),
                                           sweep_diverges="seng.damping=0.1"),
    # the README's CPU variant: 2 processes with gloo, a few batches
    f"{PROGRAM} trainer=ddp trainer.strategy.seng_mode=global": Entry(
        extra=("trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", *TINY), min_acc=0.15),
}


def readme_commands(text: str) -> set[str]:
    """The README's ``python -m lightning_seng.train`` commands (with leading environment assignments), from
    fenced code blocks (one per line, ``#`` comments removed) and from inline code spans."""
    found = set()
    in_block = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif in_block and PROGRAM in line:
            found.add(" ".join(shlex.quote(t) if " " in t else t for t in shlex.split(line, comments=True)))
    found |= {span.strip() for span in re.findall(rf"`({re.escape(PROGRAM)}[^`]*)`", text)}
    return found


def test_every_readme_command_has_an_entry():
    assert readme_commands(README.read_text()) == set(COMMANDS)


def _table(text: str) -> dict[str, list[str]]:
    """``{run: cells}`` of one results table (the lines after its ``run test/acc ...`` header)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["run", "test/acc"])
    rows = {}
    for line in lines[start + 1:]:
        label, *cells = line.split()
        if label == "Validation" or cells[:1] == ["diverged:"]:
            break
        rows[label] = cells
    return rows


def _check_table(text: str, entry: Entry, diverges: bool = False) -> None:
    rows = _table(text)
    assert tuple(rows) == entry.runs, text
    if diverges:  # it stops training: at chance, its loss blown up or not finite (then marked as diverged)
        acc, loss = float(rows["SENG+SGD"][0]), float(rows["SENG+SGD"][1])
        assert acc < 0.2 and (math.isnan(loss) == ("diverged at" in text)) and (math.isnan(loss) or loss > 10), text
        return
    assert "diverged" not in text, text
    assert all(float(cells[0]) > entry.min_acc for cells in rows.values()), text


def _run(command: str, entry: Entry, cwd: Path) -> subprocess.CompletedProcess:
    tokens = shlex.split(command)
    env_assignments = dict(t.split("=", 1) for t in tokens[:tokens.index("python")])
    args = tokens[tokens.index("lightning_seng.train") + 1:]
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", **env_assignments, **entry.env}
    quiet = [] if entry.config_only else QUIET
    return subprocess.run([sys.executable, "-m", "lightning_seng.train", *args, *entry.extra, *quiet], cwd=cwd,
                          env=environ, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_readme_command_runs_to_a_sensible_result(command, tmp_path):
    entry = COMMANDS[command]
    if entry.skip:
        pytest.skip(entry.skip)
    proc = _run(command, entry, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if entry.config_only:
        assert re.search(r"^seng:$", proc.stdout, re.M) and "run  " not in proc.stdout, proc.stdout
        return
    if entry.sweep_diverges:
        jobs = re.split(r"^.*\[HYDRA\]\s+#\d+ : ", proc.stdout, flags=re.M)[1:]
        assert len(jobs) == 3, proc.stdout
        for job in jobs:
            _check_table(job, entry, diverges=entry.sweep_diverges in job.splitlines()[0])
        return
    assert proc.stdout.count("Test results:") == 1 and proc.stdout.count("Validation curves:") == 1, proc.stdout
    _check_table(proc.stdout, entry)
