"""The attention primitives of the heads: SCAN's cross-attention (per pair and over a grid of every
image x every text), its alignment score, context units, and SGR's relation step over a set of
similarity nodes. Pair tensors have a leading pair axis P (see :mod:`tshsr.heads`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NEG_INF = -1e4  # large enough to zero a softmax entry, small enough to stay finite in bf16


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8, fresh: bool = False) -> torch.Tensor:
    """x / (||x|| + eps) along ``dim``.

    ``fresh=True`` says x is a temporary nobody else holds: without autograd it is then divided
    in place, which saves a pass over memory (the scoring engine is memory-bound outside its
    matrix products).
    """
    # linalg.vector_norm is one fused pass; x.pow(2).sum().sqrt() was three (memory-bound on CPU)
    if not torch.is_grad_enabled():
        norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True).add_(eps)
        return x.div_(norm) if fresh else x / norm
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)


def relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU of a fresh temporary: in place when autograd is off."""
    return x.relu_() if not torch.is_grad_enabled() else F.relu(x)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.softmax(logits.masked_fill(~mask, NEG_INF), dim=dim) * mask


def cross_attention(
    queries: torch.Tensor, query_mask: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor,
    smooth: float, normalize_over_queries: bool = True, key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SCAN/SGRAF attention of each query unit over the key units.

    A = LeakyReLU_0.1(Q K^T); each key's column is L2-normalised over the queries (SCAN's
    "clipped l2norm"), weights = softmax over keys of (smooth * A); the attended vector is
    L2-normalised. Returns (attended [P, nq, D], weights [P, nq, nk]); weights of a valid query
    sum to one over the valid keys; rows of padded queries are zero. ``key_bias`` [P, nk] (the
    word salience of :class:`StreamHead`) is added to every query's logits: a learned prior of
    which keys are worth attending to.
    """
    affinity = F.leaky_relu(torch.bmm(queries, keys.transpose(1, 2)), 0.1)
    affinity = affinity * query_mask.unsqueeze(2)
    if normalize_over_queries:
        affinity = l2norm(affinity, dim=1, fresh=True)
    logits = smooth * affinity if key_bias is None else smooth * affinity + key_bias.unsqueeze(1)
    weights = masked_softmax(logits, key_mask.unsqueeze(1), dim=2) * query_mask.unsqueeze(2)
    return l2norm(torch.bmm(weights, keys), fresh=True), weights


def cross_attention_grid(
    queries: torch.Tensor, query_mask: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor,
    smooth: float, queries_are_images: bool, key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cross_attention` for every (query item, key item) combination at once.

    queries [Bq, nq, D] and keys [Bk, nk, D] hold per-item units; the result is laid out
    image-major, [n_images, n_texts, nq, D] and [n_images, n_texts, nq, nk], whichever side the
    queries come from. One large matrix product gives all affinities and one batched product per
    key item gives all attended vectors, instead of a small product per pair. ``key_bias`` is
    per key item, [Bk, nk].
    """
    Bq, nq, D = queries.shape
    Bk, nk, _ = keys.shape
    raw = (queries.reshape(Bq * nq, D) @ keys.reshape(Bk * nk, D).T).view(Bq, nq, Bk, nk)
    affinity = F.leaky_relu(raw.permute(2, 0, 1, 3), 0.1)  # [Bk, Bq, nq, nk]
    qmask = query_mask.view(1, Bq, nq, 1)
    affinity = l2norm(affinity * qmask, dim=2, fresh=True)
    logits = smooth * affinity if key_bias is None else smooth * affinity + key_bias.view(Bk, 1, 1, nk)
    weights = masked_softmax(logits, key_mask.view(Bk, 1, 1, nk), dim=3) * qmask
    attended = torch.bmm(weights.reshape(Bk, Bq * nq, nk), keys).view(Bk, Bq, nq, D)
    attended = l2norm(attended, fresh=True)
    if queries_are_images:  # key items are texts: put images first
        return attended.transpose(0, 1), weights.transpose(0, 1)
    return attended, weights


def attended_cosine_grid(
    queries: torch.Tensor, query_mask: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor,
    smooth: float, queries_are_images: bool, key_bias: torch.Tensor | None = None,
    query_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """SCAN's alignment score of every (image, text) combination, [n_images, n_texts]: the mean
    over valid query units of cos(q_i, a_i), a_i the attended vector of :func:`cross_attention`.

    Computed without the attended vectors: q_i . sum_j w_ij k_j = sum_j w_ij (q_i . k_j) and
    ||sum_j w_ij k_j||^2 = w_i^T G w_i with G = K K^T per key item, so a whole training batch
    (every image with every caption) costs about as little as its affinities. ``key_bias``
    [Bk, nk] as in :func:`cross_attention_grid`; ``query_weights`` [Bq, nq] (zero on padding,
    summing to one) replace the plain mean over query units by a weighted one.
    """
    Bq, nq, D = queries.shape
    Bk, nk, _ = keys.shape
    raw = (queries.reshape(Bq * nq, D) @ keys.reshape(Bk * nk, D).T).view(Bq, nq, Bk, nk).permute(2, 0, 1, 3)
    qmask = query_mask.view(1, Bq, nq, 1).to(raw.dtype)
    affinity = l2norm(F.leaky_relu(raw, 0.1) * qmask, dim=2)
    logits = smooth * affinity if key_bias is None else smooth * affinity + key_bias.view(Bk, 1, 1, nk)
    weights = masked_softmax(logits, key_mask.view(Bk, 1, 1, nk), dim=3) * qmask  # [Bk, Bq, nq, nk]
    gram = torch.bmm(keys, keys.transpose(1, 2))  # [Bk, nk, nk]
    squared = (torch.bmm(weights.reshape(Bk, Bq * nq, nk), gram).view(Bk, Bq, nq, nk) * weights).sum(-1)
    cos = (weights * raw).sum(-1) / (squared.clamp(min=1e-12).sqrt() + 1e-8)  # l2norm's eps
    if query_weights is None:
        valid = query_mask.view(1, Bq, nq).to(raw.dtype)
        score = (cos * valid).sum(-1) / valid.sum(-1).clamp(min=1)  # [Bk, Bq]
    else:
        score = (cos * query_weights.view(1, Bq, nq)).sum(-1)
    return score.T if queries_are_images else score


def unit_alignment(attended: torch.Tensor, queries: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cos(q_i, a_i) of every query unit (both unit vectors), zero where ``mask`` is off."""
    return (attended * queries).sum(-1) * mask.to(attended.dtype)


def mean_alignment(attended: torch.Tensor, queries: torch.Tensor, mask: torch.Tensor,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over valid query units of cos(q_i, a_i) (both unit vectors), over any leading shape;
    with ``weights`` (zero on padding, summing to one over the query units) a weighted mean."""
    if weights is not None:
        return (unit_alignment(attended, queries, mask) * weights).sum(-1)
    return unit_alignment(attended, queries, mask).sum(-1) / mask.to(attended.dtype).sum(-1).clamp(min=1)


def context_units(units: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """[N, C, D] context units: the membership-weighted mean of the units, L2-normalised."""
    return l2norm(torch.bmm(membership, units), fresh=True)


class GraphReasoningStep(nn.Module):
    """One SGR step, as in SGRAF: N <- ReLU(W_r softmax((W_q N)(W_k N)^T) N)."""

    def __init__(self, sim_dim: int):
        super().__init__()
        self.query = nn.Linear(sim_dim, sim_dim)
        self.key = nn.Linear(sim_dim, sim_dim)
        self.update = nn.Linear(sim_dim, sim_dim)

    def forward(self, nodes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = torch.bmm(self.query(nodes), self.key(nodes).transpose(1, 2))
        edges = masked_softmax(logits, mask.unsqueeze(1), dim=2)
        return F.relu(self.update(torch.bmm(edges, nodes))) * mask.unsqueeze(-1)
