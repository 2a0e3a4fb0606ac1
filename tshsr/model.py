"""The TSHSR model: encoders, two similarity streams, three levels, hierarchical reasoning.

The image and text sides are encoded separately (:meth:`TSHSRModel.encode_images`,
:meth:`TSHSRModel.encode_texts`), so a gallery is encoded once and scored many times; the
cross-attention head then scores lists of (image, caption) pairs. Every score comes with its
exact breakdown per stream and level (``TSHSROutput.contributions``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from tqdm.auto import tqdm

from .config import TSHSRConfig
from .encoders import (
    BiGRUTextBackbone,
    PrecomputedImageBackbone,
    TimmImageBackbone,
    TransformersTextBackbone,
)
from .heads import SGRAFHead, StreamHead, l2norm, masked_softmax
from .io import atomic_write as _atomic_write
from .io import release_free_memory
from .processing import InvalidInputError, TSHSRProcessor, Vocabulary

WEIGHTS_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that does not match its model: missing, corrupt, tampered or mismatched."""


# ----------------------------------------------------------------------------------------------
# Encodings of one side (image or text), independent of the other side
# ----------------------------------------------------------------------------------------------
@dataclass
class Encoding:
    """Per-item tensors of one modality, computed once and reused for every pair.

    units [N, n, D] L2-normalised region/word vectors, mask [N, n] valid units, pooled [N, D]
    attention-pooled vector (for global similarity nodes), embedding [N, D] contrastive global
    vector (cosine shortlist) and, when the model has a context level, membership [N, C, n] (how
    much each unit belongs to each of the C learned context units; rows sum to one). The context
    units themselves, :attr:`context`, are derived from these on use instead of stored: they are
    cheap to recompute per block and would add C x D floats per item (0.5 GB for a COCO 5K split).
    """

    units: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    embedding: torch.Tensor
    membership: torch.Tensor | None = None

    @property
    def context(self) -> torch.Tensor | None:
        """[N, C, D] context units: l2norm(membership @ units), or None without a context level."""
        return None if self.membership is None else _context(self.units, self.membership)

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
            if f.name in ("units", "mask"):
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
                if name in ("units", "mask"):
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


@dataclass
class TSHSROutput:
    """Scores and their exact breakdown.

    scores: [n_images, n_texts] (or [P] for pairs). contributions: {"<stream>/<level>": tensor}
    summing to ``scores``; each is ``weights[key] * level_scores[key]``. stream_scores: each
    stream's own score (a matcher on its own). global_similarity: cosine of the contrastive
    global vectors. attentions (on request): per stream, ``attention`` (query units over key
    units: for "t2i" words over regions [.., L, K], for "i2t" regions over words [.., K, L]) and
    ``local_weights`` (how much each query unit counts in the local score).
    """

    scores: torch.Tensor
    contributions: dict[str, torch.Tensor]
    level_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    stream_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    global_similarity: torch.Tensor | None = None
    attentions: dict[str, dict[str, torch.Tensor]] | None = None
    text_tokens: list[list[str]] | None = None
    image_grid: tuple[int, int] | None = None


# ----------------------------------------------------------------------------------------------
class TSHSRModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="tshsr",
    tags=["image-text-matching", "cross-modal-retrieval", "tshsr"],
    pipeline_tag="zero-shot-image-classification",
    license="mit",
):
    """Two-stream Hierarchical Similarity Reasoning for image-text matching."""

    def __init__(self, config: TSHSRConfig | dict | None = None, vocabulary: Vocabulary | None = None,
                 pretrained_backbones: bool = True):
        super().__init__()
        if config is None:
            config = TSHSRConfig()
        elif isinstance(config, dict):
            config = TSHSRConfig.from_dict(config)
        config = replace(config)  # our own copy: filled-in fields must not leak into the caller's
        self.vocabulary = vocabulary

        # ---- backbones ----
        if config.image_encoder == "timm":
            self.image_backbone = TimmImageBackbone(config.image_backbone, config.image_weights,
                                                    pretrained=pretrained_backbones)
            data = self.image_backbone.data_config
            config.image_feature_dim = self.image_backbone.feature_dim
            config.image_size = config.image_size or data["image_size"]
            config.image_mean = config.image_mean or data["mean"]
            config.image_std = config.image_std or data["std"]
        else:
            self.image_backbone = PrecomputedImageBackbone(config.image_feature_dim)
        if config.text_encoder == "transformers":
            self.text_backbone = TransformersTextBackbone(config.text_model)
        else:
            if vocabulary is None:
                raise ValueError("text_encoder='bigru' needs its Vocabulary (vocab.json)")
            if len(vocabulary) != config.vocab_size:
                raise ValueError(f"Vocabulary has {len(vocabulary)} words, config says {config.vocab_size}")
            self.text_backbone = BiGRUTextBackbone(config.vocab_size, config.word_dim, config.embed_dim)
        config.text_feature_dim = self.text_backbone.feature_dim
        self.config = config
        self._hub_mixin_config = None  # config.json is written by _save_pretrained, our format

        self._freeze_backbones()

        # ---- per-side trainable layers ----
        D = config.embed_dim
        Fi, Ft = config.image_feature_dim, config.text_feature_dim
        self.image_proj = nn.Linear(Fi, D)
        self.text_proj = nn.Linear(Ft, D)
        self.image_pool = nn.Linear(D, 1)
        self.text_pool = nn.Linear(D, 1)
        for pool in (self.image_pool, self.text_pool):  # start as mean pooling
            nn.init.zeros_(pool.weight)
            nn.init.zeros_(pool.bias)
        self.image_embed = nn.Linear(Fi, D)
        self.text_embed = nn.Linear(Ft, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        self.has_context = config.head == "tshsr" and "context" in config.levels
        if self.has_context:
            self.image_context_queries = nn.Parameter(torch.randn(config.context_units_image, D) / math.sqrt(D))
            self.text_context_queries = nn.Parameter(torch.randn(config.context_units_text, D) / math.sqrt(D))

        # ---- similarity head ----
        if config.head == "tshsr":
            self.streams = nn.ModuleDict({s: StreamHead(config, s) for s in config.streams})
            if config.stream_fusion == "learned" and len(config.streams) > 1:
                self.stream_logits = nn.Parameter(torch.zeros(len(config.streams)))
        elif config.head in ("sgr", "saf"):
            self.sgraf = SGRAFHead(config)

    # ------------------------------------------------------------------------------------------
    # Frozen backbones stay in eval mode (BatchNorm statistics must not drift) and keep no grads.
    def _frozen_prefixes(self) -> list[str]:
        prefixes = []
        if self.config.image_encoder == "timm" and not self.config.finetune_image:
            prefixes.append("image_backbone.")
        if self.config.text_encoder == "transformers" and not self.config.finetune_text:
            prefixes.append("text_backbone.")
        return prefixes

    def _freeze_backbones(self) -> None:
        for prefix in self._frozen_prefixes():
            module = getattr(self, prefix.rstrip("."))
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        for prefix in self._frozen_prefixes():
            getattr(self, prefix.rstrip(".")).eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def processor(self) -> TSHSRProcessor:
        if getattr(self, "_processor", None) is None:
            self._processor = TSHSRProcessor(self.config, self.vocabulary)
        return self._processor

    @property
    def contribution_keys(self) -> list[str]:
        return self.config.contribution_keys

    # ------------------------------------------------------------------------------------------
    # Backbone features (frozen: cacheable) -------------------------------------------------------
    def image_features(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """Region features [N, K, F] and mask [N, K] from PIL images/paths, or precomputed arrays."""
        if self.config.image_encoder == "timm":
            pixels = self.processor.preprocess_images(images).to(self.device)
            return self.image_backbone(pixels)
        if isinstance(images, (list, tuple)):
            images = np.stack([np.asarray(x, dtype=np.float32) for x in images])
        regions = torch.as_tensor(np.asarray(images, dtype=np.float32) if not torch.is_tensor(images) else images)
        return self.image_backbone(regions.to(self.device))

    def text_features(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features [N, L, F] and word mask [N, L] (special tokens and padding excluded)."""
        tok = {k: v.to(self.device) for k, v in self.processor.tokenize(texts).items()}
        return self.text_backbone(tok["input_ids"], tok["attention_mask"], tok["word_mask"])

    # Trainable per-side encoding ----------------------------------------------------------------
    def _encode_side(self, feats, mask, proj, pool, embed, context_queries, cls):
        mask = mask.bool()
        x = proj(feats)
        weights = masked_softmax(pool(x).squeeze(-1), mask, dim=1)  # [N, n]
        pooled = l2norm(torch.bmm(weights.unsqueeze(1), x).squeeze(1))
        raw_pooled = torch.bmm(weights.unsqueeze(1), feats.to(x.dtype)).squeeze(1)
        embedding = l2norm(embed(raw_pooled))
        units = l2norm(x) * mask.unsqueeze(-1)
        membership = None
        if context_queries is not None:
            logits = torch.einsum("cd,nkd->nck", context_queries, units) * math.sqrt(units.shape[-1])
            membership = masked_softmax(logits, mask.unsqueeze(1), dim=2)
        return cls(units=units, mask=mask, pooled=pooled, embedding=embedding, membership=membership)

    def encode_image_features(self, regions: torch.Tensor, mask: torch.Tensor) -> ImageEncoding:
        return self._encode_side(regions.float(), mask, self.image_proj, self.image_pool, self.image_embed,
                                 self.image_context_queries if self.has_context else None, ImageEncoding)

    def encode_text_features(self, tokens: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        return self._encode_side(tokens.float(), mask, self.text_proj, self.text_pool, self.text_embed,
                                 self.text_context_queries if self.has_context else None, TextEncoding)

    # Public encoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images, batch_size: int = 32, progress: bool = False) -> ImageEncoding:
        """Encode images (PIL images or paths; region arrays for precomputed models) once."""
        n = len(images)
        if n == 0:
            raise InvalidInputError("No images given: pass at least one image")
        parts = []
        for start in tqdm(range(0, n, batch_size), desc="encode images", disable=not progress, unit="batch"):
            regions, mask = self.image_features(images[start:start + batch_size])
            parts.append(self.encode_image_features(regions, mask))
        return ImageEncoding.cat(parts, consume=True)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> TextEncoding:
        if isinstance(texts, str):
            raise InvalidInputError("encode_texts takes a list of strings, not one string")
        if len(texts) == 0:
            raise InvalidInputError("No texts given: pass at least one caption")
        parts = []
        for start in tqdm(range(0, len(texts), batch_size), desc="encode texts", disable=not progress, unit="batch"):
            tokens, mask = self.text_features(texts[start:start + batch_size])
            parts.append(self.encode_text_features(tokens, mask))
        return TextEncoding.cat(parts, consume=True)

    # ------------------------------------------------------------------------------------------
    # Scoring
    # ------------------------------------------------------------------------------------------
    def stream_weights(self) -> dict[str, torch.Tensor]:
        streams = self.config.streams
        if hasattr(self, "stream_logits"):
            w = torch.softmax(self.stream_logits, 0)
            return {s: w[i] for i, s in enumerate(streams)}
        return {s: torch.tensor(1.0 / len(streams), device=self.device) for s in streams}

    def global_similarity(self, images: Encoding, texts: Encoding) -> torch.Tensor:
        """Cosine of the contrastive global vectors, [n_images, n_texts]: the cheap shortlist."""
        return images.embedding @ texts.embedding.T

    def forward(self, images: Encoding, texts: Encoding, image_index: torch.Tensor, text_index: torch.Tensor,
                return_attention: bool = False) -> TSHSROutput:
        """Score explicit pairs (image_index[p], text_index[p]); the training entry point."""
        return self.score_pairs(images, texts, image_index, text_index, return_attention)

    def score_pairs(self, images: Encoding, texts: Encoding, image_index, text_index,
                    return_attention: bool = False) -> TSHSROutput:
        """Scores of explicit pairs (image_index[p], text_index[p]): ``.scores`` is [P]."""
        image_index = torch.as_tensor(image_index, dtype=torch.long, device=images.device)
        text_index = torch.as_tensor(text_index, dtype=torch.long, device=texts.device)
        if image_index.shape != text_index.shape or image_index.dim() != 1:
            raise ValueError("image_index and text_index must be 1-D and of equal length")
        img = _gather(images, image_index)
        txt = _gather(texts, text_index)
        cosine = (img["embedding"] * txt["embedding"]).sum(-1)
        return self._run_heads(img, txt, cosine, return_attention, grid=None)

    def score_grid(self, images: Encoding, texts: Encoding, return_attention: bool = False) -> TSHSROutput:
        """Every image against every text in one pass: ``.scores`` is [n_images * n_texts],
        image-major. Same values as :meth:`score_pairs` on the same pairs, computed with large
        matrix products instead of one small product per pair (the exhaustive-scoring path)."""
        img, txt = _fields(images), _fields(texts)
        cosine = (images.embedding @ texts.embedding.T).reshape(-1)
        return self._run_heads(img, txt, cosine, return_attention, grid=(len(images), len(texts)))

    def _run_heads(self, img: dict, txt: dict, cosine: torch.Tensor, return_attention: bool,
                   grid: tuple[int, int] | None) -> TSHSROutput:
        cfg = self.config
        contributions, level_scores, stream_scores, maps = {}, {}, {}, {}
        if cfg.head == "dual":
            contributions["dual/global"] = cosine
            level_scores["dual/global"] = cosine
            stream_scores["dual"] = cosine
        elif cfg.head in ("sgr", "saf"):
            (key,) = cfg.contribution_keys
            score, stream_maps = self.sgraf(txt, img, want_maps=return_attention, grid=grid)
            contributions[key] = level_scores[key] = stream_scores["t2i"] = score
            maps["t2i"] = stream_maps
        else:
            fusion = self.stream_weights()
            for stream, head in self.streams.items():
                q, k = (img, txt) if stream == "i2t" else (txt, img)
                levels, stream_maps = head(q, k, cosine, want_maps=return_attention, grid=grid)
                level_w = head.level_weights()
                total = 0
                for j, (level, value) in enumerate(levels.items()):
                    key = f"{stream}/{level}"
                    factor = fusion[stream] * level_w[j]
                    contributions[key] = factor * value
                    level_scores[key] = value
                    total = total + level_w[j] * value
                stream_scores[stream] = total
                maps[stream] = stream_maps
        scores = torch.stack(list(contributions.values()), 0).sum(0)
        # The weights as plain floats; a compiled block (which returns tensors only) leaves them out.
        weights = {} if torch.compiler.is_compiling() else self.mixing_weights()
        return TSHSROutput(scores=scores, contributions=contributions, level_scores=level_scores,
                           weights=weights, stream_scores=stream_scores, global_similarity=cosine,
                           attentions=maps if return_attention else None)

    def auto_block_pairs(self, images: Encoding, texts: Encoding) -> int:
        """Pairs per exhaustive block. On CPU the attended vectors of a block (all streams) are kept
        near 1M floats per thread (4 MB, about a core's L2 cache), at least 128 pairs: blocks that fit
        in the caches run the memory-bound element-wise work between the matrix products much faster
        than large blocks do (measured with benchmarks/scoring_throughput.py on 2 cores: sgr and
        tshsr are fastest near 128-400 pairs, 20-30 % slower at 1,000). On a GPU large blocks
        (4,096 pairs) keep the device busy."""
        cfg = self.config
        if cfg.head == "dual":
            return 65536
        if images.units.device.type != "cpu":
            return 4096
        streams = ("t2i",) if cfg.head in ("sgr", "saf") else cfg.streams
        units = sum(images.units.shape[1] if s == "i2t" else texts.units.shape[1] for s in streams)
        budget = 1_000_000 * min(4, torch.get_num_threads())  # floats of attended vectors per block
        return int(min(4096, max(128, budget // max(1, units * images.units.shape[2]))))

    def block_shape(self, images: Encoding, texts: Encoding, block_pairs: int | None = None) -> tuple[int, int]:
        """(images, texts) per exhaustive block of about ``block_pairs`` pairs (default
        :meth:`auto_block_pairs`): as many texts as fit, evened out over the blocks (less padding
        when compiled), then as many images as the rest allows."""
        ni, nt = len(images), len(texts)
        if block_pairs is None:
            block_pairs = self.auto_block_pairs(images, texts)
        bt = min(nt, max(1, block_pairs))
        bt = -(-nt // -(-nt // bt))  # the same number of blocks, evened out
        return min(ni, max(1, block_pairs // bt)), bt

    def _block_tensors(self, img: dict, txt: dict, n_images: int, n_texts: int):
        """One exhaustive block as a tuple of tensors (scores, contributions, level scores, stream
        scores, cosine): the unit that ``torch.compile`` fuses in :meth:`score_encoded`."""
        cosine = (img["embedding"] @ txt["embedding"].T).reshape(-1)
        out = self._run_heads(img, txt, cosine, False, grid=(n_images, n_texts))
        keys = self.contribution_keys
        return (out.scores, torch.stack([out.contributions[k] for k in keys]),
                torch.stack([out.level_scores[k] for k in keys]),
                torch.stack([out.stream_scores[s] for s in sorted(out.stream_scores)]), cosine)

    @torch.no_grad()
    def mixing_weights(self) -> dict[str, float]:
        """The fixed weight of each ``"<stream>/<level>"`` contribution (level x stream weight)."""
        cfg = self.config
        if cfg.head in ("dual", "sgr", "saf"):
            return {k: 1.0 for k in cfg.contribution_keys}
        fusion = self.stream_weights()
        return {f"{stream}/{level}": float(fusion[stream] * head.level_weights()[j])
                for stream, head in self.streams.items() for j, level in enumerate(head.levels)}

    @torch.no_grad()
    def score_encoded(self, images: Encoding, texts: Encoding, block_pairs: int | None = None,
                      progress: bool = False, return_attention: bool = False,
                      compile: bool = False, precision: str = "auto") -> TSHSROutput:
        """All pairs, [n_images, n_texts], in blocks of about ``block_pairs`` pairs (bounded memory;
        default :meth:`auto_block_pairs`).

        ``precision``: ``"auto"`` runs the blocks under bf16 autocast on a GPU that supports it
        (matrix products in bf16, softmax and reductions in fp32) and in fp32 elsewhere; ``"fp32"``
        or ``"bf16"`` force one. Results are always returned in fp32.

        ``compile=True`` runs each block through ``torch.compile`` (inductor), which fuses the
        element-wise chains between the matrix products: 1.4-1.6x faster on 2 CPU cores
        (benchmarks/scoring_throughput.py), after a one-off compilation of up to a minute
        (cached on disk by torch; on CPU it needs a C++ compiler). Every
        block then has the same shape (the last ones are padded and the padding dropped), so one
        compilation serves the whole run. Attention maps are not available on this path.
        """
        ni, nt = len(images), len(texts)
        if ni == 0 or nt == 0:
            raise InvalidInputError("Need at least one image and one text to score")
        autocast = _autocast(images.device, precision)
        if autocast is not None:
            with autocast:
                return self.score_encoded(images, texts, block_pairs, progress, return_attention, compile, "fp32")
        bi, bt = self.block_shape(images, texts, block_pairs)
        if compile and not return_attention:
            return self._score_encoded_compiled(images, texts, bi, bt, progress)
        device = images.device
        scores = torch.empty(ni, nt, device=device)
        parts = {k: torch.empty(ni, nt, device=device) for k in self.contribution_keys}
        levels = {k: torch.empty(ni, nt, device=device) for k in self.contribution_keys}
        streams: dict[str, torch.Tensor] = {}
        cosine = torch.empty(ni, nt, device=device)
        attn: dict = {}
        weights = {}
        blocks = [(i, t) for i in range(0, ni, bi) for t in range(0, nt, bt)]
        for i0, t0 in tqdm(blocks, desc="score", disable=not progress, unit="block"):
            ii = torch.arange(i0, min(i0 + bi, ni), device=device)
            tt = torch.arange(t0, min(t0 + bt, nt), device=device)
            out = self.score_grid(images[i0:i0 + bi], texts[t0:t0 + bt], return_attention=return_attention)
            shape = (len(ii), len(tt))

            def grid(t: torch.Tensor) -> torch.Tensor:  # a block's values as [bi, bt] fp32 (bf16 under autocast)
                return t.view(shape).float()

            scores[ii[:, None], tt[None, :]] = grid(out.scores)
            cosine[ii[:, None], tt[None, :]] = grid(out.global_similarity)
            for k in self.contribution_keys:
                parts[k][ii[:, None], tt[None, :]] = grid(out.contributions[k])
                levels[k][ii[:, None], tt[None, :]] = grid(out.level_scores[k])
            for s, v in out.stream_scores.items():
                streams.setdefault(s, torch.empty(ni, nt, device=device))[ii[:, None], tt[None, :]] = grid(v)
            weights = out.weights
            if return_attention:
                for s, smaps in out.attentions.items():
                    for name, value in smaps.items():
                        attn.setdefault(s, {}).setdefault(name, []).append(
                            (ii, tt, value.view(*shape, *value.shape[1:]).float()))
        attentions = None
        if return_attention:
            attentions = {s: {name: _assemble(chunks, ni, nt) for name, chunks in smaps.items()}
                          for s, smaps in attn.items()}
        return TSHSROutput(scores=scores, contributions=parts, level_scores=levels, weights=weights,
                           stream_scores=streams, global_similarity=cosine, attentions=attentions)

    def _score_encoded_compiled(self, images: Encoding, texts: Encoding, bi: int, bt: int,
                                progress: bool) -> TSHSROutput:
        if getattr(self, "_compiled_block", None) is None:
            self._compiled_block = torch.compile(self._block_tensors, dynamic=False)
        ni, nt = len(images), len(texts)
        device = images.device
        keys = self.contribution_keys
        scores = torch.empty(ni, nt, device=device)
        parts = torch.empty(len(keys), ni, nt, device=device)
        levels = torch.empty(len(keys), ni, nt, device=device)
        cosine = torch.empty(ni, nt, device=device)
        stream_names = sorted({k.split("/")[0] for k in keys})
        streams = torch.empty(len(stream_names), ni, nt, device=device)

        def padded(n0: int, size: int, n: int) -> torch.Tensor:  # indices of one block, padded to size
            idx = torch.arange(n0, min(n0 + size, n), device=device)
            return torch.cat([idx, idx[-1:].expand(size - len(idx))]) if len(idx) < size else idx

        blocks = [(i, t) for i in range(0, ni, bi) for t in range(0, nt, bt)]
        for i0, t0 in tqdm(blocks, desc="score", disable=not progress, unit="block"):
            mi, mt = min(bi, ni - i0), min(bt, nt - t0)
            # Full blocks are views (no copy); only the last, short ones are padded to the shape.
            img = _fields(images[i0:i0 + bi]) if mi == bi else _gather(images, padded(i0, bi, ni))
            txt = _fields(texts[t0:t0 + bt]) if mt == bt else _gather(texts, padded(t0, bt, nt))
            try:
                block = self._compiled_block(img, txt, bi, bt)
            except Exception as err:  # inductor's failures (no compiler, unsupported op) are long and deep
                if (i0, t0) != blocks[0]:
                    raise
                self._compiled_block = None
                raise RuntimeError(f"torch.compile could not build the scoring block ({type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''}); on CPU it needs a working "
                                   "C++ compiler (g++). Score without compile instead.") from err
            s, c, lv, st, cos = (x.view(*x.shape[:-1], bi, bt)[..., :mi, :mt] for x in block)
            scores[i0:i0 + mi, t0:t0 + mt] = s
            parts[:, i0:i0 + mi, t0:t0 + mt] = c
            levels[:, i0:i0 + mi, t0:t0 + mt] = lv
            streams[:, i0:i0 + mi, t0:t0 + mt] = st
            cosine[i0:i0 + mi, t0:t0 + mt] = cos
        return TSHSROutput(scores=scores, contributions=dict(zip(keys, parts)), level_scores=dict(zip(keys, levels)),
                           weights=self.mixing_weights(), stream_scores=dict(zip(stream_names, streams)),
                           global_similarity=cosine)

    @torch.no_grad()
    def score(self, images, texts: Sequence[str], return_attention: bool = False,
              batch_size: int = 32) -> TSHSROutput:
        """Score every image against every text: ``.scores`` is [len(images), len(texts)].

        images: PIL images or file paths (region arrays for a precomputed-features model);
        texts: strings. With ``return_attention`` the output also carries the attention maps of
        every pair, the words of each text and the image region grid (keep inputs small then).
        """
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a list of strings, not one string")
        if images is None or len(images) == 0:
            raise InvalidInputError("No images given: pass at least one image")
        if len(texts) == 0:
            raise InvalidInputError("No texts given: pass at least one caption")
        was_training = self.training
        self.eval()
        try:
            image_enc = self.encode_images(images, batch_size=batch_size)
            text_enc = self.encode_texts(texts)
            out = self.score_encoded(image_enc, text_enc, return_attention=return_attention)
        finally:
            self.train(was_training)
        if return_attention:
            out.text_tokens = [self.processor.tokens(t) for t in texts]
            out.image_grid = self.image_grid()
        return out

    def image_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of the image regions for a timm grid backbone, None for free regions."""
        if self.config.image_encoder != "timm":
            return None
        if getattr(self, "_grid", None) is None:
            self._grid = self.image_backbone.grid_shape(self.config.image_size)
        return self._grid

    # ------------------------------------------------------------------------------------------
    # Saving and loading (strict, safetensors only)
    # ------------------------------------------------------------------------------------------
    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores: everything but frozen pretrained backbones."""
        frozen = tuple(self._frozen_prefixes())
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith(frozen)}

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.cpu() for k, v in self.saved_state_dict().items()}
        # Checksums of the three files, checked on load: an edited config.json or vocab.json, or
        # flipped bytes in the tensor data, are refused instead of silently giving another model.
        metadata = {"format": "pt", "tshsr_config_sha256": self.config_fingerprint(),
                    "tshsr_weights_sha256": _state_digest(state)}
        vocab_json = self.vocabulary.to_json() if self.vocabulary is not None else None
        if vocab_json is not None:
            metadata["tshsr_vocab_sha256"] = hashlib.sha256(vocab_json.encode()).hexdigest()
        _atomic_write(save_directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata=metadata))
        _atomic_write(save_directory / "config.json",
                      lambda p: Path(p).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n"))
        if vocab_json is not None:
            _atomic_write(save_directory / "vocab.json", lambda p: Path(p).write_text(vocab_json))

    def config_fingerprint(self) -> str:
        return self.config.fingerprint()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | None = None, token: str | None = None, local_files_only: bool = False,
                        map_location: str | torch.device = "cpu", force_download: bool = False,
                        **config_overrides) -> "TSHSRModel":
        """Load a model from a local folder or a Hugging Face Hub repository id.

        Loading is strict: a missing, unexpected or misshapen tensor raises
        :class:`CheckpointError` naming it; a model is never returned with random weights.
        """
        directory = Path(pretrained_model_name_or_path)
        if not directory.is_dir():
            name = str(pretrained_model_name_or_path)
            if name.startswith((".", "/")) or os.sep in name.strip("/").split("/", 1)[-1] or name.count("/") > 1:
                raise FileNotFoundError(f"Model folder not found: {name}")
            from huggingface_hub import snapshot_download

            try:
                directory = Path(snapshot_download(
                    repo_id=name, revision=revision, cache_dir=cache_dir, token=token,
                    local_files_only=local_files_only, force_download=force_download,
                    allow_patterns=["config.json", WEIGHTS_NAME, "vocab.json", "README.md"],
                ))
            except Exception as exc:
                raise CheckpointError(
                    f"Could not load {name!r}: it is not a local folder and the Hugging Face Hub "
                    f"could not provide it ({type(exc).__name__}: {exc})"
                ) from exc
        try:
            config = TSHSRConfig.load(directory)
        except FileNotFoundError as exc:
            raise CheckpointError(f"{directory} is not a TSHSR checkpoint: config.json is missing") from exc
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{directory}/config.json is invalid: {exc}") from exc
        metadata = _safetensors_metadata(directory / WEIGHTS_NAME)
        # The fingerprint of config.json as written (not of the parsed config, so that fields
        # added to TSHSRConfig later, with defaults, do not invalidate older checkpoints).
        raw = json.loads((directory / "config.json").read_text())
        written = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]
        if metadata.get("tshsr_config_sha256", written) != written:
            raise CheckpointError(
                f"{directory}/config.json does not match the weights in {WEIGHTS_NAME}: it was changed "
                f"after they were saved (fingerprint {written}, saved with {metadata['tshsr_config_sha256']}). "
                f"Restore the original config.json; to change a setting on load, pass it to "
                f"from_pretrained(..., name=value)."
            )
        if config_overrides:
            config = replace(config, **config_overrides)
        vocabulary = None
        if config.text_encoder == "bigru":
            try:
                vocabulary = Vocabulary.load(directory)
            except FileNotFoundError as exc:
                raise CheckpointError(f"{directory} is incomplete: {exc}") from exc
            except (ValueError, TypeError) as exc:
                raise CheckpointError(f"{directory}/vocab.json is invalid: {exc}") from exc
            saved_vocab = metadata.get("tshsr_vocab_sha256")
            if saved_vocab is not None and saved_vocab != hashlib.sha256(vocabulary.to_json().encode()).hexdigest():
                raise CheckpointError(
                    f"{directory}/vocab.json does not match the weights in {WEIGHTS_NAME}: it was changed "
                    f"after they were saved (word ids would point at other words' embeddings)"
                )
            if len(vocabulary) != config.vocab_size:
                raise CheckpointError(f"{directory}/vocab.json has {len(vocabulary)} words, config.json says "
                                      f"vocab_size={config.vocab_size}")
        model = cls(config, vocabulary=vocabulary)
        model.load_checkpoint_weights(directory / WEIGHTS_NAME)
        model.to(map_location)
        model.eval()
        return model

    def load_checkpoint_weights(self, path: str | Path) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"Weights file not found: {path}")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is not a valid safetensors file (corrupt or truncated?): {exc}") from exc
        expected = self.saved_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
        if missing or unexpected or shapes:
            lines = [f"Checkpoint {path} does not match the model built from its config.json:"]
            if missing:
                lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing[:10])}")
            if unexpected:
                lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:10])}")
            if shapes:
                lines.append(f"  wrong shapes ({len(shapes)}): {'; '.join(shapes[:10])}")
            raise CheckpointError("\n".join(lines))
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"Checkpoint {path} has non-finite values in {', '.join(bad[:10])}")
        saved_digest = _safetensors_metadata(path).get("tshsr_weights_sha256")
        if saved_digest is not None and saved_digest != _state_digest(state):
            raise CheckpointError(f"{path} is corrupt: its tensor data does not match the checksum saved with "
                                  f"it (changed or damaged after saving)")
        self.load_state_dict(state, strict=False)  # frozen backbone keys are absent by design;
        # every other key was checked above, so nothing stays at its random initialisation.


# ----------------------------------------------------------------------------------------------
def _autocast(device: torch.device, precision: str):
    """The autocast context ``score_encoded`` runs under for ``precision``, or None for plain fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16 else "fp32"
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else None


def _state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: names, shapes, dtypes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file ({} when the file is absent: the loader reports that)."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        return {}
    try:
        with safe_open(str(path), "pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file (corrupt or truncated?): {exc}") from exc


def _context(units: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    return l2norm(torch.bmm(membership, units), fresh=True)


def _with_context(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the heads read: the stored fields plus the derived context units."""
    if "membership" in values:
        values["context"] = _context(values["units"], values["membership"])
    return values


def _fields(encoding: Encoding) -> dict[str, torch.Tensor]:
    return _with_context({f.name: getattr(encoding, f.name) for f in fields(encoding)
                          if getattr(encoding, f.name) is not None})


def _gather(encoding: Encoding, index: torch.Tensor) -> dict[str, torch.Tensor]:
    return _with_context({f.name: getattr(encoding, f.name)[index] for f in fields(encoding)
                          if getattr(encoding, f.name) is not None})


def _assemble(chunks, ni: int, nt: int) -> torch.Tensor:
    """Put per-block attention maps back into one [ni, nt, ...] tensor (units padded to the max)."""
    trailing = [max(c[2].shape[2 + d] for c in chunks) for d in range(chunks[0][2].dim() - 2)]
    out = torch.zeros(ni, nt, *trailing, device=chunks[0][2].device)
    for ii, tt, value in chunks:
        index = (ii[:, None], tt[None, :]) + tuple(slice(0, s) for s in value.shape[2:])
        out[index] = value
    return out
