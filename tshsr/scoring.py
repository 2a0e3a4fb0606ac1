"""Gallery-scale scoring: exhaustive or two-stage (global-vector shortlist, full-model rerank)."""

from __future__ import annotations

import torch

from .model import Encoding

# Pairs outside the shortlist keep their cosine, shifted below every reranked score, so that
# they still rank among themselves in a sensible order after the reranked ones.
_SHORTLIST_OFFSET = 10.0


@torch.no_grad()
def shortlist_pairs(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [n_images, n_texts]: each image's top-k texts and each text's top-k images."""
    n_img, n_txt = similarity.shape
    chosen = torch.zeros_like(similarity, dtype=torch.bool)
    chosen.scatter_(1, similarity.topk(min(k, n_txt), dim=1).indices, True)
    chosen.scatter_(0, similarity.topk(min(k, n_img), dim=0).indices, True)
    return chosen


@torch.no_grad()
def score_matrix(model, images: Encoding, texts: Encoding, rerank_k: int | None = None,
                 block_pairs: int = 2048, progress: bool = False) -> torch.Tensor:
    """Scores [n_images, n_texts] for ranking, exhaustive (``rerank_k=None``) or two-stage."""
    if rerank_k is None or model.config.head == "dual":
        if model.config.head == "dual":
            return model.global_similarity(images, texts)
        return model.score_encoded(images, texts, block_pairs=block_pairs, progress=progress).scores
    similarity = model.global_similarity(images, texts)
    pairs = shortlist_pairs(similarity, rerank_k).nonzero()
    scores = similarity - _SHORTLIST_OFFSET
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(pairs), block_pairs), desc="rerank", disable=not progress, unit="block"):
        chunk = pairs[start:start + block_pairs]
        scores[chunk[:, 0], chunk[:, 1]] = model.score_pairs(images, texts, chunk[:, 0], chunk[:, 1]).scores
    return scores
