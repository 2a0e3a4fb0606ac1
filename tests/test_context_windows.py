"""context_pooling='windows': each context unit is a fixed window (phrase windows along the caption,
neighbourhoods on the image grid) instead of a learned soft group."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import FEATURE_DIM
from tshsr import TSHSRConfig, TSHSRModel
from tshsr.encoding import window_membership
from tshsr.testing import assert_scoring_paths_agree

FLAGS = dict(level_cosine=True, context_skip=True, separate_streams=True, context_pooling="windows",
             context_units_image=4, context_units_text=3)


@pytest.fixture()
def grid_regions() -> np.ndarray:
    """Six 'images' of a 3x3 grid of 16-d regions."""
    return np.random.default_rng(0).standard_normal((6, 9, FEATURE_DIM)).astype(np.float32)


def test_windows_follow_each_caption_and_the_grid() -> None:
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :8], mask[1, :4] = True, True
    text = window_membership(mask, 2, "sequence")
    torch.testing.assert_close(text.sum(-1), torch.ones(2, 2))
    assert text[1, :, 4:].abs().max() == 0  # padding belongs to no window
    assert text[0, 0, :4].sum() > 0.75 and text[0, 1, 4:].sum() > 0.75  # first half, second half
    assert text[1, 0, :2].sum() > 0.75  # along the caption's own length
    grid = window_membership(torch.ones(1, 16, dtype=torch.bool), 4, "grid")[0].view(4, 4, 4)
    assert grid[0, :2, :2].sum() > 0.6 and grid[3, 2:, 2:].sum() > 0.6  # top-left, bottom-right quadrant
    with pytest.raises(ValueError, match="square grid"):
        window_membership(torch.ones(1, 5, dtype=torch.bool), 4, "grid")


def test_windows_need_no_queries_score_consistently_and_round_trip(make_model, grid_regions, captions,
                                                                  tmp_path) -> None:
    model = make_model("tshsr", **FLAGS)
    assert not hasattr(model, "image_context_queries")
    images, texts = model.encode_images(grid_regions[:4]), model.encode_texts(captions[:5])
    assert images.membership.shape == (4, 4, 9)
    assert_scoring_paths_agree(model, images, texts)
    model.save_pretrained(tmp_path / "m")
    again = TSHSRModel.from_pretrained(tmp_path / "m")
    assert again.config.context_pooling == "windows"
    torch.testing.assert_close(again.score(grid_regions[:2], captions[:3]), model.score(grid_regions[:2], captions[:3]))


def test_learned_pooling_is_not_written_and_bad_settings_are_refused(make_model, regions) -> None:
    assert "context_pooling" not in TSHSRConfig().to_dict()  # older config.json files hash as before
    with pytest.raises(ValueError, match="not a square"):
        TSHSRConfig(context_pooling="windows", context_units_image=6)
    with pytest.raises(ValueError, match="context_pooling"):
        TSHSRConfig(context_pooling="phrases")
    model = make_model("tshsr", **FLAGS)
    with pytest.raises(ValueError, match="square grid"):  # five detector-like regions have no layout
        model.encode_images(regions[:2])
