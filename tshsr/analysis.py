"""What each part of a trained model contributes to its rankings.

A TSHSR score is an exact sum of per-stream, per-level contributions (``TSHSROutput``), so the
parts can be judged one by one on a split:

* each part alone as a ranker: the level score of ``<stream>/<level>``, each stream's own score,
  and the cosine of the contrastive global vectors (the dual-encoder shortlist);
* leave-one-out: the full score minus one stream's contributions, or minus one level's
  contributions in every stream (ranking is unchanged by a positive factor, so no renormalising);
* on shortlists, for models whose local and context levels carry SCAN's alignment score,
  ``<stream>/<level> alignment``: that alignment alone (the attended cosine, before any
  similarity node or reasoning: what the unit vectors and the attention know by themselves).

Knock-out (:func:`context_cut`): the same scoring with the context level cut out of each
stream's reasoning graph, so that a context level without a score share of its own can still be
judged by what the global and local levels lose without it. The model was trained with it, so
this measures reliance, not worth: what a model trained without it (preset ``flat``) reaches is
the ablation's question. :func:`reasoning_off` goes further: no reasoning step at all, so every
level is read out from its nodes as built, and the score shows whether the graph's messages carry
evidence at test time.

Exhaustive scoring ranks all pairs; the two-stage protocol gives every ranker the same shortlist
(the cosine's top K per image and per caption), reranks it by that ranker and leaves the rest in
cosine order below it, as :func:`tshsr.evaluate.two_stage_matrices` does for the full model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .encoding import head_inputs
from .evaluate import place_reranked, shortlist_pairs  # noqa: F401 (shortlist_pairs: part of this module's API)
from .heads import HierarchicalReasoning, StreamHead
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


@contextmanager
def _set_within(modules: list, name: str, value) -> Iterator[bool]:
    """Within the block, the attribute ``name`` of every module is ``value``; yields whether there
    are any. Each module's own value is restored on exit, also after an error."""
    before = [getattr(m, name) for m in modules]
    for m in modules:
        setattr(m, name, value)
    try:
        yield bool(modules)
    finally:
        for m, v in zip(modules, before):
            setattr(m, name, v)


def context_cut(model):
    """Within the block, every stream's reasoning runs with the context level cut out of its graph
    (``HierarchicalReasoning.cut_context``); yields whether the model has such a level at all.
    The switch is restored on exit, also after an error."""
    return _set_within([m for m in model.modules() if isinstance(m, HierarchicalReasoning) and m.with_context],
                       "cut_context", True)


def reasoning_off(model):
    """Within the block, every stream's reasoning graph runs no step (``HierarchicalReasoning.steps``
    = 0): each level is read out from its similarity nodes as built, so no message passes between
    levels, the skip edges' included. Yields whether the model reasons at all. It asks whether the
    graph carries evidence at test time or only shapes the nodes in training. The step counts are
    restored on exit, also after an error."""
    return _set_within([m for m in model.modules() if isinstance(m, HierarchicalReasoning)], "steps", 0)


def context_twin(model):
    """Within the block, every stream with a context level reasons each pair twice on the same
    nodes, the second copy with the context path cut (``StreamHead.twin_cut``): pair outputs are
    [2P], full then cut (training: ``tshsr.loss.scores_with_context_cut``). Restored on exit."""
    return _set_within([m for m in model.modules() if isinstance(m, StreamHead) and "context" in m.levels],
                       "twin_cut", True)


def knockout_metrics(model, images, texts, caption_image, rerank_k: int | None = None,
                     score_all: Callable | None = None) -> dict[str, dict]:
    """Metrics of the full score with the context level cut from the reasoning
    (``without context in reasoning``) and, where the context level also has a score share, with
    that share removed too (``without context, score and reasoning``); empty for a model without a
    context level in its reasoning. Same protocol as :func:`part_metrics`."""
    with context_cut(model) as cut:
        if not cut:
            return {}
        m = part_metrics(model, images, texts, caption_image, rerank_k=rerank_k, score_all=score_all)
    out = {"without context in reasoning": m["full"]}
    if "without context" in m and m["without context"] != m["full"]:
        out["without context, score and reasoning"] = m["without context"]
    return out


def _pairs_output(model, images, texts, rows: np.ndarray, cols: np.ndarray) -> dict[str, np.ndarray]:
    """The rankers' values on explicit pairs, scored in chunks."""
    values: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(rows), PAIR_CHUNK):
        r = torch.from_numpy(rows[start:start + PAIR_CHUNK])
        c = torch.from_numpy(cols[start:start + PAIR_CHUNK])
        out = model.score_pairs(images, texts, r, c)
        ranked = rankers(out.contributions, out.level_scores, out.stream_scores, out.global_similarity)
        aligned = model.head_kind.alignment_scores(model, head_inputs(images, r), head_inputs(texts, c), pairs=True)
        ranked.update({f"{key} alignment": v for key, v in aligned.items()})
        for name, v in ranked.items():
            values.setdefault(name, []).append(v.double().cpu().numpy())
    return {name: np.concatenate(v) for name, v in values.items()}


@dataclass
class Shortlisted:
    """Every ranker's values on the cosine top-K shortlists of both directions (one scoring pass).

    ``i2t[name]`` is [n_images, k]: image i's k nearest captions, at columns ``i2t_cols``;
    ``t2i[name]`` is [n_texts, k]: caption t's k nearest images, at rows ``t2i_rows``.
    """

    similarity: np.ndarray
    i2t_cols: np.ndarray
    t2i_rows: np.ndarray
    i2t: dict[str, np.ndarray]
    t2i: dict[str, np.ndarray]


def shortlisted_values(model, images, texts, rerank_k: int) -> Shortlisted:
    """Score the union of both shortlists once (they share most pairs: an image's top captions
    often rank it top too) and lay each ranker's values out per query."""
    with torch.no_grad():
        sim = model.global_similarity(images, texts).double().cpu().numpy()
        i2t_rows, i2t_cols, t2i_rows, t2i_cols = shortlist_pairs(sim, rerank_k)
        n_images, n_texts = sim.shape
        keys = np.concatenate([i2t_rows * n_texts + i2t_cols, t2i_rows * n_texts + t2i_cols]).astype(np.int64)
        unique, inverse = np.unique(keys, return_inverse=True)
        values = _pairs_output(model, images, texts, unique // n_texts, unique % n_texts)
    n_i2t = len(i2t_rows)
    return Shortlisted(
        similarity=sim, i2t_cols=i2t_cols.reshape(n_images, -1), t2i_rows=t2i_rows.reshape(-1, n_texts).T,
        i2t={name: v[inverse[:n_i2t]].reshape(n_images, -1) for name, v in values.items()},
        t2i={name: v[inverse[n_i2t:]].reshape(-1, n_texts).T for name, v in values.items()})


def part_metrics(model, images, texts, caption_image, rerank_k: int | None = None,
                 score_all: Callable | None = None, shortlisted: Shortlisted | None = None) -> dict[str, dict]:
    """Retrieval metrics (R@1/5/10 both ways, RSUM) of every ranker of :func:`rankers`.

    ``rerank_k=None`` scores every pair (``model.score_encoded`` in blocks, or ``score_all``
    returning a ``TSHSROutput`` over all pairs); otherwise the two-stage protocol described in the
    module docstring, with the same shortlist for every ranker (``shortlisted``: already scored).
    """
    caption_image = np.asarray(caption_image, dtype=np.int64)
    if rerank_k is None:
        with torch.no_grad():
            out = score_all() if score_all is not None else model.score_encoded(images, texts)
        ranked = rankers(out.contributions, out.level_scores, out.stream_scores, out.global_similarity)
        return {name: retrieval_metrics(m.float().cpu().numpy(), caption_image) for name, m in ranked.items()}
    s = shortlisted or shortlisted_values(model, images, texts, rerank_k)
    results = {}
    for name in s.i2t:
        i2t, t2i = reranked_matrices(s, s.i2t[name], s.t2i[name])
        results[name] = retrieval_metrics(i2t, caption_image, t2i)
    return results


def reranked_matrices(s: Shortlisted, i2t_values: np.ndarray, t2i_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two-stage ranking of both directions as dense [n_images, n_texts] score matrices (image
    queries, caption queries): each query's first k shortlisted candidates carry the given values
    (``i2t_values`` [n_images, k], ``t2i_values`` [n_texts, k], laid out as in ``s``; k may be fewer
    than ``s`` holds, the shortlists being in cosine order), the rest stay in cosine order below them."""
    n_images, n_texts = s.similarity.shape
    k_t, k_i = i2t_values.shape[1], t2i_values.shape[1]
    return place_reranked(
        s.similarity, (np.repeat(np.arange(n_images), k_t), s.i2t_cols[:, :k_t].reshape(-1)), i2t_values,
        (s.t2i_rows[:, :k_i].reshape(-1), np.repeat(np.arange(n_texts), k_i)), t2i_values)


def stream_agreement(s: Shortlisted, caption_image, streams: tuple[str, str] = ("i2t", "t2i")) -> dict[str, dict]:
    """How much the two streams, each used alone on the same shortlists, agree, per direction.

    ``same_top1``: share of queries where both streams put the same candidate first;
    ``spearman``: mean rank correlation of their scores over each query's candidates;
    ``both``/``only_<stream>``/``neither``: share of queries whose first candidate is right for
    both streams, for one only, for none (``only_*`` is the room a fusion of the two has to gain).
    """
    caption_image = np.asarray(caption_image, dtype=np.int64)
    a, b = (f"{x} stream" for x in streams)
    out = {}
    for direction, values, right in (
            ("i2t", s.i2t, caption_image[s.i2t_cols] == np.arange(s.i2t_cols.shape[0])[:, None]),
            ("t2i", s.t2i, s.t2i_rows == caption_image[:, None])):
        if a not in values or b not in values:
            return {}
        top_a, top_b = values[a].argmax(1), values[b].argmax(1)
        hit_a = np.take_along_axis(right, top_a[:, None], 1)[:, 0]
        hit_b = np.take_along_axis(right, top_b[:, None], 1)[:, 0]
        ranks_a = values[a].argsort(1).argsort(1).astype(np.float64)
        ranks_b = values[b].argsort(1).argsort(1).astype(np.float64)
        ranks_a -= ranks_a.mean(1, keepdims=True)
        ranks_b -= ranks_b.mean(1, keepdims=True)
        rho = (ranks_a * ranks_b).sum(1) / np.sqrt((ranks_a ** 2).sum(1) * (ranks_b ** 2).sum(1)).clip(min=1e-12)
        out[direction] = {"same_top1": float((top_a == top_b).mean()), "spearman": float(rho.mean()),
                          "both": float((hit_a & hit_b).mean()), f"only_{streams[0]}": float((hit_a & ~hit_b).mean()),
                          f"only_{streams[1]}": float((~hit_a & hit_b).mean()),
                          "neither": float((~hit_a & ~hit_b).mean())}
    return out
