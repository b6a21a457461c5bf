"""The top-level API of ``lightning_seng``: stable names, a torch-only core, Lightning's strategy names.

Import order and missing packages need a fresh interpreter, so most tests run a few lines in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lightning_seng
from lightning_seng._registration import STRATEGY_MODULES

REPO = Path(__file__).resolve().parents[1]

PUBLIC_API = {
    "SENG": "lightning_seng.preconditioner",
    "SENGCallback": "lightning_seng.callback",
    "SENGStrategy": "lightning_seng.strategy",
    "SENGOptimizerMixin": "lightning_seng.mixin",
    "ConstantDamping": "lightning_seng.schedules",
    "DampingSchedule": "lightning_seng.schedules",
    "ExponentialDamping": "lightning_seng.schedules",
    "LambdaDamping": "lightning_seng.schedules",
    "LevenbergMarquardt": "lightning_seng.schedules",
    "make_damping": "lightning_seng.schedules",
}


def python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_public_api_is_the_documented_list():
    assert sorted(lightning_seng.__all__) == sorted([*PUBLIC_API, "__version__"])


def test_every_public_name_imports_from_the_top_level_as_its_defining_object():
    for name, module in PUBLIC_API.items():
        obj = getattr(lightning_seng, name)
        assert obj.__module__ == module, name
        assert obj is getattr(sys.modules[module], name)


def test_dir_lists_the_lazy_lightning_names():
    assert {"SENGCallback", "SENGStrategy", "SENGOptimizerMixin"} <= set(dir(lightning_seng))


def test_import_lightning_seng_does_not_import_lightning():
    proc = python("""
        import sys
        import lightning_seng
        assert "pytorch_lightning" not in sys.modules, "Lightning imported"
        assert "lightning" not in sys.modules, "the lightning package imported"
        assert "hydra" not in sys.modules, "Hydra imported"
    """)
    assert proc.returncode == 0, proc.stderr


def test_core_runs_without_lightning_and_the_lightning_names_say_what_to_install():
    proc = python("""
        import sys
        sys.modules["pytorch_lightning"] = sys.modules["lightning"] = None  # as if no Lightning were installed
        import torch
        import lightning_seng
        model = torch.nn.Linear(3, 2)
        model(torch.randn(4, 3)).pow(2).mean().backward()
        lightning_seng.SENG(model).step()
        try:
            lightning_seng.SENGCallback
        except ImportError as err:
            print(err)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "lightning_seng.SENGCallback needs PyTorch Lightning" in proc.stdout
    assert "pip install pytorch-lightning" in proc.stdout


# {package}: the Lightning package (import name); {strategy_module}: the module of its SENGStrategy
STRATEGY_NAMES_WORK = """
    from {package} import Trainer
    trainers = {{name: Trainer(strategy=name, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
                for name in ("seng_ddp", "seng_ddp_global")}}
    from {strategy_module} import SENGStrategy  # only now: importing it would register the names itself
    for name, mode in [("seng_ddp", "local"), ("seng_ddp_global", "global")]:
        strategy = trainers[name].strategy
        assert isinstance(strategy, SENGStrategy) and strategy.seng_mode == mode, name
"""


def strategy_names_work(package: str) -> str:
    return textwrap.dedent(STRATEGY_NAMES_WORK).format(package=package, strategy_module=STRATEGY_MODULES[package])


def test_strategy_names_work_when_lightning_is_imported_after_lightning_seng_and_the_other_package_stays_out(
        pl_package):
    package = pl_package.__name__
    (other,) = set(STRATEGY_MODULES) - {package}
    proc = python(f"import sys\nimport lightning_seng\nimport {package}\n" + strategy_names_work(package)
                  + f"assert {other.split('.')[0]!r} not in sys.modules, 'registering imported {other}'\n")
    assert proc.returncode == 0, proc.stderr


def test_strategy_names_work_when_lightning_is_imported_before_lightning_seng(pl_package):
    package = pl_package.__name__
    proc = python(f"import {package}\nimport lightning_seng\n" + strategy_names_work(package))
    assert proc.returncode == 0, proc.stderr


def test_callback_and_strategy_work_with_the_lightning_package_alone():
    pytest.importorskip("lightning.pytorch")
    proc = python("""
        import sys
        sys.modules["pytorch_lightning"] = None  # as if only the unified `lightning` package were installed
        import lightning as L
        import torch
        import lightning_seng
        from lightning_seng.lightning import SENGStrategy
        assert isinstance(lightning_seng.SENGCallback(), L.Callback)
        strategy = L.Trainer(strategy="seng_ddp_global", accelerator="cpu", devices=1, logger=False).strategy
        assert isinstance(strategy, SENGStrategy) and strategy.seng_mode == "global"
        try:
            lightning_seng.SENGStrategy
        except ImportError as err:
            print(err)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "lightning_seng.lightning.SENGStrategy" in proc.stdout


def test_lightning_namespace_hands_out_the_shared_callback_and_mixin_with_its_own_strategy():
    pytest.importorskip("lightning.pytorch")
    import lightning.pytorch as L
    import lightning_seng.lightning as for_lightning

    assert for_lightning.SENGCallback is lightning_seng.SENGCallback
    assert for_lightning.SENGOptimizerMixin is lightning_seng.SENGOptimizerMixin
    assert issubclass(for_lightning.SENGStrategy, L.strategies.DDPStrategy)
    assert not issubclass(lightning_seng.SENGStrategy, L.strategies.DDPStrategy)
