"""Hydra entry point: ``python -m lightning_seng.train [overrides]``.

The default run is the main job: an MLP on scikit-learn's digits, trained once with SENG (preconditioning
SGD with momentum) and once with the same SGD alone (same model, initial weights, data order, epochs),
then the test metrics of both side by side. Every config key is a CLI override::

    python -m lightning_seng.train seng.damping=0.3 seng.update_freq=20
    python -m lightning_seng.train recipe=digits_cnn
    python -m lightning_seng.train recipe=cifar10_resnet18 data.root=/data/cifar-10-batches-py
    python -m lightning_seng.train seng=none                 # first-order optimizer only
    python -m lightning_seng.train baseline.enabled=false    # SENG run only

Configs come from the installed package (``lightning_seng.conf``, the repository's ``conf/``), so the
command works from any directory.
"""

from __future__ import annotations

import importlib.resources
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import lightning_seng.strategy  # noqa: F401  (registers strategy="seng_ddp" / "seng_ddp_global")
from lightning_seng.classifier import Classifier
from lightning_seng.mixin import build_seng_callback


def config_dir() -> str:
    """``lightning_seng/conf`` of an installed package, else ``conf/`` of a source checkout."""
    try:
        path = Path(str(importlib.resources.files("lightning_seng.conf")))
        if (path / "train.yaml").is_file():
            return str(path)
    except ModuleNotFoundError:
        pass
    return str(Path(__file__).resolve().parent.parent / "conf")


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
        if lr is not None:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ValueError(f"baseline.lr must be null (same as optimizer.lr) or a number > 0 (got {lr!r})")
            optimizer["lr"] = lr
        runs.append((label, None, OmegaConf.create(optimizer)))
    return runs


def build(cfg: DictConfig, seng_cfg: Any, optimizer_cfg: Any, run_name: str = "seng"):
    """``(module, datamodule, trainer)`` of one run; seeds first, so every run starts from the same weights."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = _instantiate("data", cfg.data)
    net = _instantiate("model", cfg.model)
    to_dict = lambda c: OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else c  # noqa: E731
    module = Classifier(
        net, num_classes=cfg.num_classes, optimizer=to_dict(optimizer_cfg), scheduler=to_dict(cfg.get("scheduler")),
        seng=to_dict(seng_cfg), label_smoothing=cfg.get("label_smoothing", 0.0),
    )
    logger = _build_logger(cfg, run_name)
    trainer = pl.Trainer(**_instantiate("trainer", cfg.trainer), logger=logger if logger else False)
    return module, datamodule, trainer


def _instantiate(key: str, node: DictConfig) -> Any:
    """``instantiate(node)``; the constructor's own error (which names the key) instead of Hydra's wrapper."""
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, TypeError, FileNotFoundError)):
            raise err.__cause__ from err
        raise ValueError(f"{key}: cannot build {node.get('_target_')}: {err}") from err


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


def fit_and_test(cfg: DictConfig, label: str, seng_cfg: Any, optimizer_cfg: Any) -> dict[str, float]:
    module, datamodule, trainer = build(cfg, seng_cfg, optimizer_cfg, run_name=_slug(label))
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path") if seng_cfg is not None else None)
    fit_time = time.perf_counter() - start
    metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    metrics["fit_time_s"] = fit_time
    metrics["optimizer.lr"] = optimizer_cfg.lr
    if trainer.logger is not None and hasattr(trainer.logger.experiment, "finish"):
        trainer.logger.experiment.finish()  # W&B: close this run before the next one starts
    return {k: float(v) for k, v in metrics.items()}


def _slug(label: str) -> str:
    return label.lower().replace("+", "-")


def format_results(results: dict[str, dict[str, float]]) -> str:
    labels = list(results)
    keys = sorted({k for metrics in results.values() for k in metrics})
    width = max(12, *(len(label) + 2 for label in labels))
    lines = ["metric".ljust(14) + "".join(label.rjust(width) for label in labels)]
    for key in keys:
        row = [results[label].get(key) for label in labels]
        lines.append(key.ljust(14) + "".join(("-" if v is None else f"{v:.4g}" if key == "optimizer.lr" else f"{v:.4f}")
                                             .rjust(width) for v in row))
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Train and test every planned run; returns ``{label: {metric: value}}``."""
    if cfg.seng is not None:
        build_seng_callback(cfg.seng)  # fail on a bad seng.* value before any training starts
    if cfg.get("run_group") is None:
        OmegaConf.update(cfg, "run_group", f"train-{time.strftime('%Y%m%d-%H%M%S')}", force_add=True)
    return {label: fit_and_test(cfg, label, seng_cfg, opt_cfg) for label, seng_cfg, opt_cfg in plan_runs(cfg)}


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float:
    results = run(cfg)
    print()
    print(f"Test results: {cfg.get('title', '')} ({cfg.trainer.max_epochs} epochs, seed {cfg.seed})")
    print(format_results(results))
    return next(iter(results.values()))["test/acc"]


if __name__ == "__main__":
    main()
