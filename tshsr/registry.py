"""Similarity head kinds, registered by name (``config.head``), as timm registers models.

A head kind knows everything that depends on the head: which contribution keys it reports,
whether the encodings carry context units, which configurations it accepts, which modules it
adds to the model (under the attribute names checkpoints store) and how it scores a batch of
pairs. Adding a head is one decorated class here; nothing else compares head names.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .encoding import stream_view
from .heads import StreamHead
from .sgraf import SGRAFHead

_HEADS: dict[str, type["HeadKind"]] = {}
NO_SALIENCE = "word_salience is a part of the TSHSR streams' attention; the sgr, saf and dual heads have none"
NO_READOUT_MEAN = ("readout_mean averages each level's readouts before and after TSHSR's hierarchical reasoning; "
                   "the sgr, saf and dual heads have none")


def register_head(name: str):
    """Class decorator: make a :class:`HeadKind` available as ``TSHSRConfig(head=name)``."""

    def register(cls: type[HeadKind]) -> type[HeadKind]:
        if name in _HEADS:
            raise ValueError(f"Head {name!r} is already registered by {_HEADS[name].__name__}")
        cls.name = name
        _HEADS[name] = cls
        return cls

    return register


def head_names() -> tuple[str, ...]:
    return tuple(_HEADS)


def get_head(name: str) -> "HeadKind":
    """The head kind registered as ``name``."""
    try:
        return _HEADS[name]()
    except KeyError:
        raise ValueError(f"head={name!r}; expected one of {head_names()} (tshsr.registry)") from None


# The parts of one scoring pass: contributions, level scores, stream scores, attention maps.
HeadParts = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]


class HeadKind:
    """What one head does; subclasses are stateless (the modules live on the model)."""

    name: ClassVar[str] = ""
    cross_attention: ClassVar[bool] = True  # False: scores are the global cosine alone

    def validate(self, config) -> str | None:
        """A reason ``config`` cannot use this head, or None."""
        return NO_READOUT_MEAN if config.readout_mean else None

    def contribution_keys(self, config) -> list[str]:
        return [f"{s}/{lv}" for s in config.streams for lv in config.levels]

    def has_context(self, config) -> bool:
        """Whether encodings carry context units (membership over learned context queries)."""
        return False

    def score_streams(self, config) -> tuple[str, ...]:
        """The streams whose cross-attention a scoring block computes (sizes the blocks)."""
        return ()

    def build(self, model: nn.Module, config) -> None:
        """Add this head's modules to ``model``."""

    def run(self, model, img: dict, txt: dict, cosine: torch.Tensor, want_maps: bool,
            grid: tuple[int, int] | None) -> HeadParts:
        raise NotImplementedError

    def mixing_weights(self, model) -> dict[str, torch.Tensor]:
        """The weight of each contribution (its score = weight x level score)."""
        return {k: torch.tensor(1.0) for k in self.contribution_keys(model.config)}

    def set_context_detach(self, model, value: bool) -> None:
        """Training only (``train.py --context-detach``): the context level reads the unit vectors
        (its membership, its units and the keys it attends over) without gradient, so it trains its
        own queries and nodes but never pulls on the units the local level aligns. Scores are
        unchanged; the flag is not saved with the model."""
        model._detach_context_units = bool(value)

    def alignment_scores(self, model, img: dict, txt: dict, pairs: bool = False,
                         levels: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """{"<stream>/<level>": [n_images, n_texts]} alignment scores of every combination of the
        given items, for the levels that carry one ({} for heads without); ``pairs=True``: of the
        pairs (img[p], txt[p]), [P] each. ``levels``: only these levels (combinations only)."""
        return {}


def stream_inputs(model, stream: str, img: dict, txt: dict, cosine: torch.Tensor | None = None,
                  grid: tuple[int, int] | None = None):
    """(query side, key side, global cosine) of one stream. With ``separate_streams`` each
    stream reads its own tower's half of the encodings and its own towers' cosine (the
    ``cosine`` given, the shortlist's, is then the mean of the two)."""
    if model.config.separate_streams:
        tower = 0 if stream == "i2t" else 1  # the model's own layers are i2t's, t2i_towers t2i's
        img, txt = stream_view(img, tower), stream_view(txt, tower)
        if cosine is not None:
            cosine = ((img["embedding"] * txt["embedding"]).sum(-1) if grid is None
                      else (img["embedding"] @ txt["embedding"].T).reshape(-1))
    return (img, txt, cosine) if stream == "i2t" else (txt, img, cosine)


@register_head("tshsr")
class TwoStreamHierarchicalHead(HeadKind):
    """TSHSR: per stream (i2t, t2i) local/context/global nodes and hierarchical reasoning; the
    level scores are mixed per stream, the streams mixed with each other."""

    def validate(self, config) -> str | None:
        if config.readout_mean and config.reasoning_steps == 0:
            return "readout_mean averages the readouts before and after the reasoning steps; reasoning_steps is 0"
        return None

    def has_context(self, config) -> bool:
        return "context" in config.levels

    def score_streams(self, config) -> tuple[str, ...]:
        return tuple(config.streams)

    def build(self, model, config) -> None:
        model.streams = nn.ModuleDict({s: StreamHead(config, s) for s in config.streams})
        if config.stream_fusion == "learned" and len(config.streams) > 1:
            model.stream_logits = nn.Parameter(torch.zeros(len(config.streams)))

    def stream_weights(self, model) -> dict[str, torch.Tensor]:
        streams = model.config.streams
        if hasattr(model, "stream_logits"):
            w = torch.softmax(model.stream_logits, 0)
            return {s: w[i] for i, s in enumerate(streams)}
        # Fixed weights: the loss cannot turn a stream down, it has to make it useful.
        return {s: torch.tensor(1.0 / len(streams), device=model.device) for s in streams}

    def run(self, model, img, txt, cosine, want_maps, grid) -> HeadParts:
        contributions, level_scores, stream_scores, maps = {}, {}, {}, {}
        fusion = self.stream_weights(model)
        for stream, head in model.streams.items():
            q, k, stream_cosine = stream_inputs(model, stream, img, txt, cosine, grid)
            levels, maps[stream] = head(q, k, stream_cosine, want_maps=want_maps, grid=grid)
            level_w = head.level_weights()
            total = 0
            for j, (level, value) in enumerate(levels.items()):
                key = f"{stream}/{level}"
                contributions[key] = fusion[stream] * level_w[j] * value
                level_scores[key] = value
                total = total + level_w[j] * value
            stream_scores[stream] = total
        return contributions, level_scores, stream_scores, maps

    def alignment_scores(self, model, img, txt, pairs: bool = False, levels=None) -> dict[str, torch.Tensor]:
        out = {}
        for stream, head in model.streams.items():
            q, k, _ = stream_inputs(model, stream, img, txt)
            values = head.alignment_pairs(q, k) if pairs else head.alignment_grid(q, k, levels)
            out.update({f"{stream}/{level}": v for level, v in values.items()})
        return out

    def set_context_detach(self, model, value: bool) -> None:
        super().set_context_detach(model, value)
        for head in model.streams.values():
            head.detach_context_units = bool(value)

    def mixing_weights(self, model) -> dict[str, torch.Tensor]:
        fusion = self.stream_weights(model)
        return {f"{stream}/{level}": fusion[stream] * head.level_weights()[j]
                for stream, head in model.streams.items() for j, level in enumerate(head.levels)}


class _SGRAFKind(HeadKind):
    """SGRAF's text-to-image models: one score from the reasoned (SGR) or filtered (SAF) nodes."""

    key: ClassVar[str] = ""

    def validate(self, config) -> str | None:
        if config.streams != ("t2i",):
            return "SGRAF heads (sgr, saf) have the text-to-image stream only: streams=('t2i',)"
        return NO_SALIENCE if config.word_salience else super().validate(config)

    def contribution_keys(self, config) -> list[str]:
        return [self.key]

    def score_streams(self, config) -> tuple[str, ...]:
        return ("t2i",)

    graph_reasoning: ClassVar[bool] = False

    def build(self, model, config) -> None:
        model.sgraf = SGRAFHead(config, graph_reasoning=self.graph_reasoning)

    def run(self, model, img, txt, cosine, want_maps, grid) -> HeadParts:
        score, stream_maps = model.sgraf(txt, img, want_maps=want_maps, grid=grid)
        return {self.key: score}, {self.key: score}, {"t2i": score}, {"t2i": stream_maps}


@register_head("sgr")
class SGRHead(_SGRAFKind):
    graph_reasoning = True
    key = "t2i/global"  # SGR reads its score from the reasoned global node


@register_head("saf")
class SAFHead(_SGRAFKind):
    key = "t2i/local"  # SAF filters the local (and global) nodes into one score


@register_head("dual")
class DualEncoderHead(HeadKind):
    """The dual encoder: the cosine of the contrastive global vectors, no cross-attention."""

    cross_attention = False

    def validate(self, config) -> str | None:
        if config.word_salience:
            return NO_SALIENCE
        if config.levels != ("global",):
            return "the dual-encoder head has the global level only"
        return super().validate(config)

    def contribution_keys(self, config) -> list[str]:
        return ["dual/global"]

    def run(self, model, img, txt, cosine, want_maps, grid) -> HeadParts:
        return {"dual/global": cosine}, {"dual/global": cosine}, {"dual": cosine}, {}
