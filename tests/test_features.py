"""The feature cache: reused when nothing changed, rebuilt when anything keyed changes, resumed
after an interruption, and equal to computing the features directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tshsr import TSHSRConfig, TSHSRModel, Vocabulary
from tshsr.features import cache_features

WORDS = ["a", "red", "blue", "cat", "dog", "runs", "sits"]


def tiny_model(**overrides) -> TSHSRModel:
    vocab = Vocabulary(WORDS)
    cfg = TSHSRConfig.preset("tshsr", image_encoder="precomputed", image_feature_dim=8, text_encoder="bigru",
                             vocab_size=len(vocab), embed_dim=16, sim_dim=8, **overrides)
    return TSHSRModel(cfg, vocabulary=vocab).eval()


def tiny_data(n=10):
    rng = np.random.default_rng(0)
    regions = rng.normal(size=(n, 4, 8)).astype(np.float32)
    captions = [f"a {WORDS[1 + i % 2]} {WORDS[3 + i % 2]} {WORDS[5 + i % 2]}" for i in range(2 * n)]
    return regions, captions, [f"img{i}" for i in range(n)], np.repeat(np.arange(n), 2)


class Counting:
    def __init__(self, model, fail_after: int | None = None):
        self.model, self.calls, self.fail_after = model, 0, fail_after
        self.real = model.text_features

    def __call__(self, texts):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        return self.real(texts)


def test_cache_matches_direct_features_and_is_reused(tmp_path):
    model = tiny_model()
    regions, captions, ids, owner = tiny_data()
    counter = Counting(model)
    model.text_features = counter
    first = cache_features(model, regions, captions, ids, owner, tmp_path, text_batch_size=4, progress=False)
    assert counter.calls == 5
    feats, mask = model.image_features(regions[:3])
    torch.testing.assert_close(torch.from_numpy(np.asarray(first.images[:3], dtype=np.float32)), feats,
                               atol=1e-2, rtol=1e-2)  # float16 storage
    text, text_mask = counter.real(captions[:4])
    cached_text, cached_mask = first.text_batch(np.arange(4))
    assert torch.equal(cached_mask, text_mask)
    torch.testing.assert_close(cached_text, text, atol=1e-2, rtol=1e-2)
    again = cache_features(model, regions, captions, ids, owner, tmp_path, text_batch_size=4, progress=False)
    assert counter.calls == 5 and again.directory == first.directory  # nothing recomputed


@pytest.mark.parametrize("change", ["caption", "max_text_length", "owner"])
def test_cache_key_changes_with_data_or_preprocessing(tmp_path, change):
    regions, captions, ids, owner = tiny_data()
    base = cache_features(tiny_model(), regions, captions, ids, owner, tmp_path, progress=False)
    model = tiny_model(max_text_length=6) if change == "max_text_length" else tiny_model()
    if change == "caption":
        captions = captions[:-1] + ["a red cat sits on a mat"]
    if change == "owner":
        owner = owner[::-1].copy()
    other = cache_features(model, regions, captions, ids, owner, tmp_path, progress=False)
    assert other.directory != base.directory


def test_interrupted_caching_resumes_where_it_stopped(tmp_path):
    regions, captions, ids, owner = tiny_data()
    model = tiny_model()
    model.text_features = Counting(model, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        cache_features(model, regions, captions, ids, owner, tmp_path, text_batch_size=4, progress=False)
    resumed_counter = Counting(model)
    resumed_counter.real = model.text_features.real
    model.text_features = resumed_counter
    done = cache_features(model, regions, captions, ids, owner, tmp_path, text_batch_size=4, progress=False)
    assert resumed_counter.calls == 3  # only the 3 batches not written before the interruption
    model.text_features = resumed_counter.real
    reference = cache_features(model, regions, captions, ids, owner, tmp_path / "fresh", progress=False)
    assert np.array_equal(np.asarray(done.texts), np.asarray(reference.texts))
    assert np.array_equal(np.asarray(done.text_mask), np.asarray(reference.text_mask))
