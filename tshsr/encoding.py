"""Encodings of one side (images or captions), computed once and reused for every pair.

An :class:`Encoding` holds the per-item tensors the similarity heads read; the image and text
towers fill it independently, so a gallery is encoded once and scored against many queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from .attention import context_units, l2norm, masked_softmax
from .io import release_free_memory


@dataclass
class Encoding:
    """Per-item tensors of one modality, computed once and reused for every pair.

    units [N, n, D] L2-normalised region/word vectors, mask [N, n] valid units, pooled [N, D]
    attention-pooled vector (for global similarity nodes), embedding [N, D] contrastive global
    vector (cosine shortlist) and, when the model has a context level, membership [N, C, n] (how
    much each unit belongs to each of the C learned context units; rows sum to one). The context
    units themselves, :attr:`context`, are derived from these on use instead of stored: they are
    cheap to recompute per block and would add C x D floats per item (0.5 GB for a COCO 5K split).
    ``context_source`` [N, n, D] (images of a model with ``image_context_stage``, captions of one
    with ``text_context_layer``): the unit vectors the context units pool instead of ``units``,
    projected from an earlier backbone stage or text encoder layer.
    """

    units: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    embedding: torch.Tensor
    membership: torch.Tensor | None = None
    context_source: torch.Tensor | None = None

    @property
    def context(self) -> torch.Tensor | None:
        """[N, C, D] context units: l2norm(membership @ units), or None without a context level."""
        if self.membership is None:
            return None
        return context_units(self.units if self.context_source is None else self.context_source, self.membership)

    def __len__(self) -> int:
        return int(self.units.shape[0])

    def __getitem__(self, index) -> "Encoding":
        if isinstance(index, int):
            index = [index]
        if isinstance(index, (list, tuple, np.ndarray)):
            index = torch.as_tensor(index, dtype=torch.long, device=self.units.device)
        return type(self)(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index])
                             for f in fields(self)})

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Encoding":
        """Move to a device; ``dtype`` applies to the float tensors only (masks stay boolean)."""

        def move(t):
            if t is None:
                return None
            return t.to(device=device, dtype=None if t.dtype == torch.bool else dtype)

        return type(self)(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    @property
    def device(self) -> torch.device:
        return self.units.device

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).contiguous() for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "Encoding":
        missing = {"units", "mask", "pooled", "embedding"} - set(state)
        if missing:
            raise ValueError(f"Encoding state is missing {sorted(missing)}")
        return cls(**{k: state.get(k) for k in (f.name for f in fields(cls))})

    @classmethod
    def cat(cls, parts: list["Encoding"], consume: bool = False) -> "Encoding":
        """Concatenate encodings, padding the unit axis to the longest (texts vary in length).

        The result is allocated once and each part copied into it. With ``consume`` the list's
        entries are dropped as they are copied (and the freed memory handed back to the OS every
        few hundred MB), so joining a large split needs about the result's memory, not twice it."""
        if not parts:
            raise ValueError("Nothing to concatenate")
        if consume and len(parts) == 1:  # nothing to join: hand the part over instead of copying it
            part, parts[0] = parts[0], None
            return part
        width = max(p.units.shape[1] for p in parts)
        total = sum(len(p) for p in parts)
        out: dict[str, torch.Tensor | None] = {}
        for f in fields(cls):
            value = getattr(parts[0], f.name)
            if value is None:
                out[f.name] = None
                continue
            shape = [total, *value.shape[1:]]
            if f.name in ("units", "mask", "context_source"):
                shape[1] = width
            elif f.name == "membership":
                shape[2] = width
            out[f.name] = value.new_empty(shape)  # pages become resident as parts are copied in
        row, freed = 0, 0
        for i in range(len(parts)):
            part, n = parts[i], len(parts[i])
            for name, target in out.items():
                if target is None:
                    continue
                value, rows = getattr(part, name), slice(row, row + n)
                if name in ("units", "mask", "context_source"):
                    target[rows, :value.shape[1]] = value
                    target[rows, value.shape[1]:] = 0  # padding: zero vectors, False mask
                elif name == "membership":
                    target[rows, :, :value.shape[2]] = value
                    target[rows, :, value.shape[2]:] = 0
                else:
                    target[rows] = value
                freed += value.numel() * value.element_size()
            row += n
            if consume:
                parts[i] = None
                if freed > 256 * 2**20:
                    release_free_memory()
                    freed = 0
        return cls(**out)


class ImageEncoding(Encoding):
    """Encoding of images (units are regions)."""


class TextEncoding(Encoding):
    """Encoding of captions (units are words)."""


def _with_context(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the heads read: the stored fields plus the derived context units."""
    if "membership" in values:
        values["context"] = context_units(values.get("context_source", values["units"]), values["membership"])
    return values


def head_inputs(encoding: Encoding, index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The fields of ``encoding`` (rows ``index`` when given) as the dict the heads read."""
    return _with_context({f.name: value if index is None else value[index] for f in fields(encoding)
                          if (value := getattr(encoding, f.name)) is not None})


def window_membership(mask: torch.Tensor, n_units: int, layout: str) -> torch.Tensor:
    """[N, C, n] fixed context membership of ``n_units`` overlapping windows (each row sums to 1
    over the valid units of ``mask`` [N, n]). ``layout`` "sequence": phrase windows, Gaussian in
    the relative position along each caption's own length (unit c centred at (c + 0.5) / C, width
    0.5 / C); "grid": neighbourhoods of a square grid of regions (row-major, as the timm encoder
    flattens it), a sqrt(C) x sqrt(C) layout of Gaussians of the same relative width."""
    mask = mask.bool()
    n = mask.shape[1]
    device = mask.device
    if layout == "sequence":
        # A caption's length is the span to its last valid token: the same as the count for a
        # padded caption, and units hidden in training (--unit-dropout) do not move the windows.
        span = torch.arange(1, n + 1, device=device) * mask
        length = span.amax(1, keepdim=True).clamp_min(1).float()  # [N, 1]
        where = (torch.arange(n, device=device).float() + 0.5) / length  # [N, n]
        centres = (torch.arange(n_units, device=device).float() + 0.5) / n_units  # [C]
        d2 = (where.unsqueeze(1) - centres.view(1, -1, 1)) ** 2  # [N, C, n]
        width = 0.5 / n_units
    else:
        side, g = math.isqrt(n), math.isqrt(n_units)
        if side * side != n or g * g != n_units:
            raise ValueError(f"context_pooling='windows' needs a square grid of regions (a timm backbone's feature "
                             f"map) and a square number of image context units; got {n} regions and {n_units} "
                             f"units (detector regions have no layout: use context_pooling='learned')")
        cells = (torch.arange(side, device=device).float() + 0.5) / side
        ys, xs = cells.repeat_interleave(side), cells.repeat(side)  # row-major
        centre = (torch.arange(g, device=device).float() + 0.5) / g
        cy, cx = centre.repeat_interleave(g), centre.repeat(g)
        d2 = ((ys.view(1, -1) - cy.view(-1, 1)) ** 2 + (xs.view(1, -1) - cx.view(-1, 1)) ** 2).unsqueeze(0)
        width = 0.5 / g
    logits = (-d2 / (2 * width ** 2)).expand(mask.shape[0], n_units, n)
    return masked_softmax(logits, mask.unsqueeze(1), dim=2)


def encode_side(feats, mask, proj, pool, embed, context_queries, cls, detach_context: bool = False):
    """One side's trainable encoding of backbone features [N, n, F] (mask [N, n]) into ``cls``:
    projected, L2-normalised units, an attention-pooled vector, the contrastive embedding of the
    pooled raw features and, with ``context_queries`` [C, D], each unit's context membership
    (``detach_context``: computed from the units without gradient, so that the context level
    trains its queries but never the unit vectors; the values are the same). ``context_queries``
    may instead be ``(C, layout)``: fixed windows (:func:`window_membership`)."""
    mask = mask.bool()
    x = proj(feats)
    weights = masked_softmax(pool(x).squeeze(-1), mask, dim=1)  # [N, n]
    pooled = l2norm(torch.bmm(weights.unsqueeze(1), x).squeeze(1))
    raw_pooled = torch.bmm(weights.unsqueeze(1), feats.to(x.dtype)).squeeze(1)
    embedding = l2norm(embed(raw_pooled))
    units = l2norm(x) * mask.unsqueeze(-1)
    membership = None
    if isinstance(context_queries, tuple):
        membership = window_membership(mask, *context_queries)
    elif context_queries is not None:
        logits = torch.einsum("cd,nkd->nck", context_queries, units.detach() if detach_context else units)
        logits = logits * math.sqrt(units.shape[-1])
        membership = masked_softmax(logits, mask.unsqueeze(1), dim=2)
    return cls(units=units, mask=mask, pooled=pooled, embedding=embedding, membership=membership)


class SideTowers(nn.Module):
    """One set of the per-side trainable layers (projection, pooling, contrastive embedding of
    the images and of the captions). A model with ``separate_streams`` gives its t2i stream this
    second set; its own attributes (``image_proj``, ...) are then the i2t stream's."""

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int):
        super().__init__()
        self.build(self, image_dim, text_dim, embed_dim)

    @staticmethod
    def build(module: nn.Module, image_dim: int, text_dim: int, embed_dim: int) -> None:
        """Give ``module`` the layers of one set of towers (the model's own set, under its own names)."""
        module.image_proj, module.text_proj = nn.Linear(image_dim, embed_dim), nn.Linear(text_dim, embed_dim)
        module.image_pool, module.text_pool = nn.Linear(embed_dim, 1), nn.Linear(embed_dim, 1)
        for pool in (module.image_pool, module.text_pool):  # start as mean pooling
            nn.init.zeros_(pool.weight)
            nn.init.zeros_(pool.bias)
        module.image_embed, module.text_embed = nn.Linear(image_dim, embed_dim), nn.Linear(text_dim, embed_dim)


def context_pooling(model, side: str):
    """What ``encode_side`` pools ``side``'s context units with: the learned queries [C, D], a
    ``(C, layout)`` pair for fixed windows, or None (no context level)."""
    if not model.has_context:
        return None
    if model.config.context_pooling == "windows":
        units = model.config.context_units_image if side == "image" else model.config.context_units_text
        return units, "grid" if side == "image" else "sequence"
    return getattr(model, f"{side}_context_queries")


def encode_features(model, side: str, feats: torch.Tensor, mask: torch.Tensor) -> Encoding:
    """``model``'s trainable encoding of one side's backbone features (``side``: "image" or
    "text"). With ``separate_streams`` both streams' towers encode the side and the results are
    joined (:func:`join_towers`); the context membership comes from the tower of the stream whose
    queries the side provides (images: i2t, captions: t2i)."""
    cls = ImageEncoding if side == "image" else TextEncoding
    queries = context_pooling(model, side)
    detach = model._detach_context_units
    stage = None
    if side == "image" and model.config.image_context_stage is not None:  # [regions | earlier stage]
        width = model.config.image_feature_dim
        if feats.shape[-1] != width + model.config.image_context_dim:
            raise ValueError(f"Image features of {feats.shape[-1]} values per region; this model reads "
                             f"{width} + {model.config.image_context_dim} (its image_context_stage)")
        feats, stage = feats[..., :width], feats[..., width:]
    if side == "text" and model.config.text_context_layer is not None:  # [last layer | context layer]
        width = model.config.text_feature_dim
        if feats.shape[-1] != 2 * width:
            raise ValueError(f"Caption features of {feats.shape[-1]} values per word; this model reads {width} + "
                             f"{width} (its text_context_layer {model.config.text_context_layer})")
        feats, stage = feats[..., :width], feats[..., width:]

    def encode(tower, context_queries):
        return encode_side(feats.float(), mask, getattr(tower, f"{side}_proj"), getattr(tower, f"{side}_pool"),
                           getattr(tower, f"{side}_embed"), context_queries, cls, detach_context=detach)

    if not model.config.separate_streams:
        out = encode(model, queries)
    elif side == "image":
        first = encode(model, queries)
        out = join_towers(first, encode(model.t2i_towers, None), first.membership)
    else:
        second = encode(model.t2i_towers, queries)
        out = join_towers(encode(model, None), second, second.membership)
    if stage is not None:
        out.context_source = l2norm(getattr(model, f"{side}_context_proj")(stage.float())) * out.mask.unsqueeze(-1)
    return out


def join_towers(first: Encoding, second: Encoding, membership: torch.Tensor | None) -> Encoding:
    """The encodings of the i2t and t2i towers side by side on the feature axis ([..., 2D]).
    The embedding halves are scaled by 1/sqrt(2), so the plain dot product of two joined
    embeddings (``TSHSRModel.global_similarity``, the shortlist) is the mean of the two streams'
    cosines; :func:`stream_view` takes one stream's half back out."""
    return type(first)(units=torch.cat([first.units, second.units], -1), mask=first.mask,
                       pooled=torch.cat([first.pooled, second.pooled], -1),
                       embedding=torch.cat([first.embedding, second.embedding], -1) / math.sqrt(2),
                       membership=membership)


def stream_view(values: dict[str, torch.Tensor], tower: int) -> dict[str, torch.Tensor]:
    """One tower's half (0: i2t, 1: t2i) of the head inputs of a joined encoding: units, pooled
    vector, unit embedding and the context units rebuilt from that half's units (or the context source)."""
    width = values["units"].shape[-1] // 2
    half = slice(tower * width, (tower + 1) * width)
    out = {**values, "units": values["units"][..., half], "pooled": values["pooled"][..., half],
           "embedding": values["embedding"][..., half] * math.sqrt(2)}
    return _with_context(out)
