"""level_fusion='fixed': a fixed weight per level, e.g. a context level that feeds the reasoning
but adds nothing to the score by itself."""

from __future__ import annotations

import pytest
import torch

from tshsr import TSHSRConfig, TSHSRModel


def test_fixed_weights_set_each_level_share_and_round_trip(make_model, regions, captions, tmp_path) -> None:
    model = make_model("tshsr", stream_fusion="equal", level_fusion="fixed", level_weights=(1, 0, 1))
    weights = model.mixing_weights()
    assert weights["i2t/context"] == 0 and weights["t2i/global"] == pytest.approx(0.25)
    out = model.score(regions[:3], captions[:4])
    assert out.contributions["i2t/context"].abs().max() == 0
    torch.testing.assert_close(sum(out.contributions.values()), out.scores)
    model.save_pretrained(tmp_path / "m")
    again = TSHSRModel.from_pretrained(tmp_path / "m")
    assert again.config.level_weights == (1.0, 0.0, 1.0)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "local 0.50, context 0.00, global 0.50 (the context level feeds the global level" in card
    torch.testing.assert_close(again.score(regions[:3], captions[:4]).scores, out.scores)


def test_fixed_weights_are_checked_and_not_written_when_unused() -> None:
    assert "level_weights" not in TSHSRConfig().to_dict()  # older config.json files hash as before
    with pytest.raises(ValueError, match="go together"):
        TSHSRConfig(level_fusion="fixed")
    with pytest.raises(ValueError, match="one non-negative weight per level"):
        TSHSRConfig(level_fusion="fixed", level_weights=(0.5, 0.5))
    with pytest.raises(ValueError, match="one non-negative weight per level"):
        TSHSRConfig(level_fusion="fixed", level_weights=(0, 0, 0))


def test_the_demo_says_which_parts_have_no_score_weight(make_model) -> None:
    pytest.importorskip("gradio")
    from tshsr_app.page import weights_note

    assert weights_note(make_model("tshsr").mixing_weights()) == ""
    note = weights_note(make_model("tshsr", stream_fusion="equal", level_fusion="fixed",
                                   level_weights=(1, 0, 1)).mixing_weights())
    assert "context level has no weight" in note and "empty by design" in note
    assert weights_note({"i2t/local": 0.5, "i2t/context": 0.0, "t2i/local": 0.5, "t2i/context": 0.25}) == (
        "Parts with no weight in this model's score (their bars are empty): i2t/context.")


def test_each_stream_can_have_its_own_level_weights(make_model, regions, captions, tmp_path) -> None:
    """Six weights, i2t's set first: a level (here the context level) may count in one stream's score only."""
    model = make_model("tshsr", stream_fusion="equal", level_fusion="fixed", level_weights=(1, 1, 1, 1, 0, 1))
    weights = model.mixing_weights()
    assert weights["i2t/context"] == pytest.approx(0.5 / 3) and weights["t2i/context"] == 0
    assert weights["t2i/global"] == pytest.approx(0.25) and sum(weights.values()) == pytest.approx(1.0)
    out = model.score(regions[:3], captions[:4])
    assert out.contributions["t2i/context"].abs().max() == 0 and out.contributions["i2t/context"].abs().max() > 0
    torch.testing.assert_close(sum(out.contributions.values()), out.scores)
    model.save_pretrained(tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert "the i2t stream's score: local 0.33, context 0.33, global 0.33" in card
    assert "the t2i stream's score: local 0.50, context 0.00, global 0.50 (the context level feeds" in card
    again = TSHSRModel.from_pretrained(tmp_path / "m")
    assert again.config.level_weights == (1.0, 1.0, 1.0, 1.0, 0.0, 1.0)
    torch.testing.assert_close(again.score(regions[:3], captions[:4]).scores, out.scores)
    with pytest.raises(ValueError, match="one such set per stream"):
        TSHSRConfig(level_fusion="fixed", level_weights=(1, 1, 1, 0, 0, 0))  # t2i's set all zero
    with pytest.raises(ValueError, match="one such set per stream"):
        TSHSRConfig(level_fusion="fixed", level_weights=(1, 1, 1, 1))
