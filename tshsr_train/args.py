"""Training settings: :class:`TrainArgs` (saved as train_args.json beside a run) and the
command line that fills it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from tshsr.config import TSHSRConfig
from tshsr.loss import LossSettings

USAGE = """Train a TSHSR model (or an ablation) on Flickr30K, MSCOCO, a local image folder or SCAN
precomputed features.

Examples:
  # CPU, frozen backbones with cached features (the default model of checkpoints/):
  python train.py --dataset imagefolder --data-dir ../shared/data/flickr8k --output-dir runs/f8k
  # GPU, Flickr30K from the Hub, fine-tuning the text encoder, pushed to the Hub at the end:
  python train.py --dataset flickr30k --split-val val --finetune-text --push-to-hub you/tshsr-f30k
  # Paper setting: 36 x 2048 bottom-up features, BiGRU text encoder:
  python train.py --dataset precomp --data-dir data/f30k_precomp --text-encoder bigru \\
      --embed-dim 1024 --sim-dim 256 --epochs 40 --lr-update 30
  # Several GPUs, one process each (DDP; CPU processes use gloo), --batch-size per process:
  torchrun --nproc_per_node 4 train.py --dataset flickr30k --split-val val --finetune-text --output-dir runs/f30k-4gpu
  # After a crash, continue exactly where the last checkpoint was written (the model's settings
  # come from the checkpoint; a model flag given with another value is refused):
  python train.py ... --resume
"""


# The settings that make a training recipe (beside data, budget and machine): the model card lists
# those a run changed.
RECIPE_FIELDS = ("warmup_epochs", "margin", "grad_clip", "hard_negatives", "random_negatives", "aux_stream_weight",
                 "aux_level_weight", "mine_pool", "stream_fusion", "level_fusion", "level_weights", "level_cosine", "context_skip", "context_gate", "context_relations",
                 "image_context_stage", "text_context_layer",
                 "context_units", "context_pooling", "word_salience", "separate_streams", "readout_mean", "alignment_weight", "alignment_joint",
                 "alignment_chunk",
                 "context_detach", "alignment_levels", "alignment_complement", "unit_dropout", "augment_views", "context_path_dropout",
                 "context_gain_weight", "contrastive_weight", "finetune_text", "text_finetune_layers", "finetune_image", "text_lr_mult", "image_lr_mult",
                 "fusion_lr_mult")


@dataclass
class TrainArgs:
    dataset: str = "imagefolder"
    data_dir: str | None = None
    image_root: str | None = None
    train_split: str = "train"
    val_split: str = "validation"
    max_train_images: int | None = None
    max_val_images: int | None = 1000
    output_dir: str = "runs/tshsr"
    cache_dir: str = "cache/features"
    channels_last: bool = False  # the image backbone runs channels-last while caching (faster on CPU)
    preset: str = "tshsr"
    embed_dim: int = 256
    sim_dim: int = 128
    image_backbone: str = "tf_efficientnet_lite0"
    image_weights: str | None = None
    text_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    text_encoder: str = "transformers"
    image_feature_dim: int | None = None
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-4
    lr_schedule: str = "step"  # "step" (SGRAF: x0.1 at lr_update) or "cosine" or "constant"
    lr_update: int = 6
    warmup_epochs: int = 1  # sum of violations before switching to the hardest negative
    margin: float = 0.2
    grad_clip: float = 2.0
    hard_negatives: int = 3  # per image and per caption, mined by global similarity; -1 = all pairs
    random_negatives: int = 1
    aux_stream_weight: float = 0.5
    aux_level_weight: float = 0.0  # hinge on each stream/level score alone, so every part is a matcher
    mine_pool: int = 0  # >0: the full model picks the hard negatives among this many cosine candidates
    stream_fusion: str = "learned"
    level_fusion: str = "learned"
    level_weights: list | None = None  # --level-fusion fixed: a weight per level of the preset
    level_cosine: bool = False  # local/context levels also carry SCAN's alignment (attended cosine)
    separate_streams: bool = False  # each stream its own towers (projections, pooling, embedding)
    readout_mean: bool = False  # each level's score: the mean of its readouts before and after reasoning
    word_salience: bool = False  # a learned salience per word in each stream's attention / alignment
    context_gate: bool = False  # the context path's messages scaled by a learned gate, zero at first
    context_relations: bool = False  # the context nodes reason over each other (SGR's relation step)
    image_context_stage: int | None = None  # the context level reads this earlier backbone stage (feature_info index)
    text_context_layer: int | None = None  # the context level reads this frozen text encoder layer (0: embeddings)
    context_skip: bool = False  # reasoning also links local and global directly (context beside, not between)
    context_units: list | None = None  # [image, text] context units (None: the preset's 6 and 4)
    context_pooling: str = "learned"  # context units: "learned" soft groups or fixed "windows"
    alignment_weight: float = 0.0  # InfoNCE on each level's alignment score, within groups of captions
    alignment_joint: float = 0.0  # InfoNCE on the mean of the cosine and every alignment score
    alignment_chunk: int = 32
    context_detach: bool = False  # the context level trains without gradient into the unit vectors
    alignment_levels: str = "all"  # "local": the InfoNCE skips the context level's alignment
    alignment_complement: float = 0.0  # InfoNCE on each stream's alignment + the other's (no gradient)
    contrastive_weight: float = 1.0
    unit_dropout: float = 0.0  # training only: each region and word is hidden with this probability
    augment_views: int = 0  # training only: cached augmented views per image (mirror, then crops)
    context_path_dropout: float = 0.0  # training only: a step runs with the context level cut from the reasoning
    context_gain_weight: float = 0.0  # hinge on the full score minus the score with the context level cut
    finetune_text: bool = False
    text_finetune_layers: int = 0  # train the top N layers of the text encoder on cached lower layers
    finetune_image: bool = False
    text_lr_mult: float = 0.1
    image_lr_mult: float = 0.1
    fusion_lr_mult: float = 50.0
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or fp32 / bf16 / fp16
    device: str = "auto"
    seed: int = 0
    max_steps: int | None = None
    hf_dataset: str | None = None  # any Hub image-caption repo (tshsr.hub_data)
    hf_revision: str | None = None
    columns: str | None = None  # "image=...,caption=...,split=..." for --hf-dataset
    streaming: bool = False  # stream the Hub set, materialising only max_*_images
    checkpoint_every: int = 50  # steps
    log_every: int = 10
    val_rerank_k: int | None = 20
    num_workers: int = 0  # DataLoader workers for live (fine-tuned) image batches
    dist_timeout_min: float = 60.0  # process-group timeout: rank 0 may cache features while the others wait
    resume: bool = False
    push_to_hub: str | None = None
    progress: bool = True
    threads: int | None = None
    extra: dict = field(default_factory=dict)  # free-form notes of a run, kept in train_args.json
    # The fields the command line set explicitly (parse_args fills it): --resume compares only
    # these with the checkpoint's model, so a flag left at its default is never a change.
    given: list = field(default_factory=list, compare=False)

    def given_fields(self) -> set[str]:
        """Fields set on purpose: the explicit flags, or (built in code) those off their defaults."""
        if self.given:
            return set(self.given)
        defaults = TrainArgs()
        return {f for f in self.__dataclass_fields__ if f not in ("given", "extra")
                and getattr(self, f) != getattr(defaults, f)}

    def budget_text(self) -> str:
        """Epochs, batch, learning rate and its schedule, seed: the model card's budget line."""
        decays = self.lr_schedule == "step" and 0 < self.lr_update < self.epochs
        decay = f", x0.1 after epoch {self.lr_update}" if decays else ""
        return (f"epochs {self.epochs}, batch {self.batch_size}, lr {self.lr} ({self.lr_schedule}{decay}), "
                f"seed {self.seed}")

    def recipe_flags(self) -> list[str]:
        """The loss, fusion and fine-tuning flags that differ from the trainer's defaults, as the
        command line would give them (the model card's recipe line)."""
        defaults, flags = TrainArgs(), []
        for name in RECIPE_FIELDS:
            value = getattr(self, name)
            if value == getattr(defaults, name):
                continue
            flag = "--" + name.replace("_", "-")
            flags += ([flag] if value is True  # every switch here defaults to off
                      else [flag, *map(str, value)] if isinstance(value, (list, tuple)) else [flag, str(value)])
        return flags

    def loss_settings(self) -> LossSettings:
        """The loss weights and negative mining of these settings (fields of the same names)."""
        return LossSettings.from_args(self)


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _add_optimisation_flags(p: argparse.ArgumentParser, d: TrainArgs) -> None:
    """The optimisation and loss flags (their own function: the parser stays readable)."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--lr-schedule", default=d.lr_schedule, choices=["step", "cosine", "constant"])
    g.add_argument("--lr-update", type=int, default=d.lr_update, help="step schedule: epoch of the x0.1 decay")
    g.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs,
                   help="epochs summing all violations before hardest-negative hinge")
    g.add_argument("--margin", type=float, default=d.margin)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip)
    g.add_argument("--hard-negatives", type=int, default=d.hard_negatives,
                   help="negatives per image and per caption mined by global similarity (-1: all pairs)")
    g.add_argument("--random-negatives", type=int, default=d.random_negatives)
    g.add_argument("--aux-stream-weight", type=float, default=d.aux_stream_weight,
                   help="weight of a hinge on each stream's own score")
    g.add_argument("--aux-level-weight", type=float, default=d.aux_level_weight,
                   help="weight of a hinge on each stream/level score alone (every part a matcher)")
    g.add_argument("--mine-pool", type=int, default=d.mine_pool,
                   help="cosine proposes this many negatives per image and caption, the full model keeps "
                        "the --hard-negatives it finds hardest (0: the cosine picks them)")
    g.add_argument("--contrastive-weight", type=float, default=d.contrastive_weight)
    g.add_argument("--alignment-weight", type=float, default=d.alignment_weight,
                   help="weight of an InfoNCE on each level's alignment score (with --level-cosine)")
    g.add_argument("--alignment-joint", type=float, default=d.alignment_joint,
                   help="weight of an InfoNCE on the mean of the cosine and every alignment score (the parts "
                        "trained as one ranker; with --level-cosine)")
    g.add_argument("--alignment-chunk", type=int, default=d.alignment_chunk,
                   help="captions per alignment InfoNCE group (each against its own captions' images)")
    g.add_argument("--alignment-levels", default=d.alignment_levels, choices=["all", "local"],
                   help="levels whose alignment score the InfoNCE trains (local: not the context level's, "
                        "so context pooling does not pull on the unit vectors through it)")
    g.add_argument("--alignment-complement", type=float, default=d.alignment_complement,
                   help="weight of an InfoNCE on each stream's alignment score plus the other stream's at the same "
                        "level (the other without gradient): each stream learns where the other ranks wrong")
    g.add_argument("--unit-dropout", type=_probability, default=d.unit_dropout,
                   help="training only: hide each image region and each word from the model with this probability "
                        "(a fresh draw every step; each item keeps at least one): feature-level augmentation "
                        "of the cached features")
    g.add_argument("--augment-views", type=_count, default=d.augment_views, metavar="N",
                   help="training only: cache N more views of every training image (1: mirrored left to right; "
                        "2 and up: crops of 50-100%% of the area) and show each step every image as one of them or "
                        "as itself, drawn at random; an image whose captions say left or right is never mirrored. "
                        "Costs one caching pass a view, none a step; needs a frozen timm image backbone")
    g.add_argument("--context-path-dropout", type=_probability, default=d.context_path_dropout,
                   help="training only: with this probability a step runs with the context level cut out of the "
                        "reasoning graph (the global and local nodes do not read it; drawn per step): the other "
                        "levels learn to work without it, like stochastic depth")
    g.add_argument("--context-gain-weight", type=float, default=d.context_gain_weight,
                   help="weight of a hinge on what the context path adds to each mined pair's score (the full score "
                        "minus the score with the context level cut from the reasoning): its contribution is trained "
                        "to rank by itself; costs a second scoring of the mined pairs")
    g.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp16"])
    g.add_argument("--device", default=d.device)
    g.add_argument("--threads", type=int, default=d.threads, help="CPU threads (torch.set_num_threads)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--dist-timeout-min", type=float, default=d.dist_timeout_min,
                   help="minutes a process waits for the others (torchrun), e.g. while rank 0 caches features")


def _add_tuning_flags(p: argparse.ArgumentParser, d: TrainArgs) -> None:
    g = p.add_argument_group("encoder tuning and learning-rate multipliers")
    g.add_argument("--finetune-text", action="store_true")
    g.add_argument("--text-finetune-layers", type=int, default=d.text_finetune_layers, metavar="N",
                   help="train the top N layers of the transformers text encoder (at --text-lr-mult x the rate) "
                        "on cached hidden states of the frozen layers below: almost the cost of a frozen encoder; "
                        "the trained layers are stored in the checkpoint (default 0: all frozen)")
    g.add_argument("--finetune-image", action="store_true")
    g.add_argument("--text-lr-mult", type=float, default=d.text_lr_mult)
    g.add_argument("--image-lr-mult", type=float, default=d.image_lr_mult)
    g.add_argument("--fusion-lr-mult", type=float, default=d.fusion_lr_mult,
                   help="learning-rate multiplier of the level/stream mixing weights")


def _add_context_flags(g, d) -> None:
    """The model flags of the context level (in the "model" group)."""
    g.add_argument("--context-skip", action="store_true",
                   help="the reasoning graph also links the local and global levels directly, so the context "
                        "level is a path beside local -> global instead of the only one")
    g.add_argument("--context-gate", action="store_true",
                   help="with --context-skip: the context level's messages to the global and local nodes are scaled "
                        "by one learned gate per stream, zero at first (the reasoning starts as the graph without "
                        "the context level and opens the path only as far as training finds it useful)")
    g.add_argument("--context-relations", action="store_true",
                   help="the context nodes reason over each other (SGR's relation step, residual) in every "
                        "reasoning step, so the context level carries relations between phrases and "
                        "neighbourhoods, not only their means")
    g.add_argument("--image-context-stage", type=int, default=d.image_context_stage, metavar="INDEX",
                   help="the context level reads its own image features: this earlier stage of the timm backbone "
                        "(an index into its feature_info; 3 on EfficientNet = stride 16), pooled onto the last grid "
                        "and projected on its own, instead of window means of the local level's region vectors "
                        "(read by the image-to-text stream, whose queries they are)")
    g.add_argument("--text-context-layer", type=int, default=d.text_context_layer, metavar="LAYER",
                   help="the context level reads its own caption features: the hidden states after this frozen "
                        "layer of the transformers text encoder (0: the token embeddings; 3 on MiniLM-L6 = its "
                        "middle), cached apart and projected on their own, instead of window means of the local "
                        "level's word vectors (read by the text-to-image stream, whose queries they are)")
    g.add_argument("--context-units", type=int, nargs=2, metavar=("IMAGE", "TEXT"), default=d.context_units,
                   help="context units (learned soft groups) over regions and over words (default: 6 and 4)")
    g.add_argument("--context-pooling", choices=("learned", "windows"), default=d.context_pooling,
                   help="how a context unit groups its units: learned soft groups (a query per unit) or fixed "
                        "overlapping windows (phrase windows along the caption, neighbourhoods on the image grid; "
                        "the image count must then be a square: --context-units 9 4)")
    g.add_argument("--context-detach", action="store_true",
                   help="training only: the context level reads the unit vectors without gradient, so it "
                        "trains its own queries and nodes but never pulls on the units the local level aligns")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``train.py`` / ``tshsr-train``: one flag per :class:`TrainArgs` field."""
    d = TrainArgs()
    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, choices=["imagefolder", "flickr8k", "flickr30k", "coco", "precomp"])
    g.add_argument("--data-dir", default=d.data_dir, help="local folder (imagefolder, save_to_disk copy, precomp)")
    g.add_argument("--image-root", default=d.image_root, help="COCO image root (train2014/, val2014/)")
    g.add_argument("--split-train", dest="train_split", default=d.train_split)
    g.add_argument("--split-val", dest="val_split", default=d.val_split, help="'' to skip validation")
    g.add_argument("--max-train-images", type=int, default=d.max_train_images)
    g.add_argument("--max-val-images", type=int, default=d.max_val_images)
    g.add_argument("--cache-dir", default=d.cache_dir, help="feature cache for frozen backbones")
    g.add_argument("--channels-last", action="store_true",
                   help="cache image features with the CNN in channels-last memory layout: 1.6-1.9x faster on CPU, "
                        "the same features up to float rounding (kept in cache entries of their own, so a run with "
                        "it is not bit-identical to one without)")
    g.add_argument("--hf-dataset", default=d.hf_dataset, metavar="REPO",
                   help="any Hub image-caption dataset (script repos fall back to refs/convert/parquet)")
    g.add_argument("--hf-revision", default=d.hf_revision, help="branch, tag or commit of --hf-dataset")
    g.add_argument("--columns", default=d.columns,
                   help="column mapping, e.g. image=img,caption=sentences,split=split,image_id=cocoid")
    g.add_argument("--streaming", action="store_true",
                   help="stream --hf-dataset instead of downloading it (keeps only --max-*-images images)")
    g.add_argument("--num-workers", type=int, default=d.num_workers,
                   help="DataLoader workers decoding images for --finetune-image")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=d.preset, choices=list(TSHSRConfig.PRESETS))
    g.add_argument("--embed-dim", type=int, default=d.embed_dim, help="D")
    g.add_argument("--sim-dim", type=int, default=d.sim_dim, help="m")
    g.add_argument("--image-backbone", default=d.image_backbone, help="any timm model name")
    g.add_argument("--image-weights", default=d.image_weights, help="local weight file for the image backbone")
    g.add_argument("--image-feature-dim", type=int, default=d.image_feature_dim, help="precomp region size")
    g.add_argument("--text-encoder", default=d.text_encoder, choices=["transformers", "bigru"])
    g.add_argument("--text-model", default=d.text_model, help="transformers name or local folder")
    g.add_argument("--stream-fusion", default=d.stream_fusion, choices=["learned", "equal"],
                   help="stream weights: learned softmax, or fixed equal (cannot collapse)")
    g.add_argument("--level-fusion", default=d.level_fusion, choices=["learned", "equal", "fixed"],
                   help="level weights within a stream: learned softmax, fixed equal, or fixed as --level-weights")
    g.add_argument("--level-weights", type=float, nargs="+", default=d.level_weights, metavar="W",
                   help="with --level-fusion fixed: a weight per level of the preset, in its order (tshsr: local "
                        "context global), normalised to sum to 1 in each stream; or one such set per stream, i2t's "
                        "first (tshsr: 6 values); a level of weight 0 still feeds the reasoning")
    g.add_argument("--level-cosine", action="store_true",
                   help="the local and context levels also carry SCAN's alignment score (mean cosine of each "
                        "unit with what it attends to), as the global level carries the global cosine")
    g.add_argument("--readout-mean", action="store_true",
                   help="each level's score is the mean of its readouts before and after the reasoning steps "
                        "(the score averaged over reasoning depths 0 and --preset's steps), in training and at "
                        "test time; tshsr, t2i, i2t and flat only")
    g.add_argument("--separate-streams", action="store_true",
                   help="each stream has its own towers (projections, pooling and contrastive embedding of both "
                        "sides), so the two streams no longer read the same unit vectors; with --preset dual: "
                        "two dual encoders trained together, their cosines averaged")
    g.add_argument("--word-salience", action="store_true",
                   help="a learned salience per word: in i2t a prior on which words a region attends to, in t2i "
                        "the weight of each word's alignment (instead of every word, 'a' and 'the' included, alike)")
    _add_context_flags(g, d)
    _add_tuning_flags(p, d)
    _add_optimisation_flags(p, d)
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=d.output_dir)
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="stop after this many steps (smoke runs)")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--val-rerank-k", type=int, default=d.val_rerank_k,
                   help="validate by global shortlist + rerank top-K (0: exhaustive)")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint")
    g.add_argument("--push-to-hub", default=None, metavar="REPO_ID")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _given_dests(parser: argparse.ArgumentParser, argv: list[str] | None) -> list[str]:
    """The destinations of the flags present in ``argv`` (parsed again with every default suppressed)."""
    quiet = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_const"
                kwargs["const"] = action.const
            quiet.add_argument(*action.option_strings, **kwargs)
    return sorted(vars(quiet.parse_known_args(argv)[0]))


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    parser = build_parser()
    ns = parser.parse_args(argv)
    values = vars(ns)
    values["given"] = _given_dests(parser, argv)
    if values["dataset"] == "flickr8k":
        values["dataset"] = "imagefolder"
    if values["val_split"] == "":
        values["val_split"] = None
    if values["val_rerank_k"] == 0:
        values["val_rerank_k"] = None
    return TrainArgs(**values)
