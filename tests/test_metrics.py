"""Retrieval metrics on small score matrices whose recalls are worked out by hand below."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tshsr.metrics import coco_1k_folds, retrieval_metrics, retrieval_ranks


def _assert_metrics(metrics: dict, i2t: tuple[float, float, float], t2i: tuple[float, float, float]) -> None:
    assert metrics["i2t"] == pytest.approx(dict(zip(("r1", "r5", "r10"), i2t)))
    assert metrics["t2i"] == pytest.approx(dict(zip(("r1", "r5", "r10"), t2i)))
    assert metrics["rsum"] == pytest.approx(sum(i2t) + sum(t2i))


def test_perfect_scores_give_rsum_600() -> None:
    scores = np.eye(3) + 0.01  # each image's own caption is strictly best both ways
    metrics = retrieval_metrics(scores, [0, 1, 2])
    _assert_metrics(metrics, (100, 100, 100), (100, 100, 100))
    assert set(metrics) == {"i2t", "t2i", "rsum"} and set(metrics["i2t"]) == {"r1", "r5", "r10"}
    assert all(isinstance(v, float) for v in metrics["i2t"].values())


def test_constant_scores_rank_last() -> None:
    # 12 images, one caption each, every score equal. Pessimistic ties put all 11 other items
    # above each match: every rank is 11, so even R@10 is 0. (An argsort protocol would let the
    # tie-breaking order "find" some matches.)
    metrics = retrieval_metrics(np.full((12, 12), 0.3), np.arange(12))
    _assert_metrics(metrics, (0, 0, 0), (0, 0, 0))


def test_several_captions_per_image() -> None:
    # image 0 owns captions 0, 1; image 1 owns captions 2, 3.
    scores = np.array([
        [0.1, 0.9, 0.8, 0.2],  # image 0: best own caption (c1, 0.9) beats every other -> rank 0
        [0.7, 0.6, 0.5, 0.1],  # image 1: best own caption c2 = 0.5; c0 (0.7), c1 (0.6) above -> rank 2
    ])
    # i2t ranks [0, 2]: R@1 50, R@5 100, R@10 100 (fewer than 5 captions to beat it anyway).
    # t2i, by column: c0 own 0.1 < 0.7 -> rank 1; c1 0.9 > 0.6 -> 0; c2 own 0.5 < 0.8 -> 1;
    # c3 own 0.1 < 0.2 -> 1. Ranks [1, 0, 1, 1]: R@1 25, R@5 100, R@10 100.
    metrics = retrieval_metrics(scores, [0, 0, 1, 1])
    _assert_metrics(metrics, (50, 100, 100), (25, 100, 100))
    image_ranks, caption_ranks = retrieval_ranks(scores, [0, 0, 1, 1])
    assert image_ranks.tolist() == [0, 2] and caption_ranks.tolist() == [1, 0, 1, 1]


def test_other_matching_captions_above_are_not_errors_but_tied_negatives_are() -> None:
    # Image 0 owns c0, c1, c2 with scores 0.9, 0.9, 0.9; negative c3 is tied at 0.9 -> rank 1.
    # Image 1 owns c3 at 0.2 with c0-c2 at 0.1 below -> rank 0.
    scores = np.array([[0.9, 0.9, 0.9, 0.9], [0.1, 0.1, 0.1, 0.2]])
    image_ranks, caption_ranks = retrieval_ranks(scores, [0, 0, 0, 1])
    assert image_ranks.tolist() == [1, 0]
    # t2i: c0-c2 own 0.9 vs 0.1 -> 0; c3 own 0.2 vs 0.9 -> 1.
    assert caption_ranks.tolist() == [0, 0, 0, 1]


def test_recall_boundaries_unequal_captions_and_caption_less_images() -> None:
    # 12 images; images 0-5 own one caption each, images 6-11 own none (pure distractors).
    # The text-to-image ordering is built to put caption j's match at rank [0, 4, 5, 9, 10, 11][j].
    target_ranks = [0, 4, 5, 9, 10, 11]
    t2i_scores = np.full((12, 6), -1.0)
    for j, rank in enumerate(target_ranks):
        t2i_scores[j, j] = 0.0
        others = [i for i in range(12) if i != j]
        # Half of the images above it strictly, the rest tied with it (ties count against it).
        strictly_above = rank // 2
        for k, i in enumerate(others[:rank]):
            t2i_scores[i, j] = 1.0 if k < strictly_above else 0.0
    # Image-to-text ordering: each captioned image's own caption strictly best -> 100 both ways.
    # Were caption-less images 6-11 counted as queries they would have rank 6 and halve the recall.
    i2t_scores = np.zeros((12, 6))
    i2t_scores[np.arange(6), np.arange(6)] = 1.0
    metrics = retrieval_metrics(i2t_scores, np.arange(6), text_to_image_scores=t2i_scores)
    # t2i ranks [0, 4, 5, 9, 10, 11]: R@1 1/6, R@5 2/6 (0, 4), R@10 4/6 (0, 4, 5, 9).
    _assert_metrics(metrics, (100, 100, 100), (100 / 6, 200 / 6, 400 / 6))
    assert retrieval_ranks(i2t_scores, np.arange(6), t2i_scores)[1].tolist() == target_ranks


def test_unequal_caption_counts_and_order_independence() -> None:
    # Image 0 owns c0, c1, c2; image 1 owns c3; image 2 owns c4, c5. Captions interleaved on purpose.
    mapping = np.array([0, 1, 2, 0, 2, 0])
    scores = np.array([
        [0.2, 0.1, 0.1, 0.3, 0.0, 0.9],  # image 0: own best c5 = 0.9 -> rank 0
        [0.5, 0.4, 0.6, 0.0, 0.1, 0.0],  # image 1: own c1 = 0.4; c0 0.5, c2 0.6 above -> rank 2
        [0.0, 0.3, 0.2, 0.1, 0.8, 0.0],  # image 2: own c2 0.2, c4 0.8 -> best 0.8 -> rank 0
    ])
    # i2t ranks [0, 2, 0]: R@1 66.67, R@5 100.
    # t2i by column: c0 (img0 0.2) img1 0.5 above -> 1; c1 (img1 0.4) img2 0.3 below -> 0;
    # c2 (img2 0.2) img1 0.6 above -> 1; c3 (img0 0.3) -> 0; c4 (img2 0.8) -> 0; c5 (img0 0.9) -> 0.
    # t2i ranks [1, 0, 1, 0, 0, 0]: R@1 4/6.
    metrics = retrieval_metrics(scores, mapping)
    _assert_metrics(metrics, (200 / 3, 100, 100), (400 / 6, 100, 100))
    # Permuting caption columns together with the mapping changes nothing.
    perm = np.array([5, 3, 1, 0, 4, 2])
    assert retrieval_metrics(scores[:, perm], mapping[perm]) == metrics


def test_torch_input_and_blocking_agree_with_numpy(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((7, 20)).astype(np.float32)
    mapping = rng.integers(0, 7, size=20)
    reference = retrieval_ranks(scores, mapping)
    assert retrieval_metrics(torch.from_numpy(scores), torch.from_numpy(mapping)) == retrieval_metrics(scores, mapping)
    import tshsr.metrics as metrics_module

    monkeypatch.setattr(metrics_module, "_BLOCK_ELEMENTS", 5)  # forces one row / column a block
    blocked = retrieval_ranks(scores, mapping)
    assert all(np.array_equal(a, b) for a, b in zip(reference, blocked))


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 0.0], [0.0, 1.0]]), [0, 1])
    with pytest.raises(ValueError, match="entries"):
        retrieval_metrics(np.eye(2), [0, 1, 1])
    with pytest.raises(ValueError, match="index"):
        retrieval_metrics(np.eye(2), [0, 2])
    with pytest.raises(ValueError, match="matrix"):
        retrieval_metrics(np.zeros(3), [0, 1, 2])


def _fold_matrix() -> tuple[np.ndarray, np.ndarray]:
    # 6 images in 3 folds of 2. Captions: img0 c0 c1 | img1 c2 | img2 c3 | img3 c4 c5 c6 | img4 c7 | img5 c8.
    mapping = np.array([0, 0, 1, 2, 3, 3, 3, 4, 5])
    scores = np.full((6, 9), 0.9)  # cross-fold pairs: strong distractors a fold never sees
    fold_of_image = np.arange(6) // 2
    same_fold = fold_of_image[:, None] == fold_of_image[mapping][None, :]
    scores[same_fold] = 0.1
    scores[mapping, np.arange(9)] = 0.5  # every matching pair
    scores[1, 0] = 0.6  # fold 0: image 1 beats image 0 on c0
    scores[4, 8] = 0.5  # fold 2: image 4 ties image 5 on c8
    return scores, mapping


def test_coco_1k_folds_average_within_fold_metrics() -> None:
    scores, mapping = _fold_matrix()
    # Fold 0: i2t img0 rank 0, img1 rank 1 (c0 0.6 >= 0.5) -> R@1 50; t2i c0 rank 1, c1 0, c2 0 -> R@1 66.67.
    # Fold 1: everything rank 0 -> 100 / 100.
    # Fold 2: i2t img4 rank 1 (c8 tied at 0.5), img5 rank 0 -> 50; t2i c7 rank 0, c8 rank 1 (tie) -> 50.
    # Means: i2t R@1 (50 + 100 + 50) / 3 = 66.67; t2i R@1 (66.67 + 100 + 50) / 3 = 72.22; R@5, R@10 100.
    folded = coco_1k_folds(scores, mapping, fold_size=2)
    _assert_metrics(folded, (200 / 3, 100, 100), ((200 / 3 + 150) / 3, 100, 100))
    assert len(folded["folds"]) == 3
    assert folded["folds"][1]["rsum"] == pytest.approx(600)
    # Over all 6 images at once the 0.9 cross-fold distractors beat every match.
    assert retrieval_metrics(scores, mapping)["i2t"]["r1"] == 0.0


def test_coco_1k_folds_refuses_partial_folds() -> None:
    scores, mapping = _fold_matrix()
    with pytest.raises(ValueError, match="do not split"):
        coco_1k_folds(scores, mapping, fold_size=4)
    with pytest.raises(ValueError, match="need 8 images"):
        coco_1k_folds(scores, mapping, fold_size=2, n_folds=4)
    assert coco_1k_folds(scores, mapping, fold_size=2, n_folds=1)["i2t"]["r1"] == pytest.approx(50)
