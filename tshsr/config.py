"""Configuration of a TSHSR model.

One dataclass describes the encoders and the similarity head. It is saved as ``config.json``
next to the weights, and every ablation of the paper is a preset of it (``TSHSRConfig.preset``),
never a code edit.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STREAMS = ("i2t", "t2i")
LEVELS = ("local", "context", "global")
IMAGE_ENCODERS = ("timm", "precomputed")
TEXT_ENCODERS = ("transformers", "bigru")


@dataclass
class TSHSRConfig:
    """Everything needed to rebuild a model (architecture, encoders, preprocessing).

    Frozen pretrained backbones are *referenced* by name (``image_backbone``, ``text_model``) and
    resolved offline when the model is built (see :mod:`tshsr.encoders`); only trainable
    weights are stored in the checkpoint. A backbone that was fine-tuned is stored in full.
    """

    # --- similarity head -------------------------------------------------------------------
    head: str = "tshsr"  # a registered head (tshsr.registry): "tshsr", "sgr", "saf" (SGRAF), "dual"
    streams: tuple[str, ...] = ("i2t", "t2i")
    levels: tuple[str, ...] = ("local", "context", "global")
    embed_dim: int = 512  # D: common size of region/word vectors
    sim_dim: int = 128  # m: size of a similarity vector (graph node)
    reasoning_steps: int = 2  # bottom-up + top-down rounds (TSHSR) or SGR steps (sgr uses 3)
    context_units_image: int = 6  # learned soft-pooling units over regions
    context_units_text: int = 4  # learned soft-pooling units over words
    # How a context unit pools its side's units: "learned" (soft clusters: a learned query per unit,
    # softmax over the units) or "windows" (fixed overlapping windows: phrase windows along the caption,
    # neighbourhoods on the image grid; context_units_image must then be a square, e.g. 9 for 3x3).
    context_pooling: str = "learned"
    attention_smooth: float = 9.0  # lambda of SCAN's softmax(lambda * A)
    global_cosine: bool = True  # the global level also carries the dual-encoder cosine
    stream_fusion: str = "learned"  # "learned" (softmax weights) or "equal" (fixed, cannot collapse)
    level_cosine: bool = False  # local/context levels also carry SCAN's alignment (attended cosine)
    level_fusion: str = "learned"  # "learned" (softmax weights per stream), "equal" (fixed 1/levels) or "fixed"
    level_weights: tuple[float, ...] | None = None  # "fixed" fusion: a weight per level, or a set per stream
    # The reasoning graph also links local and global directly (global gathers the local nodes, local
    # nodes read the global node), so the context level is a path beside local -> global, not between.
    context_skip: bool = False
    # The context level's messages (into the global node and into the local nodes) are scaled by a
    # learned gate that starts at zero (ReZero): the reasoning starts as the graph without the context
    # level and takes in the context path only as far as training finds it useful. Needs context_skip.
    context_gate: bool = False
    # The context nodes reason over each other (SGR's relation step, residual) after gathering their
    # local nodes in each reasoning step: relations between phrases / neighbourhoods, not only means.
    context_relations: bool = False
    # A learned salience logit per word in each stream (zero at first): i2t adds it to the logits of
    # the words a region attends over, t2i weights each word's alignment by its softmax.
    word_salience: bool = False
    # Each stream has its own towers (projections, pooling, contrastive embedding) instead of both
    # reading the same unit vectors: two streams then err as differently as two separately trained models.
    separate_streams: bool = False
    # Each level is read out from its nodes both before and after the reasoning steps, and the two scores are
    # averaged: the score is the mean over reasoning depths (0 and reasoning_steps), in training and at test time.
    readout_mean: bool = False
    logit_scale_init: float = 20.0  # temperature of the contrastive term on global vectors

    # --- image side ------------------------------------------------------------------------
    image_encoder: str = "timm"  # "timm" (any backbone) or "precomputed" (region features)
    image_backbone: str = "tf_efficientnet_lite0"
    image_weights: str | None = None  # explicit local weight file; else offline package / Hub
    image_feature_dim: int | None = None  # filled in from the backbone, or region feature size
    image_size: int | None = None  # filled in from the backbone's data config
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    finetune_image: bool = False
    # The context level reads its own image features: this earlier stage of the timm backbone (an
    # index into its feature_info, e.g. 3 = stride 16 on EfficientNet), pooled onto the last grid
    # and projected on its own, instead of window means of the local level's region vectors.
    image_context_stage: int | None = None
    image_context_dim: int | None = None  # filled in from the backbone: that stage's channels

    # --- text side -------------------------------------------------------------------------
    text_encoder: str = "transformers"  # "transformers" (any encoder) or "bigru"
    text_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    text_feature_dim: int | None = None  # filled in from the encoder
    max_text_length: int = 32
    finetune_text: bool = False
    # Train only the top N layers of a transformers encoder; the frozen layers below are cached
    # (their hidden states) and the trained top is stored in the checkpoint. 0: all frozen.
    text_finetune_layers: int = 0
    # The context level reads its own caption features: the hidden states after this layer of the
    # transformers encoder (0: the token embeddings; a frozen layer, below any trained top layers),
    # projected on their own, instead of window means of the local level's word vectors.
    text_context_layer: int | None = None
    vocab_size: int = 0  # bigru only: size of its own vocabulary (saved with the model)
    word_dim: int = 300  # bigru only

    # --- bookkeeping -----------------------------------------------------------------------
    preset_name: str | None = None
    # sha256 of each frozen pretrained backbone's weights ({"image_backbone": ..., "text_backbone": ...}),
    # filled in when a model is built from pretrained weights and checked when it is loaded.
    backbone_sha256: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.streams = tuple(self.streams)
        self.levels = tuple(self.levels)
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(float(v) for v in value))
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"Invalid TSHSRConfig: {msg}")

        from .registry import get_head

        try:
            head = get_head(self.head)
        except ValueError as exc:
            bad(str(exc))
        if not self.streams or any(s not in STREAMS for s in self.streams):
            bad(f"streams={self.streams!r}; expected a non-empty subset of {STREAMS}")
        if not self.levels or any(lv not in LEVELS for lv in self.levels):
            bad(f"levels={self.levels!r}; expected a non-empty subset of {LEVELS}")
        if len(set(self.streams)) != len(self.streams) or len(set(self.levels)) != len(self.levels):
            bad("streams and levels must not repeat")
        reason = head.validate(self)
        if reason:
            bad(reason)
        if self.image_encoder not in IMAGE_ENCODERS:
            bad(f"image_encoder={self.image_encoder!r}; expected one of {IMAGE_ENCODERS}")
        if self.text_encoder not in TEXT_ENCODERS:
            bad(f"text_encoder={self.text_encoder!r}; expected one of {TEXT_ENCODERS}")
        if self.image_encoder == "precomputed" and not self.image_feature_dim:
            bad("image_encoder='precomputed' needs image_feature_dim (e.g. 2048)")
        if self.text_encoder == "bigru" and self.vocab_size <= 0:
            bad("text_encoder='bigru' needs vocab_size > 0 (build it with tshsr.Vocabulary.build)")
        if self.stream_fusion not in ("learned", "equal"):
            bad(f"stream_fusion={self.stream_fusion!r}; expected 'learned' or 'equal'")
        if self.level_fusion not in ("learned", "equal", "fixed"):
            bad(f"level_fusion={self.level_fusion!r}; expected 'learned', 'equal' or 'fixed'")
        if (self.level_fusion == "fixed") != (self.level_weights is not None):
            bad("level_fusion='fixed' and level_weights go together: one weight per level, in the order of levels")
        if self.level_weights is not None:
            self.level_weights = tuple(float(w) for w in self.level_weights)
            n, per_stream = len(self.levels), len(self.levels) * len(self.streams)
            if len(self.level_weights) not in (n, per_stream) or min(self.level_weights) < 0 or any(
                    sum(self.stream_level_weights(s)) <= 0 for s in self.streams):
                bad(f"level_weights={self.level_weights} must give one non-negative weight per level {self.levels} "
                    f"(not all zero), or one such set per stream {self.streams}, in that order ({per_stream} values)")
        for name in ("embed_dim", "sim_dim", "max_text_length"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive")
        if self.reasoning_steps < 0:
            bad("reasoning_steps must be >= 0")
        if self.context_skip and "context" not in self.levels:
            bad("context_skip links local and global beside the context level; it needs the context level")
        if self.context_gate and not self.context_skip:
            bad("context_gate starts the context path closed; it needs context_skip (the direct local-global edges)")
        _check_own_context_features(self, bad)
        if self.context_relations and "context" not in self.levels:
            bad("context_relations links the context nodes with each other; it needs the context level")
        if self.separate_streams and set(self.streams) != set(STREAMS):
            bad("separate_streams gives each of the two streams its own towers; it needs streams=('i2t', 't2i')")
        if "context" in self.levels and (self.context_units_image <= 0 or self.context_units_text <= 0):
            bad("the context level needs context_units_image > 0 and context_units_text > 0")
        if self.text_finetune_layers < 0:
            bad("text_finetune_layers must be >= 0")
        if self.text_finetune_layers and (self.text_encoder != "transformers" or self.finetune_text):
            bad("text_finetune_layers trains the top layers of a frozen transformers text encoder; it does not "
                "go with text_encoder='bigru' or finetune_text (which trains every layer)")
        if self.context_pooling not in ("learned", "windows"):
            bad(f"context_pooling={self.context_pooling!r}; expected 'learned' or 'windows'")
        if self.context_pooling == "windows":
            if math.isqrt(self.context_units_image) ** 2 != self.context_units_image:
                bad(f"context_pooling='windows' lays the image context units out as a square grid of "
                    f"neighbourhoods; context_units_image={self.context_units_image} is not a square (4, 9, 16)")

    # ------------------------------------------------------------------------------------------
    @property
    def contribution_keys(self) -> list[str]:
        """Keys of ``TSHSROutput.contributions`` for this configuration, in a fixed order."""
        from .registry import get_head

        return get_head(self.head).contribution_keys(self)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TSHSRConfig":
        """The ablations of the paper, by name: sgr, saf, t2i, i2t, flat, tshsr (and dual)."""
        presets: dict[str, dict[str, Any]] = {
            "tshsr": dict(head="tshsr", streams=("i2t", "t2i"), levels=("local", "context", "global")),
            "flat": dict(head="tshsr", streams=("i2t", "t2i"), levels=("local", "global")),
            "t2i": dict(head="tshsr", streams=("t2i",), levels=("local", "context", "global")),
            "i2t": dict(head="tshsr", streams=("i2t",), levels=("local", "context", "global")),
            "sgr": dict(head="sgr", streams=("t2i",), levels=("local", "global"), reasoning_steps=3,
                        global_cosine=False),
            "saf": dict(head="saf", streams=("t2i",), levels=("local", "global"), global_cosine=False),
            "dual": dict(head="dual", streams=("i2t", "t2i"), levels=("global",), global_cosine=True),
        }
        if name not in presets:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(presets)}")
        values = {**presets[name], **overrides, "preset_name": name}
        return cls(**values)

    PRESETS = ("tshsr", "flat", "t2i", "i2t", "sgr", "saf", "dual")

    # ------------------------------------------------------------------------------------------
    def stream_level_weights(self, stream: str) -> tuple[float, ...]:
        """``stream``'s fixed level weights (`levels` order): the shared set, or its own (one set per stream)."""
        weights, n = tuple(self.level_weights or ()), len(self.levels)
        if len(weights) == n * len(self.streams) and len(self.streams) > 1:
            start = n * list(self.streams).index(stream)
            return weights[start:start + n]
        return weights

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        if data["backbone_sha256"] is None:  # nothing to pin: config.json stays as older versions wrote it
            del data["backbone_sha256"]
        # off: config.json (and its hash) as older versions wrote it
        for flag in ("context_skip", "context_gate", "context_relations", "word_salience", "separate_streams",
                     "readout_mean", "text_finetune_layers"):
            if not data[flag]:
                del data[flag]
        if data["context_pooling"] == "learned":
            del data["context_pooling"]
        if data["level_weights"] is None:
            del data["level_weights"]
        for name in ("image_context_stage", "image_context_dim", "text_context_layer"):
            if data[name] is None:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TSHSRConfig":
        data = dict(data)
        if data.get("extra", None) == {}:  # a field of older versions, always empty: dropped
            del data["extra"]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config.json has unknown fields {unknown}; was it written by a newer tshsr?")
        return cls(**data)

    def fingerprint(self) -> str:
        """Short stable hash of the whole configuration (encodings and caches are keyed on it)."""
        import hashlib

        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def load(cls, directory: str | Path) -> "TSHSRConfig":
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"No config.json in {directory}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _check_own_context_features(config: TSHSRConfig, bad) -> None:
    """image_context_stage and text_context_layer: features of the context level's own, one side each."""
    if config.image_context_stage is not None:
        if config.image_encoder != "timm" or "context" not in config.levels or config.image_context_stage < 0:
            bad("image_context_stage feeds an earlier stage of a timm backbone (an index >= 0) to the context "
                "level; it needs image_encoder='timm' and the context level")
        if "i2t" not in config.streams:
            bad("image_context_stage changes the image context units, which only the image-to-text stream "
                "reads (its queries); it needs the 'i2t' stream")
    if config.text_context_layer is not None:
        if config.text_encoder != "transformers" or config.finetune_text or "context" not in config.levels:
            bad("text_context_layer feeds a frozen layer of a transformers text encoder to the context level; "
                "it needs text_encoder='transformers' (not finetune_text) and the context level")
        if config.text_context_layer < 0:
            bad(f"text_context_layer={config.text_context_layer}: a layer index >= 0 (0: the token embeddings)")
        if "t2i" not in config.streams:
            bad("text_context_layer changes the caption context units, which only the text-to-image stream "
                "reads (its queries); it needs the 't2i' stream")
