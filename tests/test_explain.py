"""tshsr.explain: the plots draw the model's numbers exactly; attention maps line up with words and cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tshsr.explain import (
    contribution_figure,
    key_label,
    overlay_heatmap,
    pair_attention,
    region_top_words,
    region_words_figure,
    upsample,
    word_heatmaps,
)
from tshsr.model import TSHSROutput

KEYS = ["i2t/local", "i2t/context", "i2t/global", "t2i/local", "t2i/context", "t2i/global"]


def _bars_by_row(fig):
    """{bar centre y: [(left, width), ...]} of every bar segment in the figure's axes."""
    ax = fig.axes[0]
    rows: dict[float, list[tuple[float, float]]] = {}
    for patch in ax.patches:
        if patch.get_width() == 0:
            continue
        y = round(patch.get_y() + patch.get_height() / 2, 6)
        rows.setdefault(y, []).append((patch.get_x(), patch.get_width()))
    return rows


def test_contribution_bars_are_the_given_parts_stacked_from_zero() -> None:
    rows = [
        {"i2t/local": 0.30, "i2t/context": 0.10, "i2t/global": 0.05, "t2i/local": 0.20, "t2i/context": -0.04,
         "t2i/global": 0.02},
        {"i2t/local": 0.10, "i2t/context": 0.05, "i2t/global": -0.02, "t2i/local": 0.08, "t2i/context": 0.01,
         "t2i/global": -0.03},
    ]
    scores = [sum(r.values()) for r in rows]
    fig = contribution_figure(rows, ["first", "second"], scores=scores, keys=KEYS)
    bars = _bars_by_row(fig)
    assert len(bars) == 2
    for y, row in zip(sorted(bars, reverse=True), rows):  # first row drawn on top
        segments = bars[y]
        positive = sorted(v for v in row.values() if v > 0)
        negative = sorted(-v for v in row.values() if v < 0)
        widths = [w for _, w in segments]
        assert sorted(w for w in widths if w > 0) == pytest.approx(positive)
        assert sorted(-w for w in widths if w < 0) == pytest.approx(negative)
        # Positive parts stack rightwards from 0 without gaps, negative ones leftwards.
        pos = sorted((x, w) for x, w in segments if w > 0)
        assert pos[0][0] == pytest.approx(0.0)
        assert pos[-1][0] + pos[-1][1] == pytest.approx(sum(positive))
        neg_ends = [x + w for x, w in segments if w < 0]
        if neg_ends:
            assert min(neg_ends) == pytest.approx(-sum(negative))
    # The diamonds mark the totals.
    offsets = fig.axes[0].collections[0].get_offsets()
    assert sorted(offsets[:, 0]) == pytest.approx(sorted(scores))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert key_label("t2i/context") in labels and "total score" in labels


def test_contribution_figure_rejects_mismatched_labels() -> None:
    with pytest.raises(ValueError):
        contribution_figure([{"i2t/local": 1.0}], ["a", "b"])


def _fake_output(n_words_padded=5, n_tokens=3, grid=(2, 3)) -> TSHSROutput:
    k = grid[0] * grid[1]
    rng = np.random.default_rng(0)
    t2i = torch.tensor(rng.random((1, 1, n_words_padded, k)), dtype=torch.float32)
    t2i[0, 0, 0] = torch.tensor([0, 0, 0, 0, 0, 1.0])  # word 0 looks only at the bottom-right cell
    i2t = torch.tensor(rng.random((1, 1, k, n_words_padded)), dtype=torch.float32)
    i2t[0, 0, 1] = torch.tensor([0.1, 0.7, 0.2, 0, 0])  # region 1 looks mostly at word 1
    region_weights = torch.tensor([[[0.1, 0.5, 0.1, 0.1, 0.1, 0.1]]])
    return TSHSROutput(
        scores=torch.zeros(1, 1), contributions={},
        attentions={"t2i": {"attention": t2i, "local_weights": torch.rand(1, 1, n_words_padded)},
                    "i2t": {"attention": i2t, "local_weights": region_weights}},
        text_tokens=[["red", "dog", "runs"][:n_tokens]], image_grid=grid)


def test_pair_attention_is_trimmed_to_the_caption_words() -> None:
    att = pair_attention(_fake_output())
    assert att.tokens == ["red", "dog", "runs"]
    assert att.word_to_region.shape == (3, 6) and att.word_weights.shape == (3,)
    assert att.region_to_word.shape == (6, 3) and att.region_weights.shape == (6,)
    assert att.grid == (2, 3)


def test_pair_attention_rejects_a_grid_that_does_not_hold_the_regions() -> None:
    out = _fake_output()
    out.image_grid = (3, 3)  # 9 cells for 6 regions
    with pytest.raises(ValueError, match="grid"):
        pair_attention(out)


def test_region_top_words_orders_regions_by_weight_and_words_by_attention() -> None:
    rows = region_top_words(pair_attention(_fake_output()), k=2)
    assert rows[0]["region"] == 1 and rows[0]["cell"] == (0, 1)
    assert [w for w, _ in rows[0]["words"]] == ["dog", "runs"]
    assert rows[0]["words"][0][1] == pytest.approx(0.7)


def test_word_heatmap_lights_up_the_attended_cell() -> None:
    photo = Image.new("RGB", (90, 60), (128, 128, 128))
    maps = word_heatmaps(photo, pair_attention(_fake_output()))
    assert len(maps) == 3 and maps[0][1].startswith("red")
    changed = np.abs(np.asarray(maps[0][0], dtype=float) - 128).sum(-1)
    h, w = changed.shape
    assert changed[h * 3 // 4:, w * 5 // 6:].mean() > 5 * changed[: h // 4, : w // 3].mean() + 1


def test_upsample_and_overlay_keep_the_photo_size() -> None:
    cells = np.arange(6, dtype=float).reshape(2, 3)
    assert upsample(cells, (90, 40)).shape == (40, 90)
    assert overlay_heatmap(Image.new("RGB", (90, 40)), cells).size == (90, 40)
    with pytest.raises(ValueError):
        upsample(np.zeros(6), (10, 10))


def test_region_words_figure_labels_each_cell_with_its_top_word() -> None:
    fig = region_words_figure(Image.new("RGB", (90, 60)), pair_attention(_fake_output()))
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 6 and texts[1] == "dog"


def test_region_top_words_orders_regions_by_match_when_the_model_has_alignment_levels() -> None:
    out = _fake_output()
    out.attentions["i2t"]["unit_alignment"] = torch.tensor([[[0.1, 0.2, 0.9, 0.3, 0.0, 0.4]]])
    attention = pair_attention(out)
    rows = region_top_words(attention, k=1)
    assert [r["region"] for r in rows[:2]] == [2, 5] and rows[0]["match"] == pytest.approx(0.9)
    assert rows[0]["weight"] == pytest.approx(0.1)  # the readout weight is still reported


def test_unit_alignment_maps_average_to_the_local_alignment_score(make_model, regions, captions) -> None:
    from tshsr.encoding import head_inputs

    model = make_model("tshsr", level_cosine=True).eval()
    images = model.encode_image_features(*model.image_features(regions[:2]))
    texts = model.encode_text_features(*model.text_features(captions[:3]))
    with torch.no_grad():
        out = model.score_encoded(images, texts, return_attention=True)
        aligned = model.head_kind.alignment_scores(model, head_inputs(images, torch.arange(2)),
                                                   head_inputs(texts, torch.arange(3)))
    i2t = out.attentions["i2t"]["unit_alignment"]  # [2, 3, regions]: every region is valid
    torch.testing.assert_close(i2t.mean(-1), aligned["i2t/local"], atol=1e-5, rtol=1e-4)
    t2i = out.attentions["t2i"]["unit_alignment"]  # [2, 3, words]: padded words are zero
    n_words = (t2i != 0).sum(-1).clamp(min=1)
    torch.testing.assert_close(t2i.sum(-1) / n_words, aligned["t2i/local"], atol=1e-5, rtol=1e-4)
