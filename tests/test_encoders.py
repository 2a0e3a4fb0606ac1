"""Backbones: the offline EfficientNet-Lite weights are the real ImageNet weights, the model's own
preprocessing feeds them correctly, MiniLM word units line up with the words, and weight
resolution fails loudly instead of ever handing back random weights."""

from __future__ import annotations

import pytest
import timm
import timm.data
import torch
from PIL import Image
from safetensors.torch import save_file

from tshsr.encoders import (
    WeightsNotFoundError,
    compact_units,
    load_timm_backbone,
    resolve_text_model,
)


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return load_timm_backbone("tf_efficientnet_lite0").eval()


@pytest.fixture(scope="module")
def espresso_index() -> int:
    info = timm.data.ImageNetInfo()
    matches = [i for i in range(info.num_classes()) if info.index_to_description(i) == "espresso"]
    assert matches == [967], matches  # ImageNet-1k class 967, synset n07920052
    assert info.index_to_label_name(967) == "n07920052"
    return matches[0]


def test_efficientnet_lite0_recognises_espresso(lite0, coffee_path, espresso_index) -> None:
    config = timm.data.resolve_data_config({}, model=lite0)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)  # TF-ported weights
    transform = timm.data.create_transform(**config)
    pixels = transform(Image.open(coffee_path).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        probs = lite0(pixels).softmax(-1)[0]
    assert int(probs.argmax()) == espresso_index
    assert probs[espresso_index] > 0.3  # confidently, not by a hair


def test_model_preprocessing_feeds_the_backbone_correctly(real_model, lite0, coffee_path, espresso_index) -> None:
    """The processor's resize + normalisation (from the backbone's data config) keeps the
    classifier right, and the model's frozen backbone holds those same pretrained weights."""
    cfg = real_model.config
    assert cfg.image_size == 224 and cfg.image_mean == (0.5, 0.5, 0.5) and cfg.image_std == (0.5, 0.5, 0.5)
    assert cfg.image_feature_dim == 1280
    pixels = real_model.processor.preprocess_images([coffee_path])
    with torch.no_grad():
        assert int(lite0(pixels).argmax(-1)) == espresso_index
        regions, mask = real_model.image_features([coffee_path])
        reference = lite0.forward_features(pixels)  # [1, 1280, 7, 7]
    assert regions.shape == (1, 49, 1280) and mask.all()
    assert torch.allclose(regions, reference.flatten(2).transpose(1, 2), atol=1e-5)  # row-major grid
    assert real_model.image_grid() == (7, 7)
    # Frozen: no gradients, eval mode even when the model trains.
    real_model.train()
    try:
        assert not real_model.image_backbone.training and not real_model.text_backbone.training
    finally:
        real_model.eval()
    assert not any(p.requires_grad for p in real_model.image_backbone.parameters())


def test_minilm_word_units_line_up_with_words(real_model) -> None:
    texts = ["a cup of coffee", "espresso"]
    tokenizer = real_model.processor.tokenizer
    assert real_model.processor.tokens(texts[0]) == ["a", "cup", "of", "coffee"]  # no [CLS]/[SEP]
    feats, mask = real_model.text_features(texts)
    assert mask.sum(1).tolist() == [len(tokenizer.tokenize(t)) for t in texts]
    with torch.no_grad():
        for i, text in enumerate(texts):
            enc = tokenizer(text, return_tensors="pt")
            hidden = real_model.text_backbone.model(**enc).last_hidden_state[0, 1:-1]  # drop [CLS], [SEP]
            n = hidden.shape[0]
            assert torch.allclose(feats[i, :n], hidden, atol=1e-4)
            assert (feats[i, n:] == 0).all()


def test_compact_units_moves_valid_units_to_the_front() -> None:
    features = torch.arange(10, dtype=torch.float32).view(2, 5, 1)
    mask = torch.tensor([[False, True, True, False, False], [False, True, False, True, True]])
    compact, new_mask = compact_units(features, mask)
    assert compact.shape == (2, 3, 1)
    assert compact[..., 0].tolist() == [[1, 2, 0], [6, 8, 9]]
    assert new_mask.tolist() == [[True, True, False], [True, True, True]]


def test_offline_text_model_resolves_to_a_local_folder() -> None:
    from pathlib import Path

    path = resolve_text_model("sentence-transformers/all-MiniLM-L6-v2")
    assert Path(path).is_dir() and (Path(path) / "config.json").is_file()
    assert resolve_text_model("someone/unknown-model") == "someone/unknown-model"


# ----------------------------------------------------------------------------------------------
# Weight resolution errors (a tiny timm test network keeps these fast)
# ----------------------------------------------------------------------------------------------
def test_unknown_timm_backbone_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="Unknown timm backbone 'efficientnet_b99_imaginary'"):
        load_timm_backbone("efficientnet_b99_imaginary")


def test_missing_weight_file_is_a_clear_error(tmp_path) -> None:
    missing = tmp_path / "weights" / "lite0.safetensors"
    with pytest.raises(WeightsNotFoundError, match=f"weight file not found: {missing}"):
        load_timm_backbone("test_efficientnet", weights=str(missing))


def test_no_weight_source_is_a_clear_error(monkeypatch) -> None:
    """No local file, no offline package, no Hub (offline): refuse, never random weights."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # even where a Hub is reachable
    with pytest.raises(WeightsNotFoundError, match="No pretrained weights for timm backbone 'test_resnet'"):
        load_timm_backbone("test_resnet")


def test_weight_files_are_checked_tensor_by_tensor(tmp_path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("test_efficientnet", pretrained=False)
    state = source.state_dict()

    # Same keys: loaded as they are.
    path = tmp_path / "same.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_timm_backbone("test_efficientnet", weights=str(path)).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    # Other key names, same order and shapes (the EfficientNet-Lite release): remapped in order.
    path = tmp_path / "renamed.pth"
    torch.save({f"_layer{i}": v for i, v in enumerate(state.values())}, path)
    loaded = load_timm_backbone("test_efficientnet", weights=str(path)).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    # A tensor that does not fit is named.
    renamed = {f"_layer{i}": v for i, v in enumerate(state.values())}
    renamed["_layer0"] = torch.zeros(renamed["_layer0"].numel() + 1)
    path = tmp_path / "misfit.pth"
    torch.save(renamed, path)
    with pytest.raises(ValueError, match="tensor _layer0 .* does not fit conv_stem.weight"):
        load_timm_backbone("test_efficientnet", weights=str(path))

    # Another network's weights altogether.
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match=f"1 tensors, the timm model expects {len(state)}"):
        load_timm_backbone("test_efficientnet", weights=str(path))

    # safetensors keeps no tensor order: other key names cannot be paired by position.
    path = tmp_path / "renamed.safetensors"
    save_file({f"_layer{i}": v.contiguous() for i, v in enumerate(state.values())}, str(path))
    with pytest.raises(ValueError, match="must use timm's key names"):
        load_timm_backbone("test_efficientnet", weights=str(path))
