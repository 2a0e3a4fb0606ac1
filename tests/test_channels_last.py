"""--channels-last: the image backbone caches its features in the channels-last memory layout (faster
on CPU), and the cache keeps those features apart from the default layout's, which differ by float
rounding.

The models use EfficientNet-Lite0 with random weights and the BiGRU text encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_train import data, run, train_cmd  # noqa: F401  (the precomp fixture)
from tshsr import TSHSRConfig, TSHSRModel
from tshsr.features import backbone_key, cache_features, feature_key
from tshsr.views import cache_image_view
from tshsr_train.args import parse_args


def _model(vocab) -> TSHSRModel:
    torch.manual_seed(0)
    config = TSHSRConfig.preset("flat", text_encoder="bigru", vocab_size=len(vocab), embed_dim=32, sim_dim=16,
                                image_size=96)
    return TSHSRModel(config, vocabulary=vocab, pretrained_backbones=False).eval()


@pytest.fixture()
def photos() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, size=(70, 90, 3), dtype=np.uint8)) for _ in range(3)]


def test_the_features_are_the_default_layouts_up_to_rounding(vocab, photos) -> None:
    model = _model(vocab)
    expected, mask = model.image_features(photos)
    model.image_backbone.set_channels_last()
    got, got_mask = model.image_features(photos)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got_mask, mask)
    model.image_backbone.set_channels_last(False)  # and back: the default layout's features exactly
    assert torch.equal(model.image_features(photos)[0], expected)


def test_the_cache_keeps_the_layouts_apart(vocab, photos, tmp_path) -> None:
    model = _model(vocab)
    assert feature_key(model) == backbone_key(model.config)  # the default layout keeps its existing entries
    ids, captions, owners = ["a", "b", "c"], ["a dog runs", "a cat sits", "two birds"], [0, 1, 2]
    plain = cache_features(model, photos, captions, ids, owners, tmp_path, progress=False)
    model.image_backbone.set_channels_last()
    assert feature_key(model) == {**backbone_key(model.config), "channels_last": True}
    fast = cache_features(model, photos, captions, ids, owners, tmp_path, progress=False)
    assert fast.directory != plain.directory  # an entry of its own, not the default layout's reused
    np.testing.assert_allclose(fast.images.astype(np.float32), plain.images.astype(np.float32), rtol=2e-3, atol=2e-3)
    cache_image_view(model, photos, ids, "hflip", tmp_path, progress=False)
    model.image_backbone.set_channels_last(False)
    cache_image_view(model, photos, ids, "hflip", tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 4  # the split and the mirror, once in each layout


def test_the_flag_needs_a_timm_backbone(data, tmp_path) -> None:  # noqa: F811
    assert parse_args(["--channels-last"]).channels_last and not parse_args([]).channels_last
    result = run(train_cmd(data, tmp_path / "run", "--epochs", "1", "--channels-last"))
    assert result.returncode != 0 and "--channels-last is for" in result.stderr


def test_the_diagnosis_reads_the_features_a_channels_last_run_trained_on(vocab, tmp_path, monkeypatch) -> None:
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import streams_diagnosis
    import tshsr.data
    import tshsr_train.loop

    _model(vocab).save_pretrained(tmp_path)
    seen = []
    monkeypatch.setattr(tshsr.data, "load_split", lambda *a, **k: None)
    monkeypatch.setattr(tshsr_train.loop, "BatchSource", lambda model, *a, **k: seen.append(model) or model)
    monkeypatch.setattr(tshsr_train.loop, "encode_source", lambda *a: (None, None))
    for flag in (False, True):
        (tmp_path / "train_args.json").write_text(json.dumps({"channels_last": flag}))
        streams_diagnosis.encode_split(tmp_path, "unused", "unused")
    assert [m.image_backbone.channels_last for m in seen] == [False, True]


def test_the_speed_benchmark_times_both_layouts_and_reports_the_drift() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from channels_last_speed import compare, section, time_layouts

    from tshsr.encoders import TimmImageBackbone

    torch.manual_seed(0)
    backbone = TimmImageBackbone("tf_efficientnet_lite0", pretrained=False).eval()
    timed = time_layouts(backbone, torch.randn(2, 3, 64, 64), rounds=2)
    assert [len(p) for p in timed["passes"].values()] == [2, 2]  # the warm-up pass is not counted
    assert not backbone.channels_last  # left in the default layout
    default, fast = timed["features"]["default"], timed["features"]["channels_last"]
    torch.testing.assert_close(fast, default, rtol=1e-4, atol=1e-4)
    drift = compare(default, fast)
    assert drift["grid"] == 4 and 0 <= drift["fp16_changed"] < 0.05 and drift["max_abs_diff"] < 1e-3
    row = {"backbone": "tf_efficientnet_lite0", "image_size": 64, "images": 2, "default_s": 2.0,
           "channels_last_s": 1.0, "speedup": 2.0,
           "passes": {"default": [1.9, 2.1], "channels_last": [0.9, 1.1]}, **drift}
    assert ("| tf_efficientnet_lite0 (64 px) | 4 | 2 | 2.00 s (1.90-2.10) | 1.00 s (0.90-1.10) | **2.00x** |"
            in section([row], 2, 2))
