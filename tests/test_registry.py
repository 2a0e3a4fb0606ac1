"""Heads registered by name (tshsr.registry), the fixed-shape scoring outputs, and forward as the
training entry."""

from __future__ import annotations

import pytest
import torch

from tshsr import TSHSRModel, TSHSROutput, TSHSRPairOutput
from tshsr.loss import LossSettings
from tshsr.registry import _HEADS, DualEncoderHead, get_head, head_names, register_head
from tests.conftest import tiny_config

PRESETS = ("tshsr", "flat", "t2i", "i2t", "sgr", "saf", "dual")


def test_registry_names_every_head_and_refuses_duplicates() -> None:
    assert set(head_names()) == {"tshsr", "sgr", "saf", "dual"}
    assert get_head("saf").contribution_keys(None) == ["t2i/local"]
    with pytest.raises(ValueError, match="already registered"):
        register_head("dual")(DualEncoderHead)
    with pytest.raises(ValueError, match="expected one of"):
        get_head("scan")


def test_a_new_head_is_one_registered_class(vocab, regions, captions) -> None:
    """A head added by registration alone is accepted by the config and scored by the engine."""

    @register_head("scaled_cosine")
    class ScaledCosine(DualEncoderHead):
        def contribution_keys(self, config):
            return ["cos/global"]

        def build(self, model, config):
            model.cosine_scale = torch.nn.Parameter(torch.tensor(2.0))

        def run(self, model, img, txt, cosine, want_maps, grid):
            value = model.cosine_scale * cosine
            return {"cos/global": value}, {"cos/global": cosine}, {"cos": cosine}, {}

    try:
        config = tiny_config("dual", vocab, head="scaled_cosine")
        model = TSHSRModel(config, vocabulary=vocab).eval()
        assert "cosine_scale" in model.saved_state_dict()
        out = model.score(list(regions[:3]), captions[:4])
        torch.testing.assert_close(out.scores, 2.0 * out.global_similarity)
        assert list(out.contributions) == ["cos/global"] and model.engine.auto_block_pairs(
            model.encode_images(list(regions[:1])), model.encode_texts(captions[:1])) == 65536
    finally:
        del _HEADS["scaled_cosine"]


@pytest.mark.parametrize("preset", PRESETS)
def test_outputs_have_one_shape_per_method(preset, make_model, regions, captions) -> None:
    model = make_model(preset)
    images, texts = model.encode_images(list(regions)), model.encode_texts(captions)
    grid = model.score_encoded(images, texts, block_pairs=5)
    assert type(grid) is TSHSROutput
    shape = (len(regions), len(captions))
    for tensor in [grid.scores, grid.global_similarity, *grid.contributions.values(),
                   *grid.level_scores.values(), *grid.stream_scores.values()]:
        assert tuple(tensor.shape) == shape
    pairs = model.score_pairs(images, texts, [0, 5, 2], [6, 0, 3])
    assert isinstance(pairs, TSHSRPairOutput) and not isinstance(pairs, TSHSROutput)
    for tensor in [pairs.scores, *pairs.contributions.values(), *pairs.stream_scores.values()]:
        assert tuple(tensor.shape) == (3,)
    torch.testing.assert_close(pairs.scores, grid.scores[[0, 5, 2], [6, 0, 3]], atol=1e-6, rtol=1e-5)


def test_forward_returns_the_loss_and_its_parts(make_model, regions, captions) -> None:
    model = make_model("tshsr").train()
    feats, fmask = model.image_features(regions[:4])
    toks, tmask = model.text_features(captions[:4])
    positive = torch.eye(4, dtype=torch.bool)
    out = model(feats, fmask, toks, tmask, positive, settings=LossSettings(hard_negatives=-1),
                generator=torch.Generator().manual_seed(0))
    assert set(out.parts) == {"contrastive", "hinge", "aux_streams", "pairs"}
    assert int(out.parts["pairs"]) == 16  # every pair with hard_negatives=-1
    expected = out.parts["contrastive"] + out.parts["hinge"] + 0.5 * out.parts["aux_streams"]
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.text_proj.weight.grad is not None
    assert model.streams["i2t"].local_readout.score.weight.grad.abs().sum() > 0

    dual = make_model("dual").train()
    only = dual(feats, fmask, toks, tmask, positive)
    assert set(only.parts) == {"contrastive"}  # no cross-attention: no pairs to mine
