"""SGRAF's similarity heads (Diao et al., AAAI 2021): SGR (graph reasoning) and SAF (attention
filtration), text-to-image only, on the nodes [s_g, s_1 .. s_L]. The baselines TSHSR extends;
built by :mod:`tshsr.registry` for the ``sgr`` and ``saf`` presets."""

from __future__ import annotations

import torch
from torch import nn

from .attention import GraphReasoningStep, cross_attention, cross_attention_grid, l2norm
from .heads import SimilarityNodes


class SGRAFHead(nn.Module):
    """SGRAF's SGR (``graph_reasoning``) or SAF model (text-to-image only), on nodes [s_g, s_1 .. s_L]."""

    def __init__(self, config, graph_reasoning: bool):
        super().__init__()
        D, m = config.embed_dim, config.sim_dim
        self.graph_reasoning = graph_reasoning
        self.smooth = config.attention_smooth
        self.local_nodes = SimilarityNodes(D, m)
        self.global_nodes = SimilarityNodes(D, m)
        self.readout = nn.Linear(m, 1)
        if graph_reasoning:
            self.steps = nn.ModuleList(GraphReasoningStep(m) for _ in range(config.reasoning_steps))
        else:
            self.filter = nn.Linear(m, 1)
            self.filter_norm = nn.BatchNorm1d(1)

    def nodes(self, text, image, grid: tuple[int, int] | None = None):
        if grid is None:
            attended, weights = cross_attention(text["units"], text["mask"], image["units"], image["mask"],
                                                self.smooth)
            local = self.local_nodes(attended, text["units"])
            glob = self.global_nodes(image["pooled"], text["pooled"])
            text_mask = text["mask"]
        else:  # every image with every text, image-major
            n_pairs = grid[0] * grid[1]
            attended, weights = cross_attention_grid(text["units"], text["mask"], image["units"], image["mask"],
                                                     self.smooth, queries_are_images=False)
            local = self.local_nodes(attended, text["units"].unsqueeze(0)).reshape(n_pairs, attended.shape[2], -1)
            weights = weights.reshape(n_pairs, *weights.shape[2:])
            glob = self.global_nodes(image["pooled"].unsqueeze(1), text["pooled"].unsqueeze(0)).reshape(n_pairs, -1)
            text_mask = text["mask"].unsqueeze(0).expand(grid[0], -1, -1).reshape(n_pairs, -1)
        nodes = torch.cat([glob.unsqueeze(1), local], 1)
        mask = torch.cat([torch.ones_like(text_mask[:, :1]), text_mask], 1)
        return nodes * mask.unsqueeze(-1), mask, weights

    def forward(self, text, image, want_maps: bool = False, grid: tuple[int, int] | None = None):
        nodes, mask, weights = self.nodes(text, image, grid)
        maps = {"attention": weights} if want_maps else {}
        if self.graph_reasoning:
            for step in self.steps:
                nodes = step(nodes, mask)
            return torch.sigmoid(self.readout(nodes[:, 0]).squeeze(-1)), maps
        logits = self.filter(nodes).squeeze(-1)  # [P, 1 + L]
        # BatchNorm over the valid nodes only, so padding never shifts the statistics.
        normed = torch.zeros_like(logits)
        normed[mask] = self.filter_norm(logits[mask].unsqueeze(1)).squeeze(1)
        alpha = torch.sigmoid(normed) * mask
        alpha = alpha / alpha.sum(-1, keepdim=True).clamp(min=1e-8)
        pooled = l2norm(torch.bmm(alpha.unsqueeze(1), nodes).squeeze(1))
        if want_maps:
            maps["local_weights"] = alpha[:, 1:]
        return torch.sigmoid(self.readout(pooled).squeeze(-1)), maps
