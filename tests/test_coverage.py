"""The coverage table (``lightning_seng/coverage.py``): at most 100 columns, notes wrapped, names shortened with a
mark, and the Route of a layer before its first refresh saying how the route will be chosen."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG
from lightning_seng.coverage import TABLE_WIDTH, Coverage, CoverageRow

LONG_NOTE = ("its outputs on each sample alone differ from its outputs in the batch (largest difference 1.63): "
             "its forward couples the samples of a batch or is not deterministic (e.g. BatchNorm in training mode)")


class TinyLM(nn.Module):
    """A small transformer: embedding, two encoder layers (attention, feed-forward, LayerNorms), a head."""

    def __init__(self, vocab: int = 37, dim: int = 16) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 24, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embedding(tokens)))


def _refresh(seng: SENG, model: TinyLM) -> None:
    tokens = torch.randint(0, 37, (5, 7))
    F.cross_entropy(model(tokens).reshape(-1, 37), tokens.reshape(-1)).backward()
    seng.step()


def test_small_transformer_table_fits_100_columns_before_and_after_a_refresh():
    model = TinyLM()
    seng = SENG(model, update_freq=1)
    before = seng.coverage().table()
    _refresh(seng, model)
    after = seng.coverage().table()
    for table in (before, after):
        assert max(len(line) for line in table.splitlines()) <= TABLE_WIDTH, table
        assert len(table.splitlines()) == 2 + len(seng.coverage()) + 1 + 1 + table.count("route auto:")


def test_route_before_the_first_refresh_names_the_rule_and_after_it_the_route_chosen():
    model = TinyLM()
    seng = SENG(model, update_freq=1)
    before = {r.module: r.route for r in seng.coverage()}
    assert before["head"] == "linear/auto" and before["encoder.layers.0.self_attn"] == "attention/auto"
    assert before["encoder.layers.0.norm1"] == "norm"
    assert "route auto: the cheapest exact route" in seng.coverage().table()
    _refresh(seng, model)
    after = {r.module: r.route for r in seng.coverage()}
    assert after["head"] == f"linear/{seng.layers['head'].curvature.route.name}"
    assert "route auto:" not in seng.coverage().table()


def test_forced_route_is_shown_before_the_first_refresh():
    seng = SENG(nn.Sequential(nn.Linear(4, 3)), route="gram")
    assert [r.route for r in seng.coverage()] == ["linear/gram"]


def test_long_note_wraps_under_the_note_column_and_keeps_every_word():
    coverage = Coverage([CoverageRow("bn", "BatchNormAct", "fallback", 32, False, LONG_NOTE)])
    lines = coverage.table().splitlines()
    rows = lines[2:lines.index(lines[1], 2)]
    assert len(rows) > 1 and all(len(line) <= TABLE_WIDTH for line in lines)
    column = lines[0].index("Note")
    assert all(line[:column].strip(" |") == "" for line in rows[1:])  # continuation lines: the note only
    assert " ".join(line[column:].strip() for line in rows) == LONG_NOTE


def test_long_module_path_keeps_its_end_and_long_type_its_start():
    module = "encoder.layers.11.block.attention.self_attention.out_projection"
    coverage = Coverage([CoverageRow(module, "NonDynamicallyQuantizableLinearWithAVeryLongName", "linear/explicit",
                                     272, True, "shared with 'decoder.layers.11.block.attention.out_projection'")])
    row = coverage.table().splitlines()[2]
    cells = [cell.strip() for cell in row.split("|")]
    assert len(row) <= TABLE_WIDTH
    assert cells[1].startswith("…") and module.endswith(cells[1][1:])
    assert cells[2].endswith("…") and "NonDynamicallyQuantizableLinearWithAVeryLongName".startswith(cells[2][:-1])
    assert cells[3] == "linear/explicit"


def test_narrow_table_is_left_as_it_is():
    coverage = Coverage([CoverageRow("0", "Linear", "linear/gram", 650, True, "")])
    assert coverage.table().splitlines()[2] == "0 | 0      | Linear | linear/gram | 650    |"
