"""Hydra entry point: ``python -m lightning_seng.train [overrides]``.

The default run is the main job: an MLP on scikit-learn's digits, trained once with SENG (preconditioning
SGD with momentum) and once with the same SGD alone (same model, initial weights, data order, epochs).
It prints one table (test accuracy and loss, epochs, ms per training step after the warm-up epoch, the
ratio of the two step times, and where a run diverged; see :mod:`lightning_seng.recipes.report`), titled with the model
and data the config builds, and writes the validation curves of both runs to ``val_curves.png`` in Hydra's
output directory, beside its ``train.log``. Under several processes (``trainer=ddp``) only rank zero prints
the table and writes the plot. Every config key is a CLI override::

    python -m lightning_seng.train seng.damping=0.3 seng.update_freq=20
    python -m lightning_seng.train recipe=digits_cnn
    python -m lightning_seng.train recipe=cifar10_resnet18 data.root=/data/cifar-10-batches-py
    python -m lightning_seng.train seng=none                 # first-order optimizer only
    python -m lightning_seng.train baseline.enabled=false    # SENG run only

Configs come from the installed package (``lightning_seng.conf``, the repository's ``conf/``), so the
command works from any directory. A bad config value or a missing data path ends the command with the
message that names the key, the value and what is allowed, and exit code 2; ``HYDRA_FULL_ERROR=1`` shows
the traceback instead.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from lightning_seng.recipes.classifier import Classifier
from lightning_seng.mixin import build_seng_callback, root_cause
from lightning_seng.recipes.report import (DivergenceMonitor, RunResult, StepTimer, ValidationCurve, format_table,
                                           plot_val_curves)

# Errors of the configuration (bad values, missing data), reported without a traceback by main().
CONFIG_ERRORS = (ValueError, FileNotFoundError, MisconfigurationException)


def config_dir() -> str:
    """``lightning_seng/conf`` of an installed package, else ``conf/`` of a source checkout."""
    try:
        path = Path(str(importlib.resources.files("lightning_seng.conf")))
        if (path / "train.yaml").is_file():
            return str(path)
    except ModuleNotFoundError:
        pass
    return str(Path(__file__).resolve().parents[2] / "conf")


def _optimizer_label(optimizer_cfg: DictConfig | None) -> str:
    target = (optimizer_cfg or {}).get("_target_", "torch.optim.SGD")
    return str(target).rsplit(".", 1)[-1]


def plan_runs(cfg: DictConfig) -> list[tuple[str, Any, Any]]:
    """``[(label, seng config or None, optimizer config)]``: the SENG run, then the baseline if enabled."""
    label = _optimizer_label(cfg.optimizer)
    if cfg.seng is None:
        return [(label, None, cfg.optimizer)]
    runs = [(f"SENG+{label}", cfg.seng, cfg.optimizer)]
    baseline = cfg.get("baseline") or {}
    if baseline.get("enabled", False):
        if cfg.get("ckpt_path"):
            raise ValueError("ckpt_path resumes one run: set baseline.enabled=false with ckpt_path "
                             f"(got ckpt_path={cfg.ckpt_path!r}, baseline.enabled=true)")
        optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
        lr = baseline.get("lr")
        # an lr equal to optimizer.lr (the digits recipes interpolate it) is the optimizer's own: its constructor
        # names optimizer.lr if it is bad
        if lr is not None and lr != optimizer.get("lr"):
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ValueError(f"baseline.lr must be null (same as optimizer.lr) or a number > 0 (got {lr!r})")
            optimizer["lr"] = lr
        runs.append((label, None, OmegaConf.create(optimizer)))
    return runs


def build(cfg: DictConfig, seng_cfg: Any, optimizer_cfg: Any, run_name: str = "seng", callbacks: Sequence = ()):
    """``(module, datamodule, trainer)`` of one run; seeds first, so every run starts from the same weights,
    and sets ``cfg.threads``.

    ``callbacks`` join those of ``cfg.trainer`` (the SENG callback comes from the module's ``configure_callbacks``).
    """
    pl.seed_everything(cfg.seed, workers=True)
    _set_threads(cfg.get("threads"))
    datamodule = _instantiate("data", cfg.data)
    net = _instantiate("model", cfg.model)
    to_dict = lambda c: OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else c  # noqa: E731
    module = Classifier(
        net, num_classes=cfg.num_classes, optimizer=to_dict(optimizer_cfg), scheduler=to_dict(cfg.get("scheduler")),
        seng=to_dict(seng_cfg), label_smoothing=cfg.get("label_smoothing", 0.0),
    )
    logger = _build_logger(cfg, run_name)
    trainer_kwargs = _instantiate("trainer", cfg.trainer)
    trainer_kwargs["callbacks"] = [*(trainer_kwargs.get("callbacks") or []), *callbacks]
    trainer = pl.Trainer(**trainer_kwargs, logger=logger if logger else False)
    return module, datamodule, trainer


def _set_threads(threads: Any) -> None:
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be null (torch's default) or an integer >= 1 (got {threads!r})")
    torch.set_num_threads(threads)


def _instantiate(key: str, node: DictConfig) -> Any:
    """``instantiate(node)``; the constructor's own error (which names the key) instead of Hydra's wrapper."""
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, FileNotFoundError)):
            raise err.__cause__ from err
        raise ValueError(f"{key}: cannot build {node.get('_target_')}: {root_cause(err)}") from err


def _build_logger(cfg: DictConfig, run_name: str):
    logger_cfg = cfg.get("logger")
    if not logger_cfg:
        return None
    logger_cfg = OmegaConf.to_container(logger_cfg, resolve=True)
    logger_cfg.setdefault("name", run_name)
    is_wandb = logger_cfg["_target_"].endswith("WandbLogger")
    if is_wandb and logger_cfg.get("group") is None:
        logger_cfg["group"] = cfg.get("run_group")
    logger = instantiate(logger_cfg)
    if is_wandb:  # the whole run config in W&B (sweeps filter on seng.damping, optimizer.lr, ...)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


def fit_and_test(cfg: DictConfig, label: str, seng_cfg: Any, optimizer_cfg: Any) -> RunResult:
    timer, curve, monitor = StepTimer(), ValidationCurve(), DivergenceMonitor(label)
    module, datamodule, trainer = build(cfg, seng_cfg, optimizer_cfg, run_name=_slug(label),
                                        callbacks=[timer, curve, monitor])
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path") if seng_cfg is not None else None)
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    metrics.update({"epochs": trainer.current_epoch, "optimizer.lr": optimizer_cfg.lr, "ms_per_step": timer.ms_per_step})
    if trainer.logger is not None and hasattr(trainer.logger.experiment, "finish"):
        trainer.logger.experiment.finish()  # W&B: close this run before the next one starts
    return RunResult({k: float(v) for k, v in metrics.items()}, curve.curves, monitor.divergence)


def _slug(label: str) -> str:
    return label.lower().replace("+", "-")


def run(cfg: DictConfig) -> dict[str, RunResult]:
    """Train and test every planned run; returns ``{label: RunResult}``."""
    if cfg.seng is not None:
        build_seng_callback(cfg.seng)  # fail on a bad seng.* value before any training starts
    if cfg.get("run_group") is None:
        OmegaConf.update(cfg, "run_group", f"train-{time.strftime('%Y%m%d-%H%M%S')}", force_add=True)
    return {label: fit_and_test(cfg, label, seng_cfg, opt_cfg) for label, seng_cfg, opt_cfg in plan_runs(cfg)}


def baseline_label(results: dict[str, RunResult], cfg: DictConfig) -> str | None:
    """The first-order run the others are compared with: the run without SENG, when there are several."""
    plain = [label for label, seng_cfg, _ in plan_runs(cfg) if seng_cfg is None]
    return plain[0] if len(results) > 1 and plain and plain[0] in results else None


def _target_name(node: Any) -> str:
    return str((node or {}).get("_target_", "?")).rsplit(".", 1)[-1]


def run_title(cfg: DictConfig) -> str:
    """``"<title>: <model> on <data>"``: the classes (or factory functions) that ``cfg.model._target_`` and
    ``cfg.data._target_`` name, so the title follows ``model=...`` overrides; ``title`` (optional) prefixes it."""
    what = f"{_target_name(cfg.model)} on {_target_name(cfg.data).removesuffix('DataModule')}"
    return f"{cfg.title}: {what}" if cfg.get("title") else what


def report(cfg: DictConfig, results: dict[str, RunResult], out_dir: str | Path) -> str:
    """The table of the main job, the plot written to ``out_dir/val_curves.png``, and a line naming its path."""
    title = f"{run_title(cfg)} (seed {cfg.seed})"
    plot = plot_val_curves(results, Path(out_dir) / "val_curves.png", title=title)
    return "\n".join([
        f"Test results: {title}; ms/step: median over epochs 2.. of the mean training step (epoch 1 is warm-up)",
        format_table(results, baseline=baseline_label(results, cfg)),
        f"Validation curves: {plot.resolve()}",
    ])


class _CurrentStream:
    """A stream that writes to whatever ``sys.<name>`` is at the time of the write.

    Hydra's console log handler keeps the ``sys.stdout`` it found at start-up; Lightning's rich progress bar
    swaps ``sys.stdout``/``sys.stderr`` for proxies that print above the bar while it is live. Writing through
    the current one puts a log record (a SENG warning) on its own line instead of inside the bar's line."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        return getattr(sys, self.name).write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()


def follow_redirected_streams(logger: logging.Logger | None = None) -> None:
    """Point ``logger``'s (the root logger's) console handlers at the current ``sys.stdout``/``sys.stderr``."""
    for handler in (logger or logging.getLogger()).handlers:
        if type(handler) is logging.StreamHandler:
            for name in ("stdout", "stderr"):
                if handler.stream in (getattr(sys, name), getattr(sys, f"__{name}__")):
                    handler.setStream(_CurrentStream(name))


def emit_report(cfg: DictConfig, results: dict[str, RunResult], out_dir: str | Path) -> str | None:
    """:func:`report` printed on rank zero (one table and one plot per job under ``trainer=ddp``); returns the
    text printed, ``None`` on the other ranks."""
    if rank_zero_only.rank != 0:
        return None
    text = report(cfg, results, out_dir)
    print()
    print(text)
    return text


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float:
    follow_redirected_streams()
    try:
        results = run(cfg)
    except CONFIG_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {err}", file=sys.stderr)
        print("Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.", file=sys.stderr)
        sys.exit(2)
    emit_report(cfg, results, HydraConfig.get().runtime.output_dir)
    return next(iter(results.values())).metrics["test/acc"]


if __name__ == "__main__":
    main()
