"""--unit-dropout: feature-level augmentation of the cached features (each region and word hidden
from the model with a probability, a fresh draw every step)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_train import data, run, train_cmd  # noqa: F401  (the precomp fixture)
from tshsr.encoding import window_membership
from tshsr_train.args import parse_args
from tshsr_train.batches import drop_units


def test_units_are_hidden_at_the_rate_and_every_item_keeps_one() -> None:
    mask = torch.zeros(400, 50, dtype=torch.bool)
    mask[:, :40] = True
    mask[0, 1:] = False  # an item of one unit: never emptied
    kept = drop_units(mask, 0.25, torch.Generator().manual_seed(0))
    assert kept.dtype == mask.dtype and not (kept & ~mask).any()  # padding stays padding
    assert kept[0, 0] and kept.any(1).all()
    assert 0.70 < kept[1:, :40].float().mean() < 0.80
    again = drop_units(mask, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(kept, again)  # the step's generator decides: a resumed run hides the same units
    floats = drop_units(mask.float(), 0.5, torch.Generator().manual_seed(1))
    assert floats.dtype == torch.float32 and set(floats.unique().tolist()) <= {0.0, 1.0}


def test_a_hidden_word_does_not_move_the_phrase_windows() -> None:
    full = torch.ones(1, 8, dtype=torch.bool)
    holed = full.clone()
    holed[0, 3] = False
    a, b = window_membership(full, 2, "sequence"), window_membership(holed, 2, "sequence")
    assert b[0, :, 3].abs().max() == 0
    # the other words keep their place along the caption: the window over the second half is unchanged
    torch.testing.assert_close(a[0, 1, 4:] / a[0, 1, 4:].sum(), b[0, 1, 4:] / b[0, 1, 4:].sum())


def test_the_flag_is_checked_and_recorded(data, tmp_path) -> None:  # noqa: F811
    assert parse_args(["--unit-dropout", "0.2"]).unit_dropout == 0.2
    with pytest.raises(SystemExit):
        parse_args(["--unit-dropout", "1.0"])
    out = tmp_path / "run"
    result = run(train_cmd(data, out, "--epochs", "1", "--preset", "tshsr", "--unit-dropout", "0.3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "train_args.json").read_text())["unit_dropout"] == 0.3
    assert "--unit-dropout 0.3" in (out / "README.md").read_text()  # the card lists it with the recipe
