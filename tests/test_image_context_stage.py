"""--image-context-stage: the image context units pool an earlier stage of the timm backbone
(pooled onto the last grid, projected on their own) instead of the local level's region vectors,
so the context level reads features the local level does not have.

The models here use EfficientNet-Lite0 with random weights (no download, no pretrained file) and
the BiGRU text encoder: what is tested is the plumbing, not what the stage features are worth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tshsr import TSHSRConfig, TSHSRModel
from tshsr.attention import context_units
from tshsr.features import backbone_key
from tshsr.loss import LossSettings, matching_loss

FLAGS = dict(context_pooling="windows", context_units_image=9, context_units_text=4, context_skip=True,
             level_cosine=True, separate_streams=True)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).standard_normal((3, 3, 96, 96)).astype(np.float32))


def _model(vocab, stage: int | None = 3, **overrides) -> TSHSRModel:
    torch.manual_seed(0)
    config = TSHSRConfig.preset("tshsr", text_encoder="bigru", vocab_size=len(vocab), embed_dim=32, sim_dim=16,
                                image_context_stage=stage, **{**FLAGS, **overrides})
    return TSHSRModel(config, vocabulary=vocab, pretrained_backbones=False).eval()


@pytest.fixture(scope="module")
def staged(vocab) -> TSHSRModel:
    return _model(vocab)


def _features(model, pixels):
    with torch.no_grad():
        return model.image_backbone(pixels)


def test_the_stage_features_ride_along_with_the_regions(staged, vocab, pixels) -> None:
    assert staged.config.image_context_dim == 112 and staged.config.image_feature_dim == 1280
    regions, mask = _features(staged, pixels)
    assert regions.shape == (3, 9, 1280 + 112) and mask.all()  # 96 px: a 3x3 grid at stride 32
    plain = _model(vocab, stage=None)
    plain.image_backbone.load_state_dict(staged.image_backbone.state_dict())  # strict: the same tensors
    torch.testing.assert_close(regions[..., :1280], _features(plain, pixels)[0])  # the hook changes nothing
    assert not staged.image_backbone.model.get_submodule("blocks.4")._forward_hooks  # and is gone after the call


def test_the_image_context_units_pool_the_stage_features(staged, pixels, captions) -> None:
    regions, mask = _features(staged, pixels)
    images = staged.encode_image_features(regions, mask)
    assert images.context_source.shape == (3, 9, 32)
    torch.testing.assert_close(images.context, context_units(images.context_source, images.membership))
    shifted = regions.clone()
    shifted[..., 1280:] += 1.0
    moved = staged.encode_image_features(shifted, mask)
    for name in ("units", "pooled", "embedding"):  # the local and global inputs never read the stage
        torch.testing.assert_close(getattr(moved, name), getattr(images, name))
    texts = staged.encode_texts(captions[:4])
    a = staged.score_encoded(images, texts).scores
    assert not torch.allclose(a, staged.score_encoded(moved, texts).scores)  # the context level does
    torch.testing.assert_close(staged.score_encoded(images[[2, 0]], texts).scores, a[[2, 0]])  # (indexing)
    torch.testing.assert_close(type(images).cat([images[[0]], images[[1, 2]]]).context_source,
                               images.context_source)


def test_the_stage_projection_trains_under_context_detach(vocab, pixels, captions) -> None:
    model = _model(vocab).train()
    model.head_kind.set_context_detach(model, True)
    regions, mask = _features(model, pixels)
    images = model.encode_image_features(regions, mask)
    texts = model.encode_texts(captions[:3])
    settings = LossSettings(hard_negatives=-1, random_negatives=0, alignment_weight=1.0)
    out = matching_loss(model, images, texts, torch.eye(3, dtype=torch.bool), settings, hardest=False)
    out.loss.backward()
    assert model.image_context_proj.weight.grad is not None and model.image_context_proj.weight.grad.abs().sum() > 0


def test_a_feature_width_that_does_not_match_is_refused(staged, pixels) -> None:
    regions, mask = _features(staged, pixels)
    with pytest.raises(ValueError, match="image_context_stage"):
        staged.encode_image_features(regions[..., :1280], mask)


def test_saves_and_reloads_with_the_same_scores(staged, pixels, captions, tmp_path) -> None:
    staged.save_pretrained(tmp_path)
    loaded = TSHSRModel.from_pretrained(tmp_path)
    loaded.image_backbone.load_state_dict(staged.image_backbone.state_dict())
    assert loaded.config.image_context_stage == 3 and loaded.config.image_context_dim == 112
    regions, mask = _features(staged, pixels)
    a = staged.score_encoded(staged.encode_image_features(regions, mask), staged.encode_texts(captions)).scores
    b = loaded.score_encoded(loaded.encode_image_features(regions, mask), loaded.encode_texts(captions)).scores
    torch.testing.assert_close(a, b)


def test_config_needs_a_timm_backbone_and_the_context_level_and_stays_out_of_older_configs(staged) -> None:
    with pytest.raises(ValueError, match="image_context_stage"):
        TSHSRConfig.preset("flat", image_context_stage=3)
    with pytest.raises(ValueError, match="image_context_stage"):
        TSHSRConfig.preset("tshsr", image_encoder="precomputed", image_feature_dim=16, image_context_stage=3)
    plain = TSHSRConfig.preset("tshsr")
    assert "image_context_stage" not in plain.to_dict() and "image_context_dim" not in plain.to_dict()
    assert staged.config.to_dict()["image_context_stage"] == 3
    # a cache of plain regions is never read as regions with stage features, nor the other way round
    assert backbone_key(staged.config) != backbone_key(plain)
    assert "image_context_stage" not in backbone_key(plain)


def test_a_stage_the_backbone_does_not_have_is_refused(vocab) -> None:
    with pytest.raises(ValueError, match="feature stages"):
        _model(vocab, stage=9)


def test_the_training_flag_builds_the_config() -> None:
    from tshsr_train.args import parse_args
    from tshsr_train.model_config import build_config

    args = parse_args(["--preset", "tshsr", "--image-context-stage", "3", "--context-pooling", "windows",
                       "--context-units", "9", "4"])
    assert build_config(args, None).image_context_stage == 3
    assert build_config(parse_args(["--preset", "tshsr"]), None).image_context_stage is None


def test_every_other_layer_starts_as_without_the_stage(staged, vocab) -> None:
    """The projection is built last: a run with the stage is paired with the run without it at the
    same seed (the same initial towers and head), so a difference between them is the lever's."""
    plain = _model(vocab, stage=None).state_dict()
    extra = {k for k in staged.state_dict() if k not in plain}
    assert extra == {"image_context_proj.weight", "image_context_proj.bias"}
    for name, value in plain.items():
        torch.testing.assert_close(staged.state_dict()[name], value, msg=name)


def test_the_model_card_says_what_the_image_context_units_read(staged) -> None:
    from tshsr.hub import model_card

    card = str(model_card(staged.config))
    assert "the backbone's stage-3 features" in card and "caption context units" not in card
