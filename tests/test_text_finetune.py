"""``text_finetune_layers``: the top layers of the transformers text encoder train on cached hidden
states of the frozen layers below, are stored in the checkpoint, and inference runs the whole
encoder with them (real all-MiniLM-L6-v2: marked slow)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tshsr import TSHSRModel
from tshsr.config import TSHSRConfig
from tshsr.features import backbone_key, cache_features, cacheable_text_features, text_units_from_cache

from .test_train import ROOT, run, steps_logged

pytestmark = pytest.mark.slow

CAPTIONS = ["A dog runs on the beach.", "Two children play football in a park", "a red car",
            "A man in a blue shirt is cooking vegetables in a large pan ."]


def precomputed(n_layers: int, **overrides) -> TSHSRModel:
    torch.manual_seed(0)
    config = TSHSRConfig.preset("tshsr", embed_dim=32, sim_dim=16, image_encoder="precomputed",
                                image_feature_dim=16, text_finetune_layers=n_layers, **overrides)
    return TSHSRModel(config).eval()


@pytest.mark.parametrize("n_layers", [1, 2])
def test_cached_lower_layers_through_the_top_give_the_full_encoder(n_layers):
    model = precomputed(n_layers)
    with torch.no_grad():
        full, full_mask = model.text_features(CAPTIONS)
        hidden, kinds = cacheable_text_features(model, CAPTIONS)
        split, split_mask = text_units_from_cache(model, hidden, kinds)
    assert kinds.dtype == torch.int8 and set(kinds.unique().tolist()) == {0, 1, 2}
    assert torch.equal(split_mask, full_mask)
    torch.testing.assert_close(split, full, atol=1e-5, rtol=1e-5)


def test_the_cache_passes_stop_at_their_layer_bit_for_bit():
    """The feature cache's caption passes (the states below the trained top, a context layer's states) run only the
    layers they need, and give exactly what the full encoder's hidden states hold: caches written before and after
    this shortcut are interchangeable, and training on them is reproducible to the bit."""
    model = precomputed(1, text_context_layer=0)
    backbone, batch = model.text_backbone, model.processor.tokenize(CAPTIONS)  # captions of different lengths
    with torch.no_grad():
        full = backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states=True).hidden_states
        for n in range(len(full) - 1):
            assert torch.equal(backbone.hidden_after(batch["input_ids"], batch["attention_mask"], n), full[n]), n
        assert torch.equal(backbone.lower(batch["input_ids"], batch["attention_mask"]), full[-2])
        assert torch.equal(backbone.context_hidden(batch["input_ids"], batch["attention_mask"]), full[0])


def test_only_the_top_layers_train_and_are_stored():
    model = precomputed(1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("text_backbone.")}
    assert trainable and all(n.startswith("text_backbone.model.encoder.layer.5.") for n in trainable)
    saved = [k for k in model.saved_state_dict() if k.startswith("text_backbone.")]
    assert saved and all(k.startswith("text_backbone.model.encoder.layer.5.") for k in saved)
    assert "text_backbone." not in "".join(k for k in precomputed(0).saved_state_dict() if k.startswith("text_b"))

    hidden, kinds = cacheable_text_features(model, CAPTIONS)  # no gradient below the cut
    assert not hidden.requires_grad
    model.train()
    units, mask = text_units_from_cache(model, hidden, kinds)
    (units * mask.unsqueeze(-1)).sum().backward()
    layers = model.text_backbone.model.encoder.layer
    assert layers[5].attention.self.query.weight.grad is not None
    assert all(p.grad is None for p in layers[4].parameters())


def test_trained_top_layers_round_trip_through_a_checkpoint(tmp_path):
    model = precomputed(1)
    with torch.no_grad():
        for p in model.text_backbone.top_layers().parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["text_finetune_layers"] == 1
    loaded = TSHSRModel.from_pretrained(tmp_path / "m").eval()
    regions = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_features(CAPTIONS)[0], model.text_features(CAPTIONS)[0])
        torch.testing.assert_close(loaded.score(regions, CAPTIONS).scores, model.score(regions, CAPTIONS).scores)
    pristine = precomputed(0)  # the trained layer differs from the pretrained one it started from
    with torch.no_grad():
        assert not torch.allclose(loaded.text_features(CAPTIONS)[0], pristine.text_features(CAPTIONS)[0])


def test_feature_cache_keys_the_cut_and_stores_token_kinds(tmp_path):
    frozen, tuned = precomputed(0), precomputed(1)
    assert "text_layers_left_out" not in backbone_key(frozen.config)  # frozen caches keep their keys
    assert backbone_key(tuned.config)["text_layers_left_out"] == 1
    regions = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
    owner = np.array([0, 0, 1, 1])
    cached = cache_features(tuned, regions, CAPTIONS, ["a", "b"], owner, tmp_path, progress=False)
    other = cache_features(frozen, regions, CAPTIONS, ["a", "b"], owner, tmp_path, progress=False)
    assert cached.directory != other.directory
    feats, kinds = cached.text_batch(np.arange(4))
    assert kinds.dtype == torch.int8
    units, mask = text_units_from_cache(tuned, feats, kinds)
    with torch.no_grad():
        full, full_mask = tuned.text_features(CAPTIONS)
    assert torch.equal(mask, full_mask)
    torch.testing.assert_close(units, full, atol=2e-2, rtol=0)  # the cache holds float16


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="text_finetune_layers"):
        precomputed(1, finetune_text=True)
    with pytest.raises(ValueError, match="has 6 layers"):
        precomputed(6)
    with pytest.raises(ValueError, match=">= 0"):
        precomputed(-1)


def test_trainer_runs_resumes_and_stores_the_top_layer(tmp_path):
    from tshsr.testing import make_precomp

    data = make_precomp(tmp_path / "precomp")
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", "precomp", "--data-dir", str(data),
           "--split-val", "dev", "--image-feature-dim", "16", "--embed-dim", "32", "--sim-dim", "16",
           "--batch-size", "8", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
           "--val-rerank-k", "0", "--threads", "1", "--epochs", "1", "--text-finetune-layers", "1"]
    result = run([*cmd, "--max-steps", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    result = run([*cmd, "--max-steps", "4", "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps_logged(out)[-1] == 4
    weights = load_file(str(out / "model.safetensors"))
    stored = [k for k in weights if k.startswith("text_backbone.")]
    assert stored and all(k.startswith("text_backbone.model.encoder.layer.5.") for k in stored)
    pristine = precomputed(0).text_backbone.model.encoder.layer[5].attention.self.query.weight
    assert not torch.allclose(weights["text_backbone.model.encoder.layer.5.attention.self.query.weight"], pristine)
    assert "top 1 layer fine-tuned" in (out / "README.md").read_text()
    model = TSHSRModel.from_pretrained(out)
    scores = model.score(np.load(data / "dev_ims.npy")[:2], ["a big red cat", "a small blue boat"]).scores
    assert scores.shape == (2, 2) and torch.isfinite(scores).all()
