"""GalleryIndex: encode once, shortlist by cosine, rerank with the full model, save and reload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tshsr import TSHSRConfig, TSHSRModel, Vocabulary
from tshsr.retrieval import GalleryIndex, Hit

FEATURE_DIM = 16
N_IMAGES = 10
CAPTIONS = [f"a {adj} {obj}" for adj in ("red", "small", "happy") for obj in ("dog", "cat", "car", "tree")]


def _tiny_model(seed: int = 0, sim_dim: int = 16) -> TSHSRModel:
    vocabulary = Vocabulary.build(CAPTIONS, min_count=1)
    config = TSHSRConfig.preset("tshsr", image_encoder="precomputed", image_feature_dim=FEATURE_DIM,
                                text_encoder="bigru", vocab_size=len(vocabulary), embed_dim=32, sim_dim=sim_dim)
    torch.manual_seed(seed)
    return TSHSRModel(config, vocabulary=vocabulary).eval()


@pytest.fixture(scope="module")
def model() -> TSHSRModel:
    return _tiny_model()


@pytest.fixture(scope="module")
def regions() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((N_IMAGES, 5, FEATURE_DIM)).astype(np.float32)


@pytest.fixture()
def image_index(model, regions) -> GalleryIndex:
    index = GalleryIndex(model, kind="images")
    index.add(regions, ids=[f"img{i}" for i in range(N_IMAGES)])
    return index


def _reference(model, regions: np.ndarray, text: str):
    """Full-model and cosine scores of one text against all images, computed directly."""
    images, texts = model.encode_images(regions), model.encode_texts([text])
    return model.score_encoded(images, texts), model.global_similarity(images, texts)[:, 0]


def test_exhaustive_search_ranks_every_item_by_the_full_model(model, regions, image_index) -> None:
    query = "a red dog"
    hits = image_index.search(query, top_k=4)
    out, _ = _reference(model, regions, query)
    full = out.scores[:, 0]
    expected = torch.argsort(full, descending=True)[:4].tolist()
    assert [h.id for h in hits] == [f"img{i}" for i in expected]
    assert [h.rank for h in hits] == [1, 2, 3, 4]
    assert [h.score for h in hits] == pytest.approx(full[expected].tolist(), abs=1e-5)
    assert all(isinstance(h, Hit) for h in hits)
    # The breakdown is per stream and level and sums to the score.
    assert set(hits[0].contributions) == set(model.config.contribution_keys)
    for hit in hits:
        assert sum(hit.contributions.values()) == pytest.approx(hit.score, abs=1e-5)
    assert len(image_index.search(query, top_k=100)) == N_IMAGES


def test_rerank_scores_only_the_cosine_shortlist(model, regions, image_index) -> None:
    query = "a small cat"
    out, cosine = _reference(model, regions, query)
    shortlist = set(torch.topk(cosine, 3).indices.tolist())
    hits = image_index.search(query, top_k=2, rerank_k=3)
    assert len(hits) == 2
    assert {int(h.id[3:]) for h in hits} <= shortlist
    # Among the shortlist, the order is the full model's.
    ordered = sorted(shortlist, key=lambda i: -float(out.scores[i, 0]))[:2]
    assert [h.id for h in hits] == [f"img{i}" for i in ordered]
    # A shortlist smaller than top_k is widened: every hit still has a full-model score.
    widened = image_index.search(query, top_k=5, rerank_k=1)
    assert len(widened) == 5
    for hit in widened:
        assert hit.score == pytest.approx(float(out.scores[int(hit.id[3:]), 0]), abs=1e-5)


def test_add_and_remove_keep_ids_and_encodings_aligned(model, regions) -> None:
    index = GalleryIndex(model, kind="images")
    assert index.search("a red dog") == []
    first = index.add(regions[:4])
    assert first == ["0", "1", "2", "3"] and len(index) == 4
    with pytest.raises(ValueError, match="already in the index"):
        index.add(regions[4:5], ids=["2"])
    with pytest.raises(ValueError, match="unique"):
        index.add(regions[4:6], ids=["x", "x"])
    index.remove(["1", "3"])
    with pytest.raises(KeyError, match="nope"):
        index.remove(["0", "nope"])
    assert index.ids == ["0", "2"]  # the failed removal changed nothing
    later = index.add(regions[4:6])
    assert later == ["4", "5"]  # automatic ids are never reused
    hits = {h.id: h.score for h in index.search("a happy tree", top_k=10)}
    assert set(hits) == {"0", "2", "4", "5"}
    out, _ = _reference(model, regions, "a happy tree")
    for item_id, row in {"0": 0, "2": 2, "4": 4, "5": 5}.items():
        assert hits[item_id] == pytest.approx(float(out.scores[row, 0]), abs=1e-5)
    index.remove(index.ids)
    assert len(index) == 0 and index.search("a happy tree") == []


def test_text_gallery_is_searched_with_an_image(model, regions) -> None:
    index = GalleryIndex(model, kind="texts")
    index.add(CAPTIONS)
    hits = index.search(regions[2], top_k=3)
    scores = model.score_encoded(model.encode_images(regions[2:3]), model.encode_texts(CAPTIONS)).scores[0]
    expected = torch.argsort(scores, descending=True)[:3].tolist()
    assert [h.id for h in hits] == [str(i) for i in expected]
    with pytest.raises(TypeError, match="image"):
        index.search("a red dog")
    with pytest.raises(ValueError, match="kind"):
        GalleryIndex(model, kind="videos")


def test_save_and_load_round_trip(model, image_index, tmp_path: Path) -> None:
    image_index.remove(["img0"])
    image_index.save(tmp_path / "index")
    meta = json.loads((tmp_path / "index" / "gallery.json").read_text())
    assert meta["kind"] == "images" and meta["model"]["config"] == model.config.fingerprint()
    loaded = GalleryIndex.load(tmp_path / "index", model)
    assert loaded.ids == image_index.ids
    before = image_index.search("a red car", top_k=5, rerank_k=4)
    after = loaded.search("a red car", top_k=5, rerank_k=4)
    assert [(h.id, h.rank) for h in after] == [(h.id, h.rank) for h in before]
    assert [h.score for h in after] == pytest.approx([h.score for h in before], abs=1e-6)
    # An empty index saves and loads too.
    GalleryIndex(model, kind="texts").save(tmp_path / "empty")
    assert len(GalleryIndex.load(tmp_path / "empty", model)) == 0


def test_load_refuses_another_model(image_index, tmp_path: Path) -> None:
    image_index.save(tmp_path / "index")
    with pytest.raises(ValueError, match="another configuration"):
        GalleryIndex.load(tmp_path / "index", _tiny_model(sim_dim=8))
    with pytest.raises(ValueError, match="other weights"):
        GalleryIndex.load(tmp_path / "index", _tiny_model(seed=1))
    with pytest.raises(FileNotFoundError, match="not a saved GalleryIndex"):
        GalleryIndex.load(tmp_path / "missing", image_index.model)
