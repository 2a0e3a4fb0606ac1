"""Evaluate a model on a retrieval split (the command line is ``tshsr-evaluate``, also
``python -m tshsr.evaluate --model ... --dataset ...``, in :mod:`tshsr_train.evaluate_cli`).

Both sides are encoded once; every (image, caption) pair is then scored by the full model
(exhaustive, the paper protocol), or, with ``--rerank-k K``, two-stage: each query's K best items
by global cosine are rescored by the full model and ranked first, the rest keep their cosine
order. :func:`evaluate_model` is the library entry point the trainer calls every epoch.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import ImageCaptionSplit
from .io import release_free_memory
from .metrics import fold_ranges, mean_metrics, retrieval_metrics
from .registry import get_head

__all__ = ["SplitScores", "encode_split", "score_split", "evaluate_model", "evaluate_split", "main"]

# The COCO "1K" protocol: five folds of 1000 images of the 5K test split.
COCO_FOLD_SIZE = 1000
# Pairs handed to the model at a time when rescoring shortlists.
PAIR_BATCH = 4096
# Pairs per exhaustive scoring call: small enough that the progress bar moves every few seconds.
SCORE_BLOCK_PAIRS = 1 << 16
# compile="auto" compiles exhaustive CPU scoring from this many pairs on: from there the one-off
# compilation is repaid by the faster compiled engine (benchmarks/scoring_throughput.py; docs/RESULTS.md).
AUTO_COMPILE_PAIRS = 2_000_000
TRIM_EVERY_BATCHES = 16  # encoding batches between hand-backs of freed memory (glibc malloc_trim)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode and no autograd for the duration; the trainer gets its training mode back."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _bar(total: int, desc: str, unit: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True, smoothing=0.1)


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------
def join_encoded(batches: Iterable) -> Any:
    """Join per-batch encodings (an iterable of ``Encoding``) into one. The memory each batch's
    temporaries leave behind is handed back to the OS as it goes and the parts are dropped as they
    are copied, so a large split needs about its encodings' memory, not twice it."""
    parts = []
    for part in batches:
        parts.append(part)
        if len(parts) % TRIM_EVERY_BATCHES == 0:
            release_free_memory()
    joined = type(parts[0]).cat(parts, consume=True)
    release_free_memory()
    return joined


def encode_split(model, split: ImageCaptionSplit, batch_size: int = 32, text_batch_size: int = 128,
                 progress: bool = True):
    """Encode every image and caption of ``split`` once: ``(ImageEncoding, TextEncoding)``.

    Images are read ``batch_size`` at a time, so a large split is never decoded all at once.
    """

    def image_batches():
        with _bar(len(split), "encode images", "img", progress) as bar:
            for start in range(0, len(split), batch_size):
                stop = min(start + batch_size, len(split))
                if split.regions is not None:
                    # A copy: memmapped rows are read-only, and torch warns about sharing them.
                    batch = np.array(split.regions[start:stop], dtype=np.float32)
                else:
                    batch = split.images(range(start, stop))[:]
                yield model.encode_images(batch, batch_size=batch_size, progress=False)
                bar.update(stop - start)

    def text_batches():
        with _bar(split.n_captions, "encode texts", "cap", progress) as bar:
            for start in range(0, split.n_captions, text_batch_size):
                batch = split.captions[start : start + text_batch_size]
                yield model.encode_texts(batch, batch_size=text_batch_size, progress=False)
                bar.update(len(batch))

    return join_encoded(image_batches()), join_encoded(text_batches())


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------
class _PairScores:
    """Full-model scores of (image, caption) pairs, each pair computed once and remembered.

    The 5K and the 1K-fold protocols shortlist different pairs; remembering avoids rescoring the
    pairs they share.
    """

    def __init__(self, score: Callable[[np.ndarray, np.ndarray], np.ndarray], n_texts: int, progress: bool):
        self._score = score
        self._n_texts = n_texts
        self._progress = progress
        self._keys = np.empty(0, dtype=np.int64)
        self._values = np.empty(0, dtype=np.float64)

    def __call__(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        keys = rows.astype(np.int64) * self._n_texts + cols.astype(np.int64)
        wanted = np.unique(keys)
        new = wanted[~np.isin(wanted, self._keys, assume_unique=True)]
        if len(new):
            values = np.empty(len(new), dtype=np.float64)
            with _bar(len(new), "rerank", "pair", self._progress) as bar:
                for start in range(0, len(new), PAIR_BATCH):
                    chunk = new[start : start + PAIR_BATCH]
                    values[start : start + len(chunk)] = self._score(chunk // self._n_texts, chunk % self._n_texts)
                    bar.update(len(chunk))
            keys_all = np.concatenate([self._keys, new])
            order = np.argsort(keys_all, kind="stable")
            self._keys = keys_all[order]
            self._values = np.concatenate([self._values, values])[order]
        return self._values[np.searchsorted(self._keys, keys)]

    def __len__(self) -> int:
        return len(self._keys)


def shortlist_pairs(similarity: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i2t rows, i2t cols, t2i rows, t2i cols): each image's top-k captions and each caption's
    top-k images under ``similarity``, as flat pair indices (i2t image-major, t2i rank-major)."""
    sim = torch.from_numpy(np.ascontiguousarray(similarity, dtype=np.float64))
    n_images, n_texts = sim.shape
    kt, ki = min(k, n_texts), min(k, n_images)
    i2t_cols = torch.topk(sim, kt, dim=1).indices.numpy().reshape(-1)
    i2t_rows = np.repeat(np.arange(n_images), kt)
    t2i_rows = torch.topk(sim, ki, dim=0).indices.numpy().reshape(-1)
    t2i_cols = np.tile(np.arange(n_texts), ki)
    return i2t_rows, i2t_cols, t2i_rows, t2i_cols


def place_reranked(similarity: np.ndarray, i2t_pairs: tuple[np.ndarray, np.ndarray], i2t_values: np.ndarray,
                   t2i_pairs: tuple[np.ndarray, np.ndarray], t2i_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense ``(image_to_text, text_to_image)`` score matrices of a two-stage ranking: the shortlisted
    pairs ((rows, cols) per direction) carry their reranked values, every other pair keeps its
    cosine, shifted below the lowest reranked value so that the shortlisted items come first."""
    similarity = np.asarray(similarity, dtype=np.float64)
    floor = min(i2t_values.min(), t2i_values.min()) - 1.0
    # Shift, not squash: cosine order is kept exactly below every reranked score.
    low = similarity - similarity.max() + floor
    image_to_text = low.copy()
    image_to_text[i2t_pairs] = np.reshape(i2t_values, -1)
    low[t2i_pairs] = np.reshape(t2i_values, -1)
    return image_to_text, low


def two_stage_matrices(
    global_similarity: np.ndarray, rerank_k: int, full_scores: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Orderings of two-stage retrieval as score matrices: ``(image_to_text, text_to_image)``.

    For each image (row) its ``rerank_k`` best captions by global cosine, and for each caption
    (column) its ``rerank_k`` best images, get their full-model score; every other pair keeps its
    cosine, shifted below the lowest full score so that the reranked items come first. The two
    directions shortlist different pairs, hence two matrices. ``full_scores(rows, cols)`` scores
    pairs given by row and column index into ``global_similarity``.
    """
    i2t_rows, i2t_cols, t2i_rows, t2i_cols = shortlist_pairs(global_similarity, rerank_k)
    return place_reranked(global_similarity, (i2t_rows, i2t_cols), full_scores(i2t_rows, i2t_cols),
                          (t2i_rows, t2i_cols), full_scores(t2i_rows, t2i_cols))


@dataclass
class SplitScores:
    """Everything needed to rank a split, under the exhaustive or the two-stage protocol."""

    caption_image: np.ndarray
    scores: np.ndarray | None = None  # exhaustive: full-model scores [n_images, n_captions]
    global_similarity: np.ndarray | None = None  # two-stage: the shortlist scores
    rerank_k: int | None = None
    pair_scores: _PairScores | None = field(default=None, repr=False)

    def matrices(self, images: slice = slice(None)) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``(i2t_scores, t2i_scores or None, caption_image)`` for a range of images and their captions.

        Two-stage shortlists are drawn among those images and captions only, as if the range were
        the whole gallery (the 1K protocol ranks within its fold).
        """
        lo, hi, _ = images.indices(self._n_images())
        columns = np.flatnonzero((self.caption_image >= lo) & (self.caption_image < hi))
        mapping = self.caption_image[columns] - lo
        matrix = self.scores if self.scores is not None else self.global_similarity
        # The whole split needs no copy (the COCO 5K matrix is 0.5-1 GB).
        whole = lo == 0 and hi == matrix.shape[0] and len(columns) == matrix.shape[1]
        sub = matrix if whole else matrix[lo:hi][:, columns]
        if self.scores is not None:
            return sub, None, mapping

        def full(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            return self.pair_scores(rows + lo, columns[cols])

        i2t, t2i = two_stage_matrices(sub, self.rerank_k, full)
        return i2t, t2i, mapping

    def _n_images(self) -> int:
        matrix = self.scores if self.scores is not None else self.global_similarity
        return matrix.shape[0]

    def metrics(self) -> dict[str, Any]:
        i2t, t2i, mapping = self.matrices()
        return retrieval_metrics(i2t, mapping, t2i)

    def coco_1k(self, fold_size: int = COCO_FOLD_SIZE) -> dict[str, Any]:
        """Mean over the folds of ``fold_size`` images (COCO 1K); the folds under ``"folds"``."""
        folds = []
        for lo, hi in fold_ranges(self._n_images(), fold_size):
            i2t, t2i, mapping = self.matrices(slice(lo, hi))
            folds.append(retrieval_metrics(i2t, mapping, t2i))
        return mean_metrics(folds)


def _cxx_compiler() -> str | None:
    import os
    import shutil

    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def resolve_compile(compile: bool | str, model, n_pairs: int, device: torch.device) -> bool:
    """``compile`` as a bool: ``"auto"`` compiles exhaustive scoring on CPU when there are at least
    :data:`AUTO_COMPILE_PAIRS` pairs, the head has a cross-attention part and a C++ compiler is found."""
    if compile != "auto":
        return bool(compile)
    return (device.type == "cpu" and n_pairs >= AUTO_COMPILE_PAIRS and get_head(model.config.head).cross_attention
            and _cxx_compiler() is not None)


def score_split(model, images, texts, caption_image: np.ndarray, rerank_k: int | None = None,
                progress: bool = True, compile: bool | str = False, precision: str = "auto") -> SplitScores:
    """Score encoded images against encoded captions, exhaustively or as two-stage retrieval
    (``compile``: exhaustive blocks through torch.compile, see ``TSHSRModel.score_encoded``;
    ``"auto"``: see :func:`resolve_compile`; if compiling fails then, scoring goes on uncompiled;
    ``precision``: see ``TSHSRModel.score_encoded``, bf16 on a GPU by default)."""
    caption_image = np.asarray(caption_image, dtype=np.int64)
    n_images, n_texts = len(images), len(texts)
    auto = compile == "auto"
    if rerank_k is None:
        compile = resolve_compile(compile, model, n_images * n_texts, images.device)
        if auto and compile and progress:
            print("note: compiling the scoring engine first (torch.compile, up to a minute; --no-compile skips it)",
                  file=sys.stderr)
        scores = np.empty((n_images, n_texts), dtype=np.float32)
        rows = max(1, SCORE_BLOCK_PAIRS // max(n_texts, 1))
        with _bar(n_images, "score", "img", progress) as bar:
            for chunk, start in enumerate(range(0, n_images, rows)):
                stop = min(start + rows, n_images)
                try:
                    out = model.score_encoded(images[start:stop], texts, progress=False, compile=compile,
                                              precision=precision)
                except RuntimeError as err:
                    if not (auto and compile and chunk == 0):
                        raise
                    print(f"note: scoring uncompiled: {err}", file=sys.stderr)
                    compile = False
                    out = model.score_encoded(images[start:stop], texts, progress=False, precision=precision)
                scores[start:stop] = out.scores.float().cpu().numpy()
                del out
                if chunk % 64 == 63:  # the worker threads' freed blocks back to the OS (bounded memory)
                    release_free_memory()
                bar.update(stop - start)
        release_free_memory()
        return SplitScores(caption_image=caption_image, scores=scores)
    if rerank_k <= 0:
        raise ValueError(f"rerank_k must be a positive number of items, got {rerank_k}")
    global_similarity = model.global_similarity(images, texts).double().cpu().numpy()

    def full(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        out = model.score_pairs(images, texts, torch.from_numpy(rows), torch.from_numpy(cols))
        return out.scores.double().cpu().numpy()

    return SplitScores(caption_image=caption_image, global_similarity=global_similarity, rerank_k=rerank_k,
                       pair_scores=_PairScores(full, n_texts, progress))


def _result(metrics: dict[str, Any], split: ImageCaptionSplit, seconds: float) -> dict[str, Any]:
    """The exact JSON schema of an evaluation (extra keys such as fold details are dropped)."""
    return {
        "i2t": {k: float(metrics["i2t"][k]) for k in ("r1", "r5", "r10")},
        "t2i": {k: float(metrics["t2i"][k]) for k in ("r1", "r5", "r10")},
        "rsum": float(metrics["rsum"]),
        "n_images": int(len(split)),
        "n_captions": int(split.n_captions),
        "seconds": float(seconds),
    }


def evaluate_split(model, split: ImageCaptionSplit, rerank_k: int | None = None, batch_size: int = 32,
                   progress: bool = True, coco_1k: bool = False,
                   fold_size: int = COCO_FOLD_SIZE, compile: bool | str = False,
                   precision: str = "auto") -> tuple[dict[str, Any], dict[str, Any] | None]:
    """:func:`evaluate_model` plus, with ``coco_1k``, the 1K-fold result (same schema)."""
    start = time.perf_counter()
    with eval_mode(model):
        images, texts = encode_split(model, split, batch_size=batch_size, progress=progress)
        scored = score_split(model, images, texts, split.caption_image, rerank_k=rerank_k, progress=progress,
                             compile=compile, precision=precision)
        result = _result(scored.metrics(), split, time.perf_counter() - start)
        folds = None
        if coco_1k:
            folds = _result(scored.coco_1k(fold_size), split, time.perf_counter() - start)
            folds["n_images"] = fold_size  # per fold
            folds["n_captions"] = int(round(split.n_captions / (len(split) / fold_size)))
    return result, folds


def evaluate_model(model, split: ImageCaptionSplit, rerank_k: int | None = None, batch_size: int = 32,
                   progress: bool = True) -> dict[str, Any]:
    """Retrieval metrics of ``model`` on ``split``.

    Returns ``{"i2t": {"r1", "r5", "r10"}, "t2i": {...}, "rsum", "n_images", "n_captions",
    "seconds"}`` (recalls in percent). The model's training mode is restored afterwards.
    """
    return evaluate_split(model, split, rerank_k=rerank_k, batch_size=batch_size, progress=progress)[0]


def main(argv: list[str] | None = None) -> int:
    """``python -m tshsr.evaluate``: the evaluation command line, :func:`tshsr_train.evaluate_cli.main`."""
    from tshsr_train.evaluate_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
