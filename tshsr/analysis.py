"""What each part of a trained model contributes to its rankings.

A TSHSR score is an exact sum of per-stream, per-level contributions (``TSHSROutput``), so the
parts can be judged one by one on a split:

* each part alone as a ranker: the level score of ``<stream>/<level>``, each stream's own score,
  and the cosine of the contrastive global vectors (the dual-encoder shortlist);
* leave-one-out: the full score minus one stream's contributions, or minus one level's
  contributions in every stream (ranking is unchanged by a positive factor, so no renormalising).

Exhaustive scoring ranks all pairs; the two-stage protocol gives every ranker the same shortlist
(the cosine's top K per image and per caption), reranks it by that ranker and leaves the rest in
cosine order below it, as :func:`tshsr.evaluate.two_stage_matrices` does for the full model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .metrics import retrieval_metrics

PAIR_CHUNK = 4096


def rankers(contributions: dict[str, torch.Tensor], level_scores: dict[str, torch.Tensor],
            stream_scores: dict[str, torch.Tensor], cosine: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every ranker derived from one scoring pass, by name (all of the same shape as ``cosine``).

    ``full``, ``cosine``, ``<stream>/<level>`` (that level score alone), ``<stream> stream``
    (the stream's own score), ``without <stream>`` and ``without <level>`` (leave-one-out).
    """
    full = torch.stack(list(contributions.values())).sum(0)
    out = {"full": full, "cosine": cosine}
    keys = list(contributions)
    streams = sorted({k.split("/")[0] for k in keys})
    levels = list(dict.fromkeys(k.split("/")[1] for k in keys))
    if len(keys) > 1:
        out.update({key: level_scores[key] for key in keys})
    if len(streams) > 1:
        out.update({f"{s} stream": stream_scores[s] for s in streams if s in stream_scores})
        for s in streams:
            out[f"without {s}"] = full - sum(contributions[k] for k in keys if k.split("/")[0] == s)
    if len(levels) > 1:
        for lv in levels:
            out[f"without {lv}"] = full - sum(contributions[k] for k in keys if k.split("/")[1] == lv)
    return out


def _pairs_output(model, images, texts, rows: np.ndarray, cols: np.ndarray) -> dict[str, np.ndarray]:
    """The rankers' values on explicit pairs, scored in chunks."""
    values: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(rows), PAIR_CHUNK):
        r = torch.from_numpy(rows[start:start + PAIR_CHUNK])
        c = torch.from_numpy(cols[start:start + PAIR_CHUNK])
        out = model.score_pairs(images, texts, r, c)
        for name, v in rankers(out.contributions, out.level_scores, out.stream_scores,
                               out.global_similarity).items():
            values.setdefault(name, []).append(v.double().cpu().numpy())
    return {name: np.concatenate(v) for name, v in values.items()}


def shortlist_pairs(similarity: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i2t rows, i2t cols, t2i rows, t2i cols): each image's top-k captions and each caption's
    top-k images under ``similarity``."""
    sim = torch.from_numpy(np.ascontiguousarray(similarity, dtype=np.float64))
    n_images, n_texts = sim.shape
    kt, ki = min(k, n_texts), min(k, n_images)
    i2t_cols = torch.topk(sim, kt, dim=1).indices.numpy().reshape(-1)
    i2t_rows = np.repeat(np.arange(n_images), kt)
    t2i_rows = torch.topk(sim, ki, dim=0).indices.numpy().reshape(-1)
    t2i_cols = np.tile(np.arange(n_texts), ki)
    return i2t_rows, i2t_cols, t2i_rows, t2i_cols


def part_metrics(model, images, texts, caption_image, rerank_k: int | None = None,
                 score_all: Callable | None = None) -> dict[str, dict]:
    """Retrieval metrics (R@1/5/10 both ways, RSUM) of every ranker of :func:`rankers`.

    ``rerank_k=None`` scores every pair (``model.score_encoded`` in blocks, or ``score_all``
    returning a ``TSHSROutput`` over all pairs); otherwise the two-stage protocol described in the
    module docstring, with the same shortlist for every ranker.
    """
    caption_image = np.asarray(caption_image, dtype=np.int64)
    with torch.no_grad():
        if rerank_k is None:
            out = score_all() if score_all is not None else model.score_encoded(images, texts)
            ranked = rankers(out.contributions, out.level_scores, out.stream_scores, out.global_similarity)
            return {name: retrieval_metrics(m.float().cpu().numpy(), caption_image) for name, m in ranked.items()}
        sim = model.global_similarity(images, texts).double().cpu().numpy()
        i2t_rows, i2t_cols, t2i_rows, t2i_cols = shortlist_pairs(sim, rerank_k)
        # The two shortlists share most pairs (an image's top captions often rank it top too):
        # each pair is scored once.
        n_texts = sim.shape[1]
        keys = np.concatenate([i2t_rows * n_texts + i2t_cols, t2i_rows * n_texts + t2i_cols]).astype(np.int64)
        unique, inverse = np.unique(keys, return_inverse=True)
        values = _pairs_output(model, images, texts, unique // n_texts, unique % n_texts)
        i2t_values = {name: v[inverse[:len(i2t_rows)]] for name, v in values.items()}
        t2i_values = {name: v[inverse[len(i2t_rows):]] for name, v in values.items()}
    results = {}
    for name in i2t_values:
        floor = min(i2t_values[name].min(), t2i_values[name].min()) - 1.0
        low = sim - sim.max() + floor  # cosine order, below every reranked value
        i2t = low.copy()
        i2t[i2t_rows, i2t_cols] = i2t_values[name]
        t2i = low
        t2i[t2i_rows, t2i_cols] = t2i_values[name]
        results[name] = retrieval_metrics(i2t, caption_image, t2i)
    return results
