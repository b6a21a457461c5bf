"""SENGStrategy: the names it registers with Lightning and the validation of its arguments."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl

from lightning_seng.strategy import SENGStrategy


@pytest.mark.parametrize("name, mode", [("seng_ddp", "local"), ("seng_ddp_global", "global")])
def test_registered_name_builds_the_strategy_in_its_mode(name, mode):
    trainer = pl.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, SENGStrategy)
    assert trainer.strategy.seng_mode == mode


def test_unknown_mode_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match=r"seng_mode must be one of \['local', 'global'\] \(got 'both'\)"):
        SENGStrategy(seng_mode="both")


def test_seng_comm_before_the_process_group_exists_says_when_it_is_available():
    with pytest.raises(RuntimeError, match="once the process group is initialised"):
        SENGStrategy().seng_comm
