"""--text-context-layer: the caption context units pool a frozen lower layer of the transformers
text encoder (projected on their own) instead of the local level's word vectors, so the context
level reads features the local level does not have. That layer's states are cached in an entry of
their own, beside the split's shared entry (real all-MiniLM-L6-v2: marked slow; what is tested is
the plumbing, not what the layer is worth)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tshsr import TSHSRModel
from tshsr.attention import context_units
from tshsr.config import TSHSRConfig
from tshsr.features import backbone_key, cache_features, text_units_from_cache

pytestmark = pytest.mark.slow

CAPTIONS = ["A dog runs on the beach.", "Two children play football in a park", "a red car",
            "A man in a blue shirt is cooking vegetables in a large pan ."]
FLAGS = dict(context_pooling="windows", context_units_image=4, context_units_text=4, context_skip=True,
             level_cosine=True, separate_streams=True)


def precomputed(layer: int | None = 3, finetune: int = 1, **overrides) -> TSHSRModel:
    torch.manual_seed(0)
    config = TSHSRConfig.preset("tshsr", embed_dim=32, sim_dim=16, image_encoder="precomputed", image_feature_dim=16,
                                text_finetune_layers=finetune, text_context_layer=layer, **{**FLAGS, **overrides})
    return TSHSRModel(config).eval()


@pytest.fixture(scope="module")
def layered() -> TSHSRModel:
    return precomputed()


def regions(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 4, 16)).astype(np.float32)


def test_the_layer_rides_along_with_the_word_features(layered) -> None:
    with torch.no_grad():
        words, mask = layered.text_features(CAPTIONS)
        plain_words, plain_mask = precomputed(None).text_features(CAPTIONS)
        tok = layered.processor.tokenize(CAPTIONS)
        out = layered.text_backbone.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                                          output_hidden_states=True)
    assert words.shape[-1] == 2 * 384 and torch.equal(mask, plain_mask)
    torch.testing.assert_close(words[..., :384], plain_words)  # the local level's words are unchanged
    first = out.hidden_states[3][0][tok["word_mask"][0].bool()]  # caption 0's words after layer 3
    torch.testing.assert_close(words[0, :len(first), 384:], first)


@pytest.mark.parametrize("finetune", [0, 1])
def test_the_cache_gives_what_the_encoder_gives(tmp_path, finetune) -> None:
    model = precomputed(3, finetune)
    ids = ["a", "b", "c", "d"]
    cached = cache_features(model, regions(4), CAPTIONS, ids, [0, 1, 2, 3], tmp_path, progress=False)
    index = [2, 0, 3]
    with torch.no_grad():
        live, live_mask = model.text_features([CAPTIONS[i] for i in index])
        units, mask = text_units_from_cache(model, *cached.text_batch(index), context=cached.text_context_batch(index))
    assert torch.equal(mask, live_mask)
    torch.testing.assert_close(units, live, atol=2e-2, rtol=2e-2)  # float16 cache
    with pytest.raises(ValueError, match="text_context_layer"):
        text_units_from_cache(model, *cached.text_batch(index))


def test_the_split_entry_is_shared_with_models_that_read_no_layer(tmp_path) -> None:
    ids = ["a", "b", "c", "d"]
    plain = cache_features(precomputed(None), regions(4), CAPTIONS, ids, [0, 1, 2, 3], tmp_path, progress=False)
    cached = cache_features(precomputed(3), regions(4), CAPTIONS, ids, [0, 1, 2, 3], tmp_path, progress=False)
    assert cached.directory == plain.directory and plain.text_context is None
    layer_entries = [p.parent for p in Path(tmp_path).glob("*/key.json") if "text_layer" in json.loads(p.read_text())]
    assert len(layer_entries) == 1 and cached.text_context.shape == (4, 32, 384)
    cache_features(precomputed(2), regions(4), CAPTIONS, ids, [0, 1, 2, 3], tmp_path, progress=False)
    assert len([p for p in Path(tmp_path).glob("*/key.json") if "text_layer" in json.loads(p.read_text())]) == 2


def test_the_caption_context_units_pool_the_layer(layered) -> None:
    with torch.no_grad():
        words, mask = layered.text_features(CAPTIONS)
        texts = layered.encode_text_features(words, mask)
        assert texts.context_source.shape == (4, words.shape[1], 32)
        torch.testing.assert_close(texts.context, context_units(texts.context_source, texts.membership))
        shifted = words.clone()
        shifted[..., 384:] += 1.0
        moved = layered.encode_text_features(shifted, mask)
        for name in ("units", "pooled", "embedding"):  # the local and global inputs never read the layer
            torch.testing.assert_close(getattr(moved, name), getattr(texts, name))
        images = layered.encode_image_features(torch.from_numpy(regions()), torch.ones(3, 4, dtype=torch.bool))
        a = layered.score_encoded(images, texts).scores
        assert not torch.allclose(a, layered.score_encoded(images, moved).scores)  # the context level does
        with pytest.raises(ValueError, match="text_context_layer"):
            layered.encode_text_features(words[..., :384], mask)


def test_the_layer_projection_trains_under_context_detach() -> None:
    from tshsr.loss import LossSettings, matching_loss

    model = precomputed().train()
    model.head_kind.set_context_detach(model, True)
    images = model.encode_image_features(torch.from_numpy(regions(4)), torch.ones(4, 4, dtype=torch.bool))
    texts = model.encode_text_features(*model.text_features(CAPTIONS))
    settings = LossSettings(hard_negatives=-1, random_negatives=0, alignment_weight=1.0)
    matching_loss(model, images, texts, torch.eye(4, dtype=torch.bool), settings, hardest=False).loss.backward()
    assert model.text_context_proj.weight.grad is not None and model.text_context_proj.weight.grad.abs().sum() > 0


def test_the_demo_breakdown_and_attention_come_out(layered) -> None:
    from tshsr.explain import pair_attention

    with torch.no_grad():
        out = layered.score(regions(2), CAPTIONS[:2], return_attention=True)
    parts = sum(out.contributions[key] for key in layered.contribution_keys)
    torch.testing.assert_close(parts, out.scores)
    attention = pair_attention(out, 1, 0)
    assert attention.has_maps and attention.tokens


def test_saves_and_reloads_with_the_same_scores(layered, tmp_path) -> None:
    layered.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["text_context_layer"] == 3
    loaded = TSHSRModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(regions(), CAPTIONS).scores, layered.score(regions(), CAPTIONS).scores)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="text_context_layer"):
        TSHSRConfig.preset("flat", text_context_layer=3)
    with pytest.raises(ValueError, match="text_context_layer"):
        TSHSRConfig.preset("tshsr", text_encoder="bigru", vocab_size=10, text_context_layer=3)
    with pytest.raises(ValueError, match="text_context_layer"):
        TSHSRConfig.preset("tshsr", text_context_layer=-1)
    with pytest.raises(ValueError, match="a frozen one, 0 .* to 5"):  # layer 6 trains under text_finetune_layers=1
        precomputed(6, 1)
    assert "text_context_layer" not in TSHSRConfig.preset("tshsr").to_dict()
    assert backbone_key(precomputed(3).config) == backbone_key(precomputed(None).config)


def test_every_other_layer_starts_as_without_the_layer(layered) -> None:
    """The projection is built last: a run with the layer is paired with the run without it at the
    same seed (the same initial towers and head), so a difference between them is the lever's."""
    plain = precomputed(None).state_dict()
    extra = {k for k in layered.state_dict() if k not in plain}
    assert extra == {"text_context_proj.weight", "text_context_proj.bias"}
    for name, value in plain.items():
        torch.testing.assert_close(layered.state_dict()[name], value, msg=name)


def test_the_training_flag_builds_the_config() -> None:
    from tshsr_train.args import parse_args
    from tshsr_train.model_config import build_config

    args = parse_args(["--preset", "tshsr", "--text-context-layer", "3", "--text-finetune-layers", "1"])
    assert build_config(args, None).text_context_layer == 3
    assert build_config(parse_args(["--preset", "tshsr"]), None).text_context_layer is None


def test_the_model_card_says_what_the_caption_context_units_read(layered) -> None:
    from tshsr.hub import model_card

    card = str(model_card(layered.config))
    assert "frozen layer-3 states" in card and "image context units" not in card
    layered.config.text_context_layer = 0
    try:
        card = str(model_card(layered.config))
    finally:
        layered.config.text_context_layer = 3
    assert "token embeddings (layer 0)" in card and "layer-0" not in card
