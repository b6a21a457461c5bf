"""SENGStrategy: the names it registers with each Lightning package, its instances, and the validation of its
arguments."""

from __future__ import annotations

import pytest

from lightning_seng.strategy import SENGStrategy

from ..lightning_modules import seng_strategy_class


@pytest.mark.parametrize("name, mode", [("seng_ddp", "local"), ("seng_ddp_global", "global")])
def test_registered_name_builds_the_strategy_of_the_trainers_package_in_its_mode(pl_package, name, mode):
    trainer = pl_package.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, seng_strategy_class(pl_package))
    assert isinstance(trainer.strategy, pl_package.strategies.DDPStrategy)
    assert trainer.strategy.seng_mode == mode


def test_instance_of_the_packages_strategy_class_is_accepted_by_its_trainer(pl_package):
    strategy = seng_strategy_class(pl_package)(seng_mode="global", seng_batch_size_hint=64)
    trainer = pl_package.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False)
    assert trainer.strategy is strategy and trainer.strategy.num_processes == 2


def test_unknown_mode_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match=r"seng_mode must be one of \['local', 'global'\] \(got 'both'\)"):
        SENGStrategy(seng_mode="both")


def test_seng_comm_before_the_process_group_exists_says_when_it_is_available():
    with pytest.raises(RuntimeError, match="once the process group is initialised"):
        SENGStrategy().seng_comm
