"""Similarity heads: similarity nodes, hierarchical reasoning, the TSHSR stream (SCAN attention and
the other primitives are in :mod:`tshsr.attention`, SGRAF's SGR and SAF heads in :mod:`tshsr.sgraf`).

All functions work on *pairs*: tensors with a leading pair axis P, where pair p holds one image
and one caption. Exhaustive scoring, mined negatives in training and reranking all reduce to
lists of pairs (see :meth:`tshsr.TSHSRModel.score_pairs`). The equations are written out in
``docs/ARCHITECTURE.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (GraphReasoningStep, attended_cosine_grid, context_units, cross_attention,
                        cross_attention_grid, l2norm, masked_softmax, mean_alignment, relu, unit_alignment)


class SimilarityNodes(nn.Module):
    """Similarity vector of two aligned vectors: l2norm(W (x - y)^2), as in SGRAF."""

    def __init__(self, embed_dim: int, sim_dim: int):
        super().__init__()
        self.proj = nn.Linear(embed_dim, sim_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # mse_loss(reduction="none") is (x - y)^2 in one fused pass; torch.square(x - y) took two
        # passes and an extra buffer, and cost as much as the projection itself on CPU.
        x, y = torch.broadcast_tensors(x, y)
        return l2norm(self.proj(F.mse_loss(x, y, reduction="none")), fresh=True)


class FilteredReadout(nn.Module):
    """Attention-filtered pooling of a set of nodes into one score (SAF's readout, masked).

    alpha = sigmoid(w^T n) normalised to sum one over valid nodes, score = sigmoid(w'^T l2norm(sum
    alpha n)). Returns (score [P], alpha [P, n]).
    """

    def __init__(self, sim_dim: int):
        super().__init__()
        self.gate = nn.Linear(sim_dim, 1)
        self.score = nn.Linear(sim_dim, 1)

    def forward(self, nodes: torch.Tensor, mask: torch.Tensor):
        alpha = torch.sigmoid(self.gate(nodes).squeeze(-1)) * mask
        alpha = alpha / alpha.sum(-1, keepdim=True).clamp(min=1e-8)
        pooled = l2norm(torch.bmm(alpha.unsqueeze(1), nodes).squeeze(1), fresh=True)
        return torch.sigmoid(self.score(pooled).squeeze(-1)), alpha


class HierarchicalReasoning(nn.Module):
    """Message passing over the local, context and global nodes of one stream.

    Bottom-up: each context node gathers its local nodes with weights that combine the
    context unit's membership (how much each query unit belongs to it) with a data-dependent
    gate on the local node; the global node gathers the context nodes (or the local nodes
    directly when there is no context level). Top-down: context nodes read the global node, and
    each local node receives its context parents' messages, gated by itself. Every update is a
    residual followed by L2 normalisation, so nodes stay similarity vectors on the unit sphere.
    Only O(nodes x m) work touches the many local nodes; m x m projections run on the few
    context and global nodes, which keeps the reasoning cheap next to building the nodes.

    ``skip`` (with context) adds the direct edges of the graph without context: the global node
    also gathers the local nodes, and each local node also receives the global node, so the
    context level is a second path between local and global rather than the only one.

    ``cut_context`` (a diagnosis switch, not a parameter: off in training and in every saved
    model) knocks the context level out of the graph: the context nodes are still built and
    scored, but the global node no longer gathers them and the local nodes no longer receive
    their messages, so only the skip edges (if any) link local and global. It measures how much
    the other levels *use* the context level (:func:`tshsr.analysis.context_cut`).
    """

    def __init__(self, sim_dim: int, steps: int, with_context: bool, skip: bool = False, gate: bool = False,
                 relations: bool = False):
        super().__init__()
        self.steps = steps
        self.with_context = with_context
        self.skip = skip and with_context
        self.cut_context = False
        m = sim_dim
        self.local_gate = nn.Linear(m, 1)
        self.up_global = nn.Linear(m, m)
        self.down_local = nn.Linear(2 * m if with_context else m, m)
        self.down_gate = nn.Linear(m, 1)
        if with_context:
            self.up_context = nn.Linear(m, m)
            self.context_gate = nn.Linear(m, 1)
            self.down_context = nn.Linear(2 * m, m)
        if self.skip:
            self.skip_up = nn.Linear(m, m)  # local nodes -> global node
            self.skip_down = nn.Linear(m, m)  # global node -> local nodes
        # ``gate`` (with skip): one learned scale, zero at first, on the context level's messages to
        # the global and local nodes (ReZero): the graph starts as the one without the context level.
        self.context_scale = nn.Parameter(torch.zeros(())) if gate and self.skip else None
        # ``relations``: after gathering their local nodes, the context nodes reason over each other
        # (SGR's relation step, residual): a phrase's alignment is read in the light of the others'.
        self.context_relations = GraphReasoningStep(m) if relations and with_context else None

    def _gated(self, context_term: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """A context-path term scaled by the gate (unchanged without one), zeroed for the pairs
        whose ``keep`` is 0."""
        if self.context_scale is not None:
            context_term = self.context_scale * context_term
        return context_term if keep is None else context_term * keep.view(-1, *[1] * (context_term.dim() - 1))

    def forward(self, local, local_mask, context, membership, global_node, cut: torch.Tensor | None = None):
        """local [P, n, m], local_mask [P, n], context [P, C, m] or None, membership [P, C, n]
        (rows sum to one over the query units) or None, global_node [P, m]. ``cut`` [P] bool: per
        pair, whether its context path is cut (None: ``cut_context`` decides for every pair)."""
        eps = 1e-6
        # Both gates read the same local nodes: one product gives both (one pass over the nodes).
        gate_w = torch.cat([self.local_gate.weight, self.down_gate.weight])
        gate_b = torch.cat([self.local_gate.bias, self.down_gate.bias])
        mask = local_mask.unsqueeze(-1).to(local.dtype)
        keep = None if cut is None or not self.with_context else (~cut).to(local.dtype)
        cut_all = self.with_context and self.cut_context
        if self.with_context:  # step-invariant parts of the edges
            if self.context_relations is not None:  # every context node relates to every other
                every = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
            log_membership = torch.log(membership + eps)
            share_t = (membership / membership.sum(1, keepdim=True).clamp(min=eps)).transpose(1, 2)  # over parents
        for _ in range(self.steps):
            gates = F.linear(local, gate_w, gate_b)  # [P, n, 2]
            local_logit, down_logit = gates[..., 0], gates[..., 1:]
            # ---- bottom-up ----
            if self.with_context:
                edge = masked_softmax(log_membership + local_logit.unsqueeze(1), local_mask.unsqueeze(1), dim=2)
                context = l2norm(context + relu(self.up_context(torch.bmm(edge, local))), fresh=True)
                if self.context_relations is not None:
                    context = l2norm(context + self.context_relations(context, every), fresh=True)
                up_edge = torch.softmax(self.context_gate(context).squeeze(-1), dim=1)
                gathered = torch.bmm(up_edge.unsqueeze(1), context).squeeze(1)
            else:
                up_edge = masked_softmax(local_logit, local_mask, dim=1)
                gathered = torch.bmm(up_edge.unsqueeze(1), local).squeeze(1)
            update = torch.zeros_like(global_node) if cut_all else self._gated(relu(self.up_global(gathered)), keep)
            if self.skip:
                local_edge = masked_softmax(local_logit, local_mask, dim=1)
                update = update + relu(self.skip_up(torch.bmm(local_edge.unsqueeze(1), local).squeeze(1)))
            global_node = l2norm(global_node + update, fresh=True)
            # ---- top-down ----
            if self.with_context:
                g = global_node.unsqueeze(1).expand_as(context)
                context = l2norm(context + relu(self.down_context(torch.cat([context, g], -1))), fresh=True)
                message = relu(self.down_local(torch.cat([context, g], -1)))  # [P, C, m]
                received = torch.zeros_like(local) if cut_all else self._gated(torch.bmm(share_t, message), keep)  # [P, n, m]
                if self.skip:
                    received = received + relu(self.skip_down(global_node)).unsqueeze(1)
            else:
                received = relu(self.down_local(global_node)).unsqueeze(1)
            local = torch.addcmul(local, torch.sigmoid(down_logit), received)
            local = l2norm(local, fresh=True)
            local = local.mul_(mask) if not torch.is_grad_enabled() else local * mask
        return local, context, global_node


def _twin(tensors: tuple, align: dict) -> tuple[tuple, dict, torch.Tensor]:
    """Every pair twice (the pair axis doubled, None kept) and the per-pair cut: off for the first
    copy, on for the second (``StreamHead.twin_cut``)."""
    def twice(t):
        return None if t is None else torch.cat([t, t])
    doubled = tuple(map(twice, tensors))
    n = len(doubled[0])
    return doubled, {lv: twice(v) for lv, v in align.items()}, torch.arange(n, device=doubled[0].device) >= n // 2


class StreamHead(nn.Module):
    """One stream of TSHSR: the query side's units attend over the key side's units.

    i2t: queries are image regions, keys are words. t2i: queries are words, keys are regions.
    Produces one score per level in [0, 1] (or [-1, 1] blended with the cosine at the global level).
    """

    def __init__(self, config, stream: str):
        super().__init__()
        D, m = config.embed_dim, config.sim_dim
        self.stream = stream
        self.levels = tuple(config.levels)
        self.smooth = config.attention_smooth
        self.global_cosine = config.global_cosine
        self.local_nodes = SimilarityNodes(D, m)
        self.global_nodes = SimilarityNodes(D, m)
        self.local_readout = FilteredReadout(m)
        self.global_readout = nn.Linear(m, 1)
        if "context" in self.levels:
            self.context_nodes = SimilarityNodes(D, m)
            self.context_readout = FilteredReadout(m)
        self.reasoning = HierarchicalReasoning(m, config.reasoning_steps, "context" in self.levels,
                                               skip=config.context_skip, gate=config.context_gate,
                                               relations=config.context_relations)
        # Starts leaning on the cosine of the contrastive global vectors: it learns fastest.
        self.cosine_mix = nn.Parameter(torch.tensor(2.0)) if self.global_cosine else None
        self.readout_mean = config.readout_mean  # every level's score: mean of its readouts before and after reasoning
        self.detach_context_units = False  # set through HeadKind.set_context_detach (training only)
        # (training only, tshsr.analysis.context_twin) every pair is reasoned twice on the same nodes,
        # the second copy with the context path cut: pair outputs are [2P], full then cut.
        self.twin_cut = False
        if config.level_fusion == "learned":
            self.level_logits = nn.Parameter(torch.zeros(len(self.levels)))
        own = config.stream_level_weights(stream)  # () without fixed weights
        self.fixed_level_weights = tuple(w / sum(own) for w in own) if own else None
        # The local and context levels also carry SCAN's alignment score (the mean cosine of each
        # query unit with what it attends to), as the global level carries the global cosine.
        self.aligned_levels = tuple(lv for lv in self.levels if lv != "global") if config.level_cosine else ()
        if self.aligned_levels:
            self.alignment_mix = nn.Parameter(torch.full((len(self.aligned_levels),), 2.0))
        if config.word_salience:
            # A learned salience logit per word, w . unit, zero at first (no change, and no random
            # draw: every other layer starts as without it); no bias, a softmax over words drops it.
            # In i2t it is a prior on which words a region attends to, in t2i the weight of each
            # word's alignment.
            self.word_salience = nn.Parameter(torch.zeros(D))

    def _salience(self, q: dict, k: dict, keys: torch.Tensor | None = None):
        """(key_bias, query_weights) of the word salience for this stream's attention, each None
        where it does not apply: i2t biases the logits of the keys (words; ``keys`` when the
        level attends over other key vectors, e.g. detached ones), t2i weights the mean alignment
        over the query words (a softmax over each caption's words). Per item or per pair, as q/k."""
        if not hasattr(self, "word_salience") or (self.stream == "t2i" and keys is not None):
            return None, None  # (t2i's keys are regions)
        if self.stream == "i2t":
            return (k["units"] if keys is None else keys) @ self.word_salience, None
        return None, masked_softmax(q["units"] @ self.word_salience, q["mask"], dim=-1)

    def _context_input(self, q: dict, k: dict) -> tuple[dict, torch.Tensor]:
        """(q, the key units the context level attends over). When the model trains with
        ``detach_context_units``, q's context units are rebuilt from detached unit vectors and the
        keys are detached: same values, no gradient from the context level into any unit vector."""
        if self.detach_context_units and torch.is_grad_enabled() and q.get("membership") is not None:
            # (context units of their own, image_context_stage, are no unit vectors: they keep their gradient)
            source = q["context_source"] if "context_source" in q else q["units"].detach()
            return {**q, "context": context_units(source, q["membership"])}, k["units"].detach()
        return q, k["units"]

    def level_weights(self) -> torch.Tensor:
        if hasattr(self, "level_logits"):
            return torch.softmax(self.level_logits, 0)
        # Fixed weights: the loss cannot turn a level down, it has to make it useful.
        if self.fixed_level_weights is not None:
            return self.local_readout.score.weight.new_tensor(self.fixed_level_weights)
        return self.local_readout.score.weight.new_full((len(self.levels),), 1.0 / len(self.levels))

    def forward(self, q, k, cosine, want_maps: bool = False, grid: tuple[int, int] | None = None):
        """q, k: dicts (units, mask, pooled, context, membership) of the query and key sides.

        Pair mode (``grid=None``): tensors have a leading pair axis P. Grid mode
        (``grid=(n_images, n_texts)``): tensors hold per-item values and every image is paired
        with every text, image-major (P = n_images x n_texts). Returns ({level: score [P]}, maps).
        """
        maps = {}
        q, ctx_keys = self._context_input(q, k)
        ctx_mask = None if q.get("context") is None else torch.ones_like(q["context"][..., 0], dtype=torch.bool)
        key_bias, query_weights = self._salience(q, k)
        ctx_bias = self._salience(q, k, ctx_keys)[0]
        if grid is None:
            attended, weights = cross_attention(q["units"], q["mask"], k["units"], k["mask"], self.smooth,
                                                key_bias=key_bias)
            local = self.local_nodes(attended, q["units"])
            query_mask = q["mask"]
            align = {"local": mean_alignment(attended, q["units"], query_mask, query_weights)
                     } if self.aligned_levels else {}
            glob = self.global_nodes(k["pooled"], q["pooled"])
            membership = q.get("membership")
            if "context" in self.levels:
                ctx_attended, ctx_weights = cross_attention(q["context"], ctx_mask, ctx_keys, k["mask"], self.smooth,
                                                            key_bias=ctx_bias)
                context = self.context_nodes(ctx_attended, q["context"])
                if self.aligned_levels:
                    align["context"] = mean_alignment(ctx_attended, q["context"], ctx_mask)
        else:
            images_first = self.stream == "i2t"
            n_pairs = grid[0] * grid[1]

            def per_pair(t):  # a per-item query-side tensor, broadcast to [n_images, n_texts, ...]
                t = t.unsqueeze(1) if images_first else t.unsqueeze(0)
                return t.expand(grid[0], grid[1], *t.shape[2:])

            def key_side(t):
                return t.unsqueeze(0) if images_first else t.unsqueeze(1)

            attended, weights = cross_attention_grid(q["units"], q["mask"], k["units"], k["mask"], self.smooth,
                                                     images_first, key_bias)
            local = self.local_nodes(attended, per_pair(q["units"])).reshape(n_pairs, *attended.shape[2:3], -1)
            weights = weights.reshape(n_pairs, *weights.shape[2:])
            query_mask = per_pair(q["mask"]).reshape(n_pairs, -1)
            align = {"local": mean_alignment(attended, per_pair(q["units"]), per_pair(q["mask"]),
                                             None if query_weights is None else per_pair(query_weights)).reshape(-1)
                     } if self.aligned_levels else {}
            glob = self.global_nodes(key_side(k["pooled"]), per_pair(q["pooled"])).reshape(n_pairs, -1)
            membership = None if q.get("membership") is None else per_pair(q["membership"]).reshape(
                n_pairs, *q["membership"].shape[1:])
            if "context" in self.levels:
                ctx_attended, ctx_weights = cross_attention_grid(q["context"], ctx_mask, ctx_keys, k["mask"],
                                                                 self.smooth, images_first, ctx_bias)
                context = self.context_nodes(ctx_attended, per_pair(q["context"]))
                context = context.reshape(n_pairs, *context.shape[2:])
                ctx_weights = ctx_weights.reshape(n_pairs, *ctx_weights.shape[2:])
                if self.aligned_levels:
                    align["context"] = mean_alignment(ctx_attended, per_pair(q["context"]),
                                                      per_pair(ctx_mask)).reshape(-1)
        local = local * query_mask.unsqueeze(-1)
        if "context" not in self.levels:
            context = membership = None
        elif want_maps:
            maps["context_attention"] = ctx_weights
            maps["context_membership"] = membership
        scores, alpha = self._reason_and_read(local, query_mask, context, membership, glob, cosine, align)
        if want_maps:
            maps["attention"] = weights
            maps["local_weights"] = alpha
            if self.aligned_levels:  # each query unit's cosine with what it attended to (the local alignment)
                units = q["units"] if grid is None else per_pair(q["units"])
                cosines = unit_alignment(attended, units, query_mask.view(units.shape[:-1]))
                maps["unit_alignment"] = cosines.reshape(query_mask.shape)
        return {lv: scores[lv] for lv in self.levels}, maps

    def _reason_and_read(self, local, query_mask, context, membership, glob, cosine, align):
        """({level: score [P]}, the local readout's weights): the nodes reasoned, then read out."""
        cut = None
        if self.twin_cut and context is not None:
            (local, query_mask, context, membership, glob, cosine), align, cut = _twin(
                (local, query_mask, context, membership, glob, cosine), align)
        # (readout_mean) the readout at depth 0, from the nodes as built; none when the graph runs no step
        before = self._level_scores(local, query_mask, context, glob, cosine, align)[0] if (
            self.readout_mean and self.reasoning.steps) else None
        local, context, glob = self.reasoning(local, query_mask, context, membership, glob, cut)
        scores, alpha = self._level_scores(local, query_mask, context, glob, cosine, align)
        if before is not None:
            scores = {lv: (before[lv] + scores[lv]) / 2 for lv in scores}
        return scores, alpha

    def _level_scores(self, local, query_mask, context, glob, cosine, align):
        """Each level's score from its reasoned nodes, blended with its cosine where it has one."""
        scores = {}
        scores["local"], alpha = self.local_readout(local, query_mask)
        if "context" in self.levels:
            ones = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
            scores["context"], _ = self.context_readout(context, ones)
        for j, level in enumerate(self.aligned_levels):
            mix = torch.sigmoid(self.alignment_mix[j])
            scores[level] = mix * align[level] + (1 - mix) * scores[level]
        node_score = torch.sigmoid(self.global_readout(glob).squeeze(-1))
        if self.global_cosine:
            mix = torch.sigmoid(self.cosine_mix)
            scores["global"] = mix * cosine + (1 - mix) * node_score
        else:
            scores["global"] = node_score
        return scores, alpha

    def alignment_pairs(self, q, k) -> dict[str, torch.Tensor]:
        """The alignment score of every level that has one, for pairs (leading pair axis P):
        {level: [P]}, the values the pair path of :meth:`forward` blends into the level scores."""
        q, ctx_keys = self._context_input(q, k)
        key_bias, query_weights = self._salience(q, k)
        out = {}
        if "local" in self.aligned_levels:
            attended, _ = cross_attention(q["units"], q["mask"], k["units"], k["mask"], self.smooth, key_bias=key_bias)
            out["local"] = mean_alignment(attended, q["units"], q["mask"], query_weights)
        if "context" in self.aligned_levels:
            ctx_mask = torch.ones_like(q["context"][..., 0], dtype=torch.bool)
            attended, _ = cross_attention(q["context"], ctx_mask, ctx_keys, k["mask"], self.smooth,
                                          key_bias=self._salience(q, k, ctx_keys)[0])
            out["context"] = mean_alignment(attended, q["context"], ctx_mask)
        return out

    def alignment_grid(self, q, k, levels: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """The alignment score of every level that has one (of ``levels`` only, when given), for
        every (image, text) combination of the given items: {level: [n_images, n_texts]} (the
        training batch's contrastive term)."""
        images_first = self.stream == "i2t"
        wanted = [lv for lv in self.aligned_levels if levels is None or lv in levels]
        q, ctx_keys = self._context_input(q, k)
        out = {}
        if "local" in wanted:
            key_bias, query_weights = self._salience(q, k)
            out["local"] = attended_cosine_grid(q["units"], q["mask"], k["units"], k["mask"], self.smooth,
                                                images_first, key_bias, query_weights)
        if "context" in wanted:
            ctx_mask = torch.ones_like(q["context"][..., 0], dtype=torch.bool)
            out["context"] = attended_cosine_grid(q["context"], ctx_mask, ctx_keys, k["mask"], self.smooth,
                                                  images_first, self._salience(q, k, ctx_keys)[0])
        return out
