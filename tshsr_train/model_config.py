"""The model a training run builds from its flags, and the check that ``--resume`` keeps it."""

from __future__ import annotations

from pathlib import Path

from tshsr.config import TSHSRConfig
from tshsr.processing import Vocabulary

from .args import TrainArgs


def build_config(args: TrainArgs, vocabulary: Vocabulary | None) -> TSHSRConfig:
    overrides = dict(embed_dim=args.embed_dim, sim_dim=args.sim_dim, image_backbone=args.image_backbone,
                     image_weights=args.image_weights, text_model=args.text_model, text_encoder=args.text_encoder,
                     finetune_text=args.finetune_text,
                     text_finetune_layers=args.text_finetune_layers, finetune_image=args.finetune_image,
                     stream_fusion=args.stream_fusion, level_fusion=args.level_fusion,
                     level_weights=tuple(args.level_weights) if args.level_weights else None,
                     level_cosine=args.level_cosine, context_skip=args.context_skip,
                     context_gate=args.context_gate, context_relations=args.context_relations,
                     word_salience=args.word_salience, separate_streams=args.separate_streams,
                     readout_mean=args.readout_mean,
                     context_pooling=args.context_pooling, image_context_stage=args.image_context_stage,
                     text_context_layer=args.text_context_layer)
    if args.context_units:
        overrides.update(context_units_image=args.context_units[0], context_units_text=args.context_units[1])
    if args.dataset == "precomp":
        overrides.update(image_encoder="precomputed", image_feature_dim=args.image_feature_dim or 2048)
    if args.text_encoder == "bigru":
        # (no vocabulary: a resumed transformers run checked against --text-encoder bigru)
        overrides.update(vocab_size=len(vocabulary) if vocabulary is not None else 1)
    return TSHSRConfig.preset(args.preset, **overrides)


# The model flags and the config fields each one decides (what --resume checks).
MODEL_FLAGS = {
    "preset": ("preset_name", "head", "streams", "levels", "reasoning_steps", "global_cosine"),
    "embed_dim": ("embed_dim",), "sim_dim": ("sim_dim",), "image_backbone": ("image_backbone",),
    "image_weights": ("image_weights",), "text_model": ("text_model",), "text_encoder": ("text_encoder",),
    "finetune_text": ("finetune_text",), "text_finetune_layers": ("text_finetune_layers",),
    "finetune_image": ("finetune_image",),
    "stream_fusion": ("stream_fusion",), "level_fusion": ("level_fusion",), "level_weights": ("level_weights",), "level_cosine": ("level_cosine",),
    "context_skip": ("context_skip",), "context_gate": ("context_gate",),
    "context_relations": ("context_relations",), "word_salience": ("word_salience",),
    "separate_streams": ("separate_streams",), "readout_mean": ("readout_mean",), "image_context_stage": ("image_context_stage",),
    "text_context_layer": ("text_context_layer",),
    "context_units": ("context_units_image", "context_units_text"), "context_pooling": ("context_pooling",),
    "image_feature_dim": ("image_feature_dim",), "dataset": ("image_encoder",),
}


def resumed_config(args: TrainArgs, checkpoint: Path, vocabulary: Vocabulary | None) -> TSHSRConfig:
    """The model configuration of a resumed run: the checkpoint's. A flag given on the command
    line that would build a different model is refused, naming the fields; flags left at their
    defaults are not compared (the run may have been started with other values)."""
    stored = TSHSRConfig.load(checkpoint)
    given = args.given_fields() & set(MODEL_FLAGS)
    if given:
        wanted = build_config(args, vocabulary)
        changes = []
        for flag in sorted(given):
            for name in MODEL_FLAGS[flag]:
                if name == "image_feature_dim" and stored.image_encoder != "precomputed":
                    continue  # filled in from the backbone, not from the flag
                old, new = getattr(stored, name), getattr(wanted, name)
                if old != new:
                    changes.append(f"{name} (checkpoint {old!r}, --{flag.replace('_', '-')} gives {new!r})")
        if changes:
            raise ValueError(f"--resume continues the model in {checkpoint}, whose configuration the command line "
                             f"would change: {'; '.join(changes)}. Drop those flags to resume, or start a new "
                             f"run in another --output-dir.")
    return stored
