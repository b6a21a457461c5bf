"""W&B sweeps on one machine without a server: ``python -m lightning_seng.sweep conf/sweep/wandb_digits.yaml --runs 4``.

``wandb sweep`` / ``wandb agent`` need a W&B server to propose runs. Here the proposals come from the
open-source engine the server runs (the ``sweeps`` package, ``pip install 'lightning-seng[sweeps]'``), and each
run is the sweep's own ``command`` started as a subprocess, as ``wandb agent`` starts it, with three overrides
appended (Hydra keeps the last value of a key)::

    <command with ${args_no_hyphens} = key=value ...> [extra overrides] logger=csv log_dir=RUN hydra.run.dir=RUN

so every run writes its Hydra output (``.hydra/config.yaml``, ``train.log``) and the CSV logger's
``metrics.csv`` under its own folder ``RUN = <out>/run-<k>``. A run's final metrics are the last logged value of
each column of that ``metrics.csv`` (what W&B shows as the run's summary). The sweep's metric (``metric.name``,
``metric.goal``) ranks the runs in one table at the end; a run whose final value of a ``*/loss`` column or of the
sweep's metric is NaN or infinite is ``diverged`` and ranks below every finished run; a run that exits with an
error or writes no single ``metrics.csv`` is ``failed`` and ranks last. One line per run is printed as it ends.

Sweep files are read with YAML 1.2 floats: PyYAML's YAML 1.1 resolver reads ``1e-5`` (no dot) as the string
``'1e-5'``; :func:`load_sweep` reads it as the float ``1e-05``, which reaches the run as the override
``key=1e-05`` (a float to Hydra). ``early_terminate`` is not applied offline (every run trains to its end), and
says so at WARNING level.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import random
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

log = logging.getLogger(__name__)

# The W&B command macros (sweep configuration options, key `command`) this runner expands; ${env} is
# `/usr/bin/env` under W&B, which adds nothing to a subprocess that inherits the environment.
MACROS = ("${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # W&B's command when the key is absent
# Appended to every run's command; an extra override may not set them.
RESERVED_KEYS = ("logger", "log_dir", "hydra.run.dir")
FINISHED, DIVERGED, FAILED = "finished", "diverged", "failed"
NOT_METRICS = ("epoch", "step")  # metrics.csv columns that count, not measure


class SweepLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-5``, ``5E3``, ``-2e+1`` are floats, not strings."""


SweepLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _import_sweeps():
    """The ``sweeps`` package, or an ImportError that says how to install it."""
    try:
        with warnings.catch_warnings():
            # sweeps 0.2.0 declares its pydantic models in the pydantic 1 style; pydantic 2 accepts them and warns.
            warnings.simplefilter("ignore")
            import sweeps
    except ImportError as err:
        raise ImportError("the offline sweep runner needs the `sweeps` package (W&B's sweep engine): "
                          "pip install 'lightning-seng[sweeps]'") from err
    return sweeps


def load_sweep(path: str | Path) -> dict[str, Any]:
    """The W&B sweep configuration in ``path``, checked against W&B's schema (``sweeps``) and this runner.

    Raises:
        ValueError: the file is not a mapping, breaks the schema (each violation listed), or its ``command``
            uses a macro this runner does not expand (one it does not know, one inside a longer argument,
            ``${program}`` without ``program``).
    """
    path = Path(path)
    spec = yaml.load(path.read_text(), Loader=SweepLoader)
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a sweep configuration must be a mapping (got {type(spec).__name__})")
    violations = _import_sweeps().schema_violations_from_proposed_config(spec)
    if violations:
        raise ValueError(f"{path} is not a valid W&B sweep configuration:\n  " + "\n  ".join(violations))
    for arg in spec.get("command", DEFAULT_COMMAND):
        for macro in re.findall(r"\$\{[^}]*\}", str(arg)):
            if macro not in MACROS:
                raise ValueError(f"{path}: command macro {macro} is not expanded offline (allowed: {list(MACROS)})")
            if arg != macro:
                raise ValueError(f"{path}: command argument {arg!r} embeds {macro}; offline a macro must be a whole "
                                 "argument")
            if macro == "${program}" and "program" not in spec:
                raise ValueError(f"{path}: command uses ${{program}} but the sweep sets no program")
    return spec


def hydra_value(value: Any) -> str:
    """``value`` written as a Hydra override value: ``true``/``false``, ``null``, ints, floats by ``repr``
    (``1e-05``, read back as a float), strings quoted, lists ``[a,b]`` and dicts ``{k:v}``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write sweep value {value!r} of type {type(value).__name__} as a Hydra override")


def build_command(spec: Mapping[str, Any], params: Mapping[str, Any], run_dir: str | Path,
                  overrides: Sequence[str] = ()) -> list[str]:
    """The argv of one run: the sweep's ``command`` with its macros expanded for ``params``, then
    ``overrides``, then ``logger=csv log_dir=<run_dir> hydra.run.dir=<run_dir>``.

    ``python`` and ``${interpreter}`` become this interpreter (``sys.executable``), so runs import the same
    installation as the sweep.
    """
    pairs = [f"{key}={hydra_value(value)}" for key, value in params.items()]
    argv: list[str] = []
    for arg in spec.get("command", DEFAULT_COMMAND):
        if arg == "${env}":
            continue
        if arg in ("${interpreter}", "python", "python3"):
            argv.append(sys.executable)
        elif arg == "${program}":
            argv.append(str(spec["program"]))
        elif arg == "${args_no_hyphens}":
            argv.extend(pairs)
        elif arg == "${args}":
            argv.extend(f"--{pair}" for pair in pairs)
        else:
            argv.append(str(arg))
    run_dir = hydra_value(str(run_dir))
    return [*argv, *overrides, "logger=csv", f"log_dir={run_dir}", f"hydra.run.dir={run_dir}"]


def read_metrics(run_dir: str | Path) -> dict[str, float]:
    """The last logged value of each column of the one ``metrics.csv`` under ``run_dir`` (``epoch`` and
    ``step`` left out).

    Raises:
        FileNotFoundError: there is no ``metrics.csv``, or more than one (the command trained several runs,
            e.g. ``baseline.enabled=true``; a sweep run must train one).
    """
    files = sorted(Path(run_dir).rglob("metrics.csv"))
    if len(files) != 1:
        raise FileNotFoundError(f"a sweep run writes one metrics.csv under {run_dir} (found {len(files)}"
                                f"{': ' + ', '.join(map(str, files)) if files else ''})")
    final: dict[str, float] = {}
    with files[0].open(newline="") as handle:
        for row in csv.DictReader(handle):
            final.update({key: float(value) for key, value in row.items() if value not in ("", None)
                          and key not in NOT_METRICS})
    return final


def run_state(metrics: Mapping[str, float], metric: str | None) -> str:
    """``diverged`` when a ``*/loss`` or the sweep's ``metric`` ended NaN or infinite, else ``finished``."""
    watched = [key for key in metrics if key.endswith("/loss") or key == metric]
    return DIVERGED if any(not math.isfinite(metrics[key]) for key in watched) else FINISHED


@dataclass
class SweepRunResult:
    """One run of an offline sweep: its proposed ``params``, final ``metrics`` (empty when it wrote none),
    ``state`` (finished, diverged or failed), the ``run_dir`` holding its output and why it failed."""

    name: str
    params: dict[str, Any]
    state: str
    run_dir: Path
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


class OfflineSweep:
    """Proposes runs with W&B's engine (``sweeps.next_run``), trains each as a subprocess, reads its metrics.

    Args:
        spec: a sweep configuration (:func:`load_sweep`).
        out_dir: each run writes under ``out_dir/run-<k>``.
        overrides: Hydra overrides added to every run (budgets such as ``trainer.max_epochs=1``); they may not
            set a swept parameter or one of :data:`RESERVED_KEYS`.
        seed: seeds Python's and NumPy's global generators here, which ``sweeps`` samples from, so the same
            seed proposes the same runs.
        echo: where the progress lines go.

    Raises:
        ValueError: an override sets a swept or reserved key, or ``out_dir`` already holds runs.
    """

    def __init__(self, spec: Mapping[str, Any], out_dir: str | Path, overrides: Sequence[str] = (),
                 seed: int = 0, echo: Callable[[str], None] = print) -> None:
        for override in overrides:
            key = override.split("=", 1)[0].lstrip("+~")
            if key in spec["parameters"] or key in RESERVED_KEYS:
                raise ValueError(f"override {override!r} sets {key!r}, which the sweep sets "
                                 f"(swept: {sorted(spec['parameters'])}, reserved: {list(RESERVED_KEYS)})")
        if any(Path(out_dir).glob("run-*")):
            raise ValueError(f"out_dir {str(out_dir)!r} already holds runs of a sweep: choose a new folder")
        if "early_terminate" in spec:
            log.warning("early_terminate %s is not applied offline: every run trains to its end",
                        dict(spec["early_terminate"]))
        self.spec = dict(spec)
        self.out_dir = Path(out_dir)
        self.overrides = list(overrides)
        random.seed(seed)
        _import_sweeps()
        import numpy

        numpy.random.seed(seed)
        self.echo = echo
        self.metric = (spec.get("metric") or {}).get("name")
        self.results: list[SweepRunResult] = []

    def propose(self) -> dict[str, Any] | None:
        """The next run's parameters given the runs so far, or None when the search is exhausted (grid)."""
        sweeps = _import_sweeps()
        history = []
        for result in self.results:
            summary = {self.metric: result.metrics.get(self.metric, math.nan)} if self.metric else {}
            state = sweeps.RunState.failed if result.state == FAILED else sweeps.RunState.finished
            history.append(sweeps.SweepRun(name=result.name, state=state, summary_metrics=summary,
                                           config={key: {"value": value} for key, value in result.params.items()}))
        proposal = sweeps.next_run(self.spec, history, validate=True)
        if proposal is None:
            return None
        return {key: _native(entry["value"]) for key, entry in proposal.config.items()}

    def run_one(self, params: Mapping[str, Any]) -> SweepRunResult:
        """Train one proposal as a subprocess; its stdout and stderr go to ``run_dir/output.log``."""
        name = f"run-{len(self.results) + 1}"
        run_dir = (self.out_dir / name).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = build_command(self.spec, params, run_dir, self.overrides)
        start = time.perf_counter()
        with (run_dir / "output.log").open("w") as output:
            output.write(" ".join(argv) + "\n")
            output.flush()
            code = subprocess.run(argv, stdout=output, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
        if code != 0:
            return SweepRunResult(name, dict(params), FAILED, run_dir, seconds,
                                  error=f"exit code {code}; log ends: {_tail(run_dir / 'output.log')}")
        try:
            metrics = read_metrics(run_dir)
        except FileNotFoundError as err:
            return SweepRunResult(name, dict(params), FAILED, run_dir, seconds, error=str(err))
        if self.metric and self.metric not in metrics:
            return SweepRunResult(name, dict(params), FAILED, run_dir, seconds, metrics,
                                  error=f"the sweep's metric {self.metric!r} was never logged (logged: {sorted(metrics)})")
        return SweepRunResult(name, dict(params), run_state(metrics, self.metric), run_dir, seconds, metrics)

    def run(self, runs: int) -> list[SweepRunResult]:
        """Propose and train up to ``runs`` runs (fewer when a grid is exhausted), printing one line per run."""
        if runs < 1:
            raise ValueError(f"runs must be an integer >= 1 (got {runs!r})")
        for _ in range(runs):
            params = self.propose()
            if params is None:
                self.echo(f"grid exhausted after {len(self.results)} runs")
                break
            result = self.run_one(params)
            self.results.append(result)
            self.echo(_progress_line(result, runs, self.metric))
        return self.results


def _native(value: Any) -> Any:
    """``value`` with numpy scalars turned into Python numbers (``sweeps`` samples with numpy)."""
    if isinstance(value, list):
        return [_native(v) for v in value]
    if isinstance(value, dict):
        return {k: _native(v) for k, v in value.items()}
    return value.item() if hasattr(value, "item") and not isinstance(value, str) else value


def _tail(path: Path, count: int = 2) -> str:
    """The last ``count`` non-empty lines of ``path`` joined by `` | `` (a traceback's last two lines hold the
    exception, the entry point's hold its error and Hydra's hint)."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return " | ".join(lines[-count:]) if lines else "(no output)"


def _progress_line(result: SweepRunResult, runs: int, metric: str | None) -> str:
    params = " ".join(f"{key}={_fmt(value)}" for key, value in result.params.items())
    if result.state == FAILED:
        outcome = f"failed ({result.error}); log: {result.run_dir / 'output.log'}"
    else:
        value = result.metrics.get(metric, math.nan) if metric else math.nan
        outcome = (f"{metric}={_fmt(value)}" if metric else "done") + (" DIVERGED" if result.state == DIVERGED else "")
    return f"[{result.name.split('-')[1]}/{runs}] {params} -> {outcome} ({result.seconds:.1f} s)"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return format(value, ".4g")
    return str(value)


def rank(results: Sequence[SweepRunResult], metric: str | None, goal: str = "maximize") -> list[SweepRunResult]:
    """Finished runs best first by ``metric`` (``goal`` maximize or minimize), then diverged runs, then failed
    ones; without a metric, finished, diverged and failed in the order they ran."""
    order = {FINISHED: 0, DIVERGED: 1, FAILED: 2}
    sign = -1.0 if goal == "maximize" else 1.0

    def key(result: SweepRunResult) -> tuple[int, float]:
        value = result.metrics.get(metric, math.nan) if metric else math.nan
        return order[result.state], sign * value if math.isfinite(value) else math.inf

    return sorted(results, key=key)  # stable: ties keep the order they ran


def format_summary(results: Sequence[SweepRunResult], metric: str | None, goal: str = "maximize") -> str:
    """One row per run, ranked by :func:`rank`: its parameters, the sweep's metric, the other final metrics and
    its state (``finished``, ``DIVERGED``, ``failed``)."""
    params = list(dict.fromkeys(key for result in results for key in result.params))
    others = sorted({key for result in results for key in result.metrics} - {metric})
    metrics = ([metric] if metric else []) + others
    rows = [["#", "run", *params, *metrics, "state"]]
    for position, result in enumerate(rank(results, metric, goal), start=1):
        state = {FINISHED: "finished", DIVERGED: "DIVERGED", FAILED: "failed"}[result.state]
        rows.append([str(position), result.name, *(_fmt(result.params.get(key, "-")) for key in params),
                     *(_fmt(result.metrics[key]) if key in result.metrics else "-" for key in metrics), state])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_seng.sweep",
        description="Run a W&B sweep configuration on this machine without a W&B server.")
    parser.add_argument("sweep", help="a W&B sweep configuration, e.g. conf/sweep/wandb_digits.yaml")
    parser.add_argument("--runs", type=int, required=True, help="how many runs to propose and train")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/sweeps/<name>-<time>)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the proposals (default 0)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides added to every run, e.g. trainer.max_epochs=3")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = load_sweep(args.sweep)
        out = Path(args.out or f"outputs/sweeps/{Path(args.sweep).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        sweep = OfflineSweep(spec, out, args.overrides, seed=args.seed)
    except (ValueError, ImportError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    metric, goal = sweep.metric, (spec.get("metric") or {}).get("goal", "maximize")
    print(f"Sweep {args.sweep}: method {spec['method']}, up to {args.runs} runs under {out.resolve()}; "
          + (f"ranked by final {metric} ({goal})" if metric else "no metric: runs in the order they ran"))
    results = sweep.run(args.runs)
    print()
    print(format_summary(results, metric, goal))
    return 0 if any(result.state != FAILED for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
