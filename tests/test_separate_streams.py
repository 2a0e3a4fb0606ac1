"""separate_streams: each stream has its own towers, so the two streams stop sharing unit vectors."""

from __future__ import annotations

import pytest
import torch

from tshsr import TSHSRConfig, TSHSRModel
from tshsr.loss import LossSettings, matching_loss
from tshsr.losses import contrastive_loss
from tshsr.testing import assert_scoring_paths_agree

FLAGS = dict(level_cosine=True, context_skip=True, separate_streams=True)


def _encode(model, regions, captions):
    return model.encode_images(regions), model.encode_texts(captions)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.5)


def test_each_stream_reads_only_its_own_towers(make_model, regions, captions) -> None:
    model = make_model("tshsr", **FLAGS)
    before = model.score_encoded(*_encode(model, regions[:4], captions[:5]))
    _perturb(model.t2i_towers, seed=1)  # the t2i stream's towers: the i2t stream does not move
    after = model.score_encoded(*_encode(model, regions[:4], captions[:5]))
    torch.testing.assert_close(after.stream_scores["i2t"], before.stream_scores["i2t"])
    assert not torch.allclose(after.stream_scores["t2i"], before.stream_scores["t2i"])
    _perturb(model.image_proj, seed=2)  # i2t's image projection: the t2i stream does not move
    moved = model.score_encoded(*_encode(model, regions[:4], captions[:5]))
    torch.testing.assert_close(moved.stream_scores["t2i"], after.stream_scores["t2i"])
    assert not torch.allclose(moved.stream_scores["i2t"], after.stream_scores["i2t"])


def test_the_shortlist_cosine_is_the_mean_of_the_towers_and_every_path_agrees(make_model, regions,
                                                                           captions) -> None:
    model = make_model("tshsr", **FLAGS)
    images, texts = _encode(model, regions[:4], captions[:5])
    assert images.units.shape[-1] == 2 * model.config.embed_dim
    half = model.config.embed_dim
    cosines = [images.embedding[:, t] @ texts.embedding[:, t].T * 2 for t in (slice(0, half), slice(half, None))]
    for c in cosines:  # each tower's embedding is a unit vector of its own
        assert c.abs().max() <= 1 + 1e-5
    torch.testing.assert_close(model.global_similarity(images, texts), (cosines[0] + cosines[1]) / 2)
    # Pairs and grid agree; the alignment scores the loss trains are the ones the levels blend.
    assert_scoring_paths_agree(model, images, texts)


def test_each_tower_has_its_own_contrastive_term_and_trains(make_model, regions, captions) -> None:
    model = make_model("tshsr", **FLAGS).train()
    positive = torch.eye(4, dtype=torch.bool)
    images = model.encode_image_features(*model.image_features(regions[:4]))
    texts = model.encode_text_features(*model.text_features(captions[:4]))
    out = matching_loss(model, images, texts, positive, LossSettings(alignment_weight=1.0, hard_negatives=1),
                        hardest=False)
    half = model.config.embed_dim
    scale = model.logit_scale.exp()
    towers = [2 * images.embedding[:, t] @ texts.embedding[:, t].T for t in (slice(0, half), slice(half, None))]
    expected = (contrastive_loss(towers[0], positive, scale) + contrastive_loss(towers[1], positive, scale)) / 2
    torch.testing.assert_close(out.parts["contrastive"], expected)
    out.loss.backward()
    for layer in (model.image_proj, model.text_embed, model.t2i_towers.image_proj, model.t2i_towers.text_embed):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_saved_and_reloaded_and_only_where_both_streams_exist(make_model, regions, captions, tmp_path) -> None:
    model = make_model("tshsr", **FLAGS)
    images, texts = _encode(model, regions[:4], captions[:5])
    scores = model.score_encoded(images, texts).scores
    model.save_pretrained(tmp_path / "m")
    again = TSHSRModel.from_pretrained(tmp_path / "m")
    assert again.config.separate_streams
    assert "separate streams" in (tmp_path / "m" / "README.md").read_text()
    torch.testing.assert_close(again.score_encoded(*_encode(again, regions[:4], captions[:5])).scores, scores)
    # Configs without the flag read and hash as before.
    assert "separate_streams" not in TSHSRConfig.preset("tshsr").to_dict()
    for preset in ("sgr", "t2i", "i2t"):
        with pytest.raises(ValueError, match="separate_streams"):
            TSHSRConfig.preset(preset, separate_streams=True)
    # The dual encoder with two towers: the mean of two dual encoders' cosines.
    dual = make_model("dual", separate_streams=True)
    images, texts = _encode(dual, regions[:4], captions[:5])
    out = dual.score_encoded(images, texts)
    torch.testing.assert_close(out.scores, dual.global_similarity(images, texts))
