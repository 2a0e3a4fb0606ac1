"""Losses as pure functions: VSE++ hinge over candidate pairs and a multi-positive InfoNCE.

Score matrices are [n_images, n_captions]; ``positive[i, t]`` marks matching pairs (an image can
have several captions in a batch); ``candidate[i, t]`` marks the pairs whose score was computed
(mined hard negatives plus the positives); other entries are ignored.
"""

from __future__ import annotations

import torch


def hinge_loss(scores: torch.Tensor, positive: torch.Tensor, candidate: torch.Tensor | None = None,
               margin: float = 0.2, hardest: bool = True) -> torch.Tensor:
    """Bidirectional triplet hinge (VSE++), averaged over positive pairs.

    For each positive pair (i, t): image-to-text violations are captions t' of the candidates
    that score higher than t minus the margin, text-to-image violations are images i'.
    ``hardest`` keeps only the largest violation in each direction (VSE++); otherwise all
    violations are summed, the warm-up that keeps a fresh model from collapsing every score to
    one value.
    """
    if candidate is None:
        candidate = torch.ones_like(positive)
    negative = candidate & ~positive
    pi, pt = positive.nonzero(as_tuple=True)
    if pi.numel() == 0:
        raise ValueError("hinge_loss needs at least one positive pair")
    s_pos = scores[pi, pt].unsqueeze(1)
    # Non-candidates may hold NaN/garbage; torch.where keeps them out of the graph entirely.
    zero = scores.new_zeros(())
    cost_text = torch.where(negative[pi], (margin + scores[pi] - s_pos).clamp(min=0), zero)
    cost_image = torch.where(negative[:, pt].T, (margin + scores[:, pt].T - s_pos).clamp(min=0), zero)
    if hardest:
        per_pair = cost_text.max(1).values + cost_image.max(1).values
    else:
        per_pair = cost_text.sum(1) + cost_image.sum(1)
    return per_pair.mean()


def contrastive_loss(similarity: torch.Tensor, positive: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on cosine similarities with several positives per row allowed."""
    logits = similarity * logit_scale
    def one_side(lg, pos):
        log_all = torch.logsumexp(lg, 1)
        log_pos = torch.logsumexp(lg.masked_fill(~pos, float("-inf")), 1)
        keep = pos.any(1)
        return (log_all - log_pos)[keep].mean()

    return 0.5 * (one_side(logits, positive) + one_side(logits.T, positive.T))


def mine_candidates(similarity: torch.Tensor, positive: torch.Tensor, hard: int, random: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Candidate pairs for the cross-attention head: positives, the ``hard`` most similar
    negatives of each image and of each caption under the cheap global similarity, and
    ``random`` random negatives per caption (so easy pairs are scored too). ``hard < 0``
    means every pair."""
    if hard < 0:
        return torch.ones_like(positive)
    sim = similarity.detach().masked_fill(positive, float("-inf"))
    n_img, n_txt = sim.shape
    candidate = positive.clone()
    if hard > 0:
        k = min(hard, n_txt - 1)
        if k > 0:
            top_t = sim.topk(k, dim=1).indices
            candidate.scatter_(1, top_t, True)
        k = min(hard, n_img - 1)
        if k > 0:
            top_i = sim.topk(k, dim=0).indices
            candidate.scatter_(0, top_i, True)
    if random > 0 and n_img > 1:
        rows = torch.randint(0, n_img, (random, n_txt), generator=generator, device="cpu").to(sim.device)
        candidate.scatter_(0, rows, True)
    return candidate
