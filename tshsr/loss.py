"""The training objective of a TSHSR model, as used by ``TSHSRModel.forward``.

A contrastive term on the global vectors, plus a hinge on the full-model scores of mined pairs
(positives, hard negatives, random ones) and, optionally, a hinge on each stream's and each
level's score alone. The terms themselves are pure functions in :mod:`tshsr.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .analysis import context_twin
from .encoding import head_inputs
from .losses import contrastive_loss, hinge_loss, mine_candidates


@dataclass
class LossSettings:
    """The loss weights and the mining of negatives (the trainer's flags of the same names)."""

    margin: float = 0.2
    hard_negatives: int = 3  # per image and per caption, mined by global similarity; -1 = all pairs
    random_negatives: int = 1
    aux_stream_weight: float = 0.5
    aux_level_weight: float = 0.0  # hinge on each stream/level score alone, so every part is a matcher
    mine_pool: int = 0  # >0: the full model picks the hard negatives among this many cosine candidates
    contrastive_weight: float = 1.0
    alignment_weight: float = 0.0  # InfoNCE on each level's alignment score, within groups of captions
    alignment_chunk: int = 32  # captions per InfoNCE group (every pair of a group is aligned: cost ~ chunk x batch)
    alignment_joint: float = 0.0  # InfoNCE on the mean of the cosine and all alignment scores: parts trained together
    alignment_levels: str = "all"  # "local": the alignment InfoNCE leaves the context level's score out
    # InfoNCE on each stream's alignment score plus the other stream's (without gradient), per level:
    # each stream learns where the other is wrong instead of repeating it.
    alignment_complement: float = 0.0
    # Hinge on what the context path adds to the full score (full minus the score with the context
    # level cut from the reasoning), so that its contribution is itself a matcher.
    context_gain_weight: float = 0.0

    @classmethod
    def from_args(cls, args) -> "LossSettings":
        """The settings from any object with attributes of the same names (e.g. ``TrainArgs``)."""
        return cls(**{f: getattr(args, f) for f in cls.__dataclass_fields__})


@dataclass
class MatchingLoss:
    """The loss to minimise and its parts (detached values are logged per step)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def matching_loss(model, images, texts, positive: torch.Tensor, settings: LossSettings, hardest: bool,
                  generator: torch.Generator | None = None) -> MatchingLoss:
    """The loss of a batch of encodings; ``positive`` [n_images, n_texts] marks matching pairs,
    ``hardest`` switches the hinge from the sum of violations to the hardest negative."""
    similarity = model.global_similarity(images, texts)
    scale = model.logit_scale.exp().clamp(max=100.0)
    if model.config.separate_streams:  # each stream's towers are a dual encoder of their own
        half = images.embedding.shape[-1] // 2
        towers = [2 * images.embedding[:, t] @ texts.embedding[:, t].T for t in (slice(0, half), slice(half, None))]
        parts = {"contrastive": sum(contrastive_loss(c, positive, scale) for c in towers) / 2}
    else:
        parts = {"contrastive": contrastive_loss(similarity, positive, scale)}
    loss = settings.contrastive_weight * parts["contrastive"]
    weights = {"alignment": settings.alignment_weight, "alignment_joint": settings.alignment_joint,
               "alignment_complement": settings.alignment_complement}
    if any(w > 0 for w in weights.values()):
        for name, value in alignment_loss(model, images, texts, positive, scale, settings.alignment_chunk,
                                          similarity if settings.alignment_joint > 0 else None,
                                          levels=None if settings.alignment_levels == "all"
                                          else (settings.alignment_levels,),
                                          complement=settings.alignment_complement > 0).items():
            parts[name] = value
            loss = loss + weights[name] * value
    if model.head_kind.cross_attention:
        candidate = mine(model, images, texts, similarity, positive, settings, generator)
        pi, pt = candidate.nonzero(as_tuple=True)
        gain = settings.context_gain_weight > 0 and model.has_context
        out, cut_scores = (scores_with_context_cut(model, images, texts, pi, pt) if gain
                           else (model.score_pairs(images, texts, pi, pt), None))

        def hinge(values):
            full = similarity.new_zeros(similarity.shape).index_put((pi, pt), values)
            return hinge_loss(full, positive, candidate, settings.margin, hardest)

        parts["hinge"] = hinge(out.scores)
        loss = loss + parts["hinge"]
        if len(out.stream_scores) > 1 and settings.aux_stream_weight > 0:
            parts["aux_streams"] = sum(hinge(v) for v in out.stream_scores.values()) / len(out.stream_scores)
            loss = loss + settings.aux_stream_weight * parts["aux_streams"]
        if len(out.level_scores) > 1 and settings.aux_level_weight > 0:
            parts["aux_levels"] = sum(hinge(v) for v in out.level_scores.values()) / len(out.level_scores)
            loss = loss + settings.aux_level_weight * parts["aux_levels"]
        if gain:
            parts["context_gain"] = hinge(out.scores - cut_scores)
            loss = loss + settings.context_gain_weight * parts["context_gain"]
        parts["pairs"] = torch.tensor(float(len(pi)))
    return MatchingLoss(loss, parts)


def scores_with_context_cut(model, images, texts, pi: torch.Tensor, pt: torch.Tensor):
    """(the output of ``model.score_pairs`` on the pairs (pi[p], pt[p]), their full scores with the
    context level cut from every stream's reasoning), both with gradient: the context path's
    contribution to a pair is its full score minus the cut one. The similarity nodes are built
    once and reasoned twice (``tshsr.analysis.context_twin``); the same values as scoring the pairs again
    under ``tshsr.analysis.context_cut``, at the cost of the reasoning only."""
    with context_twin(model):
        out = model.score_pairs(images, texts, pi, pt)
    n = len(pi)

    def first(values: dict) -> dict:
        return {key: v[:n] for key, v in values.items()}
    full = replace(out, scores=out.scores[:n], contributions=first(out.contributions),
                   level_scores=first(out.level_scores), stream_scores=first(out.stream_scores))
    return full, out.scores[n:]


def alignment_loss(model, images, texts, positive: torch.Tensor, scale: torch.Tensor, chunk: int,
                   similarity: torch.Tensor | None = None,
                   levels: tuple[str, ...] | None = None, complement: bool = False) -> dict[str, torch.Tensor]:
    """InfoNCE on the alignment scores, over groups of ``chunk`` captions, each group against the
    images of its own captions (every pair of a group aligned: a whole batch of 128 would cost
    ~16K pair alignments a step). ``alignment``: the mean over every level's score alone.
    ``alignment_joint`` (when the global ``similarity`` is given): on the mean of the cosine and
    every alignment score, so that the parts are also trained as one ranker, each correcting the
    others rather than each repeating the cosine. ``levels``: only these levels' scores (None: all).
    ``alignment_complement`` (``complement``, two streams): on the mean of each stream's score and
    the other stream's at the same level, the other's without gradient, so that a stream is pushed
    where the other ranks wrong (as a boosted ranker is) and not where it is right already.
    {} for heads without alignment scores."""
    alone, joint, other = [], [], []
    for start in range(0, positive.shape[1], chunk):
        cols = torch.arange(start, min(start + chunk, positive.shape[1]), device=positive.device)
        rows = positive[:, cols].any(1).nonzero(as_tuple=True)[0]
        group = positive[rows][:, cols]
        aligned = model.head_kind.alignment_scores(model, head_inputs(images, rows), head_inputs(texts, cols),
                                                   levels=levels)
        if not aligned:
            return {}
        alone += [contrastive_loss(v, group, scale) for v in aligned.values()]
        if similarity is not None:
            mean = (similarity[rows][:, cols] + sum(aligned.values())) / (len(aligned) + 1)
            joint.append(contrastive_loss(mean, group, scale))
        if complement:
            for key, value in aligned.items():
                stream, level = key.split("/")
                partner = aligned.get(f"{'t2i' if stream == 'i2t' else 'i2t'}/{level}")
                if partner is not None:
                    other.append(contrastive_loss((value + partner.detach()) / 2, group, scale))
    out = {"alignment": torch.stack(alone).mean()} if alone else {}
    if other:
        out["alignment_complement"] = torch.stack(other).mean()
    if joint:
        out["alignment_joint"] = torch.stack(joint).mean()
    return out


def mine(model, images, texts, similarity: torch.Tensor, positive: torch.Tensor, settings: LossSettings,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Candidate pairs for the hinge [n_images, n_texts]: positives, hard negatives, random ones.

    With ``mine_pool`` the cosine only proposes (its ``mine_pool`` nearest per image and per
    caption) and the full model, without gradients, picks the ``hard_negatives`` it finds
    hardest among them: the cross-attention parts then learn from their own mistakes instead of
    the cosine's.
    """
    if settings.mine_pool <= 0 or settings.hard_negatives < 0:
        return mine_candidates(similarity, positive, settings.hard_negatives, settings.random_negatives, generator)
    pool = mine_candidates(similarity, positive, settings.mine_pool, 0)
    pi, pt = pool.nonzero(as_tuple=True)
    with torch.no_grad():
        scores = model.score_pairs(images, texts, pi, pt).scores.float()
    model_similarity = similarity.detach().new_full(similarity.shape, float("-inf")).index_put((pi, pt), scores)
    return mine_candidates(model_similarity, positive, settings.hard_negatives, settings.random_negatives, generator)
