"""benchmarks/context_share.py: the shared score's ranks and the cross-fitting that keeps a query's
own ranks out of the choice of its weights."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts import their siblings
from context_share import PARTS, cross_fit, query_ranks, rsum  # noqa: E402

from tshsr.analysis import Shortlisted, shortlist_pairs  # noqa: E402
from tshsr.metrics import retrieval_ranks  # noqa: E402


def shortlisted(similarity: np.ndarray, k: int, values: dict[str, np.ndarray]) -> Shortlisted:
    """A Shortlisted as tshsr.analysis lays one out, from dense [n_images, n_texts] ranker values."""
    i2t_rows, i2t_cols, t2i_rows, t2i_cols = shortlist_pairs(similarity, k)
    n_images, n_texts = similarity.shape
    return Shortlisted(
        similarity=similarity, i2t_cols=i2t_cols.reshape(n_images, -1), t2i_rows=t2i_rows.reshape(-1, n_texts).T,
        i2t={n: v[i2t_rows, i2t_cols].reshape(n_images, -1) for n, v in values.items()},
        t2i={n: v[t2i_rows, t2i_cols].reshape(-1, n_texts).T for n, v in values.items()})


def test_the_shared_ranks_match_a_dense_rerank_of_the_shortlist() -> None:
    rng = np.random.default_rng(0)
    n_images, n_texts, k = 6, 12, 4
    caption_image = np.repeat(np.arange(n_images), 2)
    sim = rng.normal(size=(n_images, n_texts))
    values = {"full": rng.normal(size=sim.shape), **{p: rng.normal(size=sim.shape) for p in PARTS}}
    s = shortlisted(sim, k, values)
    for weights in ((0.0, 0.0), (0.3, 0.0), (0.1, 0.6)):
        shared = values["full"] + weights[0] * values[PARTS[0]] + weights[1] * values[PARTS[1]]
        # Dense reference: the shortlisted candidates by the shared score, the rest below in cosine order
        i2t = sim - 100.0
        t2i = sim - 100.0
        top_t = np.argsort(-sim, axis=1)[:, :k]
        top_i = np.argsort(-sim, axis=0)[:k]
        for i in range(n_images):
            i2t[i, top_t[i]] = shared[i, top_t[i]]
        for t in range(n_texts):
            t2i[top_i[:, t], t] = shared[top_i[:, t], t]
        want = retrieval_ranks(i2t, caption_image, t2i)
        got = query_ranks(s, caption_image, weights, k)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_a_shorter_shortlist_is_the_first_candidates_of_the_longer_one() -> None:
    rng = np.random.default_rng(1)
    sim = rng.normal(size=(5, 10))
    caption_image = np.repeat(np.arange(5), 2)
    values = {"full": rng.normal(size=sim.shape), **{p: rng.normal(size=sim.shape) for p in PARTS}}
    long, short = shortlisted(sim, 6, values), shortlisted(sim, 3, values)
    for a, b in zip(query_ranks(long, caption_image, (0.2, 0.1), 3), query_ranks(short, caption_image, (0.2, 0.1), 3)):
        np.testing.assert_array_equal(a, b)


def test_each_fold_is_ranked_with_the_other_folds_choice() -> None:
    image_fold = np.array([0, 1, 0, 1])
    caption_fold = np.repeat(image_fold, 2)
    bad = (np.full(4, 20), np.full(8, 20))
    # (0.1, 0) ranks fold 0's queries first and fold 1's last; (0.2, 0) the other way round
    split_a = (np.where(image_fold == 0, 0, 20), np.where(caption_fold == 0, 0, 20))
    split_b = (np.where(image_fold == 1, 0, 20), np.where(caption_fold == 1, 0, 20))
    out = cross_fit({(0.0, 0.0): bad, (0.1, 0.0): split_a, (0.2, 0.0): split_b}, image_fold, caption_fold)
    assert out["chosen"] == {"0": [0.1, 0.0], "1": [0.2, 0.0]}
    # fold 0's queries use fold 1's choice (0.2, 0), which ranks them last: nothing is found
    assert out["cross_fitted"] == 0.0 and out["full"] == 0.0
    assert out["best_in_sample"] == 300.0


def test_a_share_that_helps_everywhere_is_chosen_and_counted() -> None:
    image_fold = np.array([0, 1, 0, 1])
    caption_fold = np.repeat(image_fold, 2)
    worse = (np.array([20, 20, 0, 0]), np.full(8, 0))  # one image query of each fold is missed
    better = (np.zeros(4, dtype=int), np.zeros(8, dtype=int))
    out = cross_fit({(0.0, 0.0): worse, (0.1, 0.0): better, (0.2, 0.0): better}, image_fold, caption_fold)
    assert out["chosen"] == {"0": [0.1, 0.0], "1": [0.1, 0.0]}  # ties go to the smaller share
    assert out["full"] == rsum(*worse) == 450.0
    assert out["cross_fitted"] == 600.0 and out["best_weights"] == [0.1, 0.0]


def test_a_fold_that_cannot_tell_keeps_the_full_score() -> None:
    image_fold = np.array([0, 1, 0, 1])
    caption_fold = np.repeat(image_fold, 2)
    worse = (np.array([0, 20, 0, 20]), np.full(8, 0))  # only fold 1's image queries are missed
    better = (np.zeros(4, dtype=int), np.zeros(8, dtype=int))
    out = cross_fit({(0.0, 0.0): worse, (0.1, 0.0): better}, image_fold, caption_fold)
    assert out["chosen"] == {"0": [0.0, 0.0], "1": [0.1, 0.0]}
    # fold 1's queries get fold 0's choice, the full score, and stay missed
    assert out["cross_fitted"] == out["full"] == 450.0 and out["best_in_sample"] == 600.0
