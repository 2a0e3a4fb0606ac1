"""The standard image-text retrieval protocol (R@1, R@5, R@10 both ways and their sum).

Conventions, as in SCAN / VSE++ evaluation code, with two deliberate differences:

* **Ties are pessimistic.** An item whose score equals the match's ranks above it. Sorting-based
  code (``argsort``) breaks ties by index, which lets a model that outputs one constant score
  still reach non-zero recall; here constant scores give the recall of the worst ordering.
* **Any number of captions per image.** Everything is driven by ``caption_image`` (the image of
  each caption), never by "five consecutive captions". An image without captions is left out of
  image-to-text recall (it has nothing to retrieve) but stays a distractor for text-to-image.

Image-to-text rank of image ``i``: the number of *non-matching* captions scoring at least as high
as its best-scoring matching caption (other matching captions above it are not errors).
Text-to-image rank of caption ``j``: the number of other images scoring at least as high as its
own image. Recall@K is the percentage of queries with rank < K, so K larger than the gallery is
simply 100%.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["RECALL_KS", "retrieval_ranks", "retrieval_metrics", "recalls_from_ranks", "coco_1k_folds", "fold_ranges", "mean_metrics"]

RECALL_KS = (1, 5, 10)

# Elements compared at a time: bounds the temporaries (4 MB boolean, 16 MB float32 matrices) for
# any split, so the memory of a large evaluation is its score matrix, not the ranking
# (benchmarks/eval_memory.py measures the peak; docs/RESULTS.md).
_BLOCK_ELEMENTS = 1 << 22


def _as_numpy(scores: Any) -> np.ndarray:
    if hasattr(scores, "detach"):  # torch.Tensor, without importing torch here
        scores = scores.detach().float().cpu().numpy()
    array = np.asarray(scores)
    if array.ndim != 2:
        raise ValueError(f"scores must be a matrix [n_images, n_captions], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    if np.isnan(array).any():
        # A NaN compares false with everything and would rank as the best item: refuse it.
        raise ValueError("scores contain NaN")
    return array


def _check_mapping(caption_image: Any, n_images: int, n_captions: int) -> np.ndarray:
    mapping = np.asarray(caption_image.cpu() if hasattr(caption_image, "cpu") else caption_image).reshape(-1)
    mapping = mapping.astype(np.int64)
    if len(mapping) != n_captions:
        raise ValueError(f"caption_image has {len(mapping)} entries for {n_captions} caption columns")
    if n_captions and (mapping.min() < 0 or mapping.max() >= n_images):
        raise ValueError(f"caption_image must index the {n_images} image rows")
    return mapping


def retrieval_ranks(
    scores: Any, caption_image: Any, text_to_image_scores: Any | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks: ``(image_to_text [images with captions], text_to_image [n_captions])``.

    ``scores[i, j]`` is the similarity of image ``i`` and caption ``j``. Two-stage retrieval
    orders the two directions differently (different shortlists); pass the text-to-image
    ordering as ``text_to_image_scores`` (same shape) in that case.
    """
    i2t_scores = _as_numpy(scores)
    t2i_scores = i2t_scores if text_to_image_scores is None else _as_numpy(text_to_image_scores)
    if t2i_scores.shape != i2t_scores.shape:
        raise ValueError(f"text_to_image_scores has shape {t2i_scores.shape}, scores {i2t_scores.shape}")
    n_images, n_captions = i2t_scores.shape
    mapping = _check_mapping(caption_image, n_images, n_captions)

    has_caption = np.bincount(mapping, minlength=n_images) > 0
    image_ranks = np.zeros(n_images, dtype=np.int64)
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(n_captions, 1))
    for start in range(0, n_images, rows_per_block):
        block = i2t_scores[start : start + rows_per_block]
        rows = np.arange(start, start + len(block))
        positive = mapping[None, :] == rows[:, None]
        best_positive = np.where(positive, block, -np.inf).max(axis=1, initial=-np.inf)
        image_ranks[start : start + len(block)] = ((block >= best_positive[:, None]) & ~positive).sum(axis=1)

    caption_ranks = np.zeros(n_captions, dtype=np.int64)
    cols_per_block = max(1, _BLOCK_ELEMENTS // max(n_images, 1))
    for start in range(0, n_captions, cols_per_block):
        block = t2i_scores[:, start : start + cols_per_block]
        match = block[mapping[start : start + cols_per_block], np.arange(block.shape[1])]
        # The match itself always satisfies >=, hence the -1.
        caption_ranks[start : start + block.shape[1]] = (block >= match[None, :]).sum(axis=0) - 1
    return image_ranks[has_caption], caption_ranks


def recalls_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """``{"r1": ..., "r5": ..., "r10": ...}`` in percent (0.0 when there are no queries)."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        return {f"r{k}": 0.0 for k in ks}
    return {f"r{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def retrieval_metrics(scores: Any, caption_image: Any, text_to_image_scores: Any | None = None) -> dict[str, Any]:
    """Recall@1/5/10 in percent both ways and RSUM, from an image x caption score matrix.

    Returns ``{"i2t": {"r1", "r5", "r10"}, "t2i": {"r1", "r5", "r10"}, "rsum"}``; ``i2t`` is
    image-to-text retrieval (image queries), ``t2i`` text-to-image.
    """
    image_ranks, caption_ranks = retrieval_ranks(scores, caption_image, text_to_image_scores)
    i2t = recalls_from_ranks(image_ranks)
    t2i = recalls_from_ranks(caption_ranks)
    return {"i2t": i2t, "t2i": t2i, "rsum": float(sum(i2t.values()) + sum(t2i.values()))}


def coco_1k_folds(
    scores: Any,
    caption_image: Any,
    text_to_image_scores: Any | None = None,
    fold_size: int = 1000,
    n_folds: int | None = None,
) -> dict[str, Any]:
    """The COCO "1K test" protocol: mean metrics over folds of ``fold_size`` consecutive images.

    Each fold ranks its images against its images' captions only. The 5K Karpathy test gives
    five folds of 1000; ``n_folds=None`` takes as many as there are, and the image count must
    divide exactly (silently dropping images would change the protocol).
    """
    i2t_scores = _as_numpy(scores)
    t2i_scores = None if text_to_image_scores is None else _as_numpy(text_to_image_scores)
    n_images, n_captions = i2t_scores.shape
    mapping = _check_mapping(caption_image, n_images, n_captions)
    folds = []
    for lo, hi in fold_ranges(n_images, fold_size, n_folds):
        columns = np.flatnonzero((mapping >= lo) & (mapping < hi))
        fold_t2i = None if t2i_scores is None else t2i_scores[lo:hi][:, columns]
        folds.append(retrieval_metrics(i2t_scores[lo:hi][:, columns], mapping[columns] - lo, fold_t2i))
    return mean_metrics(folds)


def fold_ranges(n_images: int, fold_size: int = 1000, n_folds: int | None = None) -> list[tuple[int, int]]:
    """``[(first, stop), ...]`` image ranges of the 1K folds (see :func:`coco_1k_folds`)."""
    if fold_size <= 0:
        raise ValueError(f"fold_size must be positive, got {fold_size}")
    if n_folds is None:
        if n_images == 0 or n_images % fold_size:
            raise ValueError(f"{n_images} images do not split into folds of {fold_size}")
        n_folds = n_images // fold_size
    if n_folds <= 0 or n_folds * fold_size > n_images:
        raise ValueError(f"{n_folds} folds of {fold_size} need {n_folds * fold_size} images, got {n_images}")
    return [(k * fold_size, (k + 1) * fold_size) for k in range(n_folds)]


def mean_metrics(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Average of several :func:`retrieval_metrics` results; the folds are kept under ``"folds"``."""
    if not folds:
        raise ValueError("mean_metrics needs at least one result")
    mean: dict[str, Any] = {
        direction: {key: float(np.mean([f[direction][key] for f in folds])) for key in folds[0][direction]}
        for direction in ("i2t", "t2i")
    }
    mean["rsum"] = float(sum(mean["i2t"].values()) + sum(mean["t2i"].values()))
    mean["folds"] = folds
    return mean
