"""Training loop behind ``train.py``: cached frozen features or end-to-end fine-tuning,
mined hard negatives, crash-safe checkpoints and exact resume, optional multi-process (gloo/nccl).

Layout of an output folder::

    OUT/config.json, model.safetensors, README.md   the best model so far (loadable any time)
    OUT/checkpoint/                                 last training state, for --resume
    OUT/log.jsonl                                   one JSON line per logged step and epoch
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .config import TSHSRConfig
from .losses import contrastive_loss, hinge_loss, mine_candidates
from .model import TSHSRModel
from .processing import Vocabulary


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


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
    contrastive_weight: float = 1.0
    finetune_text: bool = False
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
    num_workers: int = 0
    resume: bool = False
    push_to_hub: str | None = None
    progress: bool = True
    threads: int | None = None
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _setup_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)


def _resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def build_config(args: TrainArgs, vocabulary: Vocabulary | None) -> TSHSRConfig:
    overrides = dict(embed_dim=args.embed_dim, sim_dim=args.sim_dim, image_backbone=args.image_backbone,
                     image_weights=args.image_weights, text_model=args.text_model, text_encoder=args.text_encoder,
                     finetune_text=args.finetune_text, finetune_image=args.finetune_image,
                     stream_fusion=args.stream_fusion, level_fusion=args.level_fusion)
    if args.dataset == "precomp":
        overrides.update(image_encoder="precomputed", image_feature_dim=args.image_feature_dim or 2048)
    if args.text_encoder == "bigru":
        overrides.update(vocab_size=len(vocabulary))
    return TSHSRConfig.preset(args.preset, **overrides)


class BatchSource:
    """Backbone features of a split for training: from the feature cache when the backbone is
    frozen, computed live (with gradients) when it is fine-tuned."""

    def __init__(self, model: TSHSRModel, split, cache_dir: str, progress: bool):
        self.model, self.split = model, split
        cfg = model.config
        self.live_images = cfg.finetune_image
        self.live_texts = cfg.finetune_text or cfg.text_encoder == "bigru"
        self.cached = None
        if not (self.live_images and self.live_texts):
            from .features import cache_features

            images = split.regions if split.regions is not None else split.images()
            rank, world = _dist_info()
            # One process writes the cache; the others wait and then open the finished entry.
            for turn in ([0, 1] if world > 1 else [0]):
                if (rank == 0) == (turn == 0):
                    self.cached = cache_features(model, images, split.captions, split.image_ids,
                                                 split.caption_image, cache_dir, progress=progress and rank == 0)
                if world > 1:
                    dist.barrier()

    def images(self, index, device):
        if self.live_images:
            if self.split.regions is not None:
                return self.model.image_features(self.split.regions[np.asarray(index)])
            return self.model.image_features(self.split.images(list(map(int, index))))
        return self.cached.image_batch(index, device)

    def texts(self, index, device):
        if self.live_texts:
            return self.model.text_features([self.split.captions[int(i)] for i in index])
        return self.cached.text_batch(index, device)


# ----------------------------------------------------------------------------------------------
def compute_loss(model: TSHSRModel, images, image_mask, texts, text_mask, positive, args: TrainArgs,
                 hardest: bool, generator: torch.Generator):
    img = model.encode_image_features(images, image_mask)
    txt = model.encode_text_features(texts, text_mask)
    similarity = model.global_similarity(img, txt)
    scale = model.logit_scale.exp().clamp(max=100.0)
    parts = {"contrastive": contrastive_loss(similarity, positive, scale)}
    loss = args.contrastive_weight * parts["contrastive"]
    if model.config.head != "dual":
        candidate = _mine(model, img, txt, similarity, positive, args, generator)
        pi, pt = candidate.nonzero(as_tuple=True)
        out = model.score_pairs(img, txt, pi, pt)

        def hinge(values):
            full = similarity.new_zeros(similarity.shape).index_put((pi, pt), values)
            return hinge_loss(full, positive, candidate, args.margin, hardest)

        parts["hinge"] = hinge(out.scores)
        loss = loss + parts["hinge"]
        if len(out.stream_scores) > 1 and args.aux_stream_weight > 0:
            parts["aux_streams"] = sum(hinge(v) for v in out.stream_scores.values()) / len(out.stream_scores)
            loss = loss + args.aux_stream_weight * parts["aux_streams"]
        if len(out.level_scores) > 1 and args.aux_level_weight > 0:
            parts["aux_levels"] = sum(hinge(v) for v in out.level_scores.values()) / len(out.level_scores)
            loss = loss + args.aux_level_weight * parts["aux_levels"]
        parts["pairs"] = torch.tensor(float(len(pi)))
    return loss, parts


def _mine(model: TSHSRModel, img, txt, similarity, positive, args: TrainArgs, generator) -> torch.Tensor:
    """Candidate pairs for the hinge: positives, hard negatives and random ones.

    With ``mine_pool`` the cosine only proposes (its ``mine_pool`` nearest per image and per
    caption) and the full model, without gradients, picks the ``hard_negatives`` it finds
    hardest among them: the cross-attention parts then learn from their own mistakes instead of
    the cosine's.
    """
    if args.mine_pool <= 0 or args.hard_negatives < 0:
        return mine_candidates(similarity, positive, args.hard_negatives, args.random_negatives, generator)
    pool = mine_candidates(similarity, positive, args.mine_pool, 0)
    pi, pt = pool.nonzero(as_tuple=True)
    with torch.no_grad():
        scores = model.score_pairs(img, txt, pi, pt).scores.float()
    model_similarity = similarity.detach().new_full(similarity.shape, float("-inf")).index_put((pi, pt), scores)
    candidate = mine_candidates(model_similarity, positive, args.hard_negatives, args.random_negatives, generator)
    return candidate


def _lr_factor(args: TrainArgs, epoch_float: float) -> float:
    if args.lr_schedule == "step":
        return 0.1 ** int(epoch_float // args.lr_update) if args.lr_update > 0 else 1.0
    if args.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, epoch_float / max(1, args.epochs))))
    return 1.0


# Scalar mixing weights (level and stream weights, the cosine mix) get a larger learning rate:
# at the head's 2e-4 they barely move in a short run and stay near their initial values.
FUSION_PARAMETERS = ("level_logits", "stream_logits", "cosine_mix")


def _param_groups(model: TSHSRModel, args: TrainArgs):
    head, image, text, fusion = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.rsplit(".", 1)[-1] in FUSION_PARAMETERS:
            fusion.append(p)
        elif name.startswith("image_backbone."):
            image.append(p)
        elif name.startswith("text_backbone.") and model.config.text_encoder == "transformers":
            text.append(p)
        else:
            head.append(p)
    groups = [{"params": head, "lr": args.lr, "base_lr": args.lr}]
    if fusion:
        lr = args.lr * args.fusion_lr_mult
        groups.append({"params": fusion, "lr": lr, "base_lr": lr})
    if image:
        groups.append({"params": image, "lr": args.lr * args.image_lr_mult, "base_lr": args.lr * args.image_lr_mult})
    if text:
        groups.append({"params": text, "lr": args.lr * args.text_lr_mult, "base_lr": args.lr * args.text_lr_mult})
    return groups


# ----------------------------------------------------------------------------------------------
# Checkpoints: a folder written beside the old one and swapped in by renames.
def save_checkpoint(directory: Path, model: TSHSRModel, optimizer, state: dict) -> None:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    trainable = {k: v.cpu() for k, v in model.saved_state_dict().items()}
    save_file(trainable, str(tmp / "weights.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "state": state,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "numpy": _numpy_state()}},
               tmp / "training_state.pt")
    (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    if model.vocabulary is not None:
        model.vocabulary.save(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _numpy_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
            "has_gauss": has_gauss, "cached": cached}


def _set_numpy_state(s):
    np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))


def find_checkpoint(output_dir: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old survives a crash between the two renames
        candidate = output_dir / name
        if (candidate / "training_state.pt").is_file() and (candidate / "weights.safetensors").is_file():
            return candidate
    return None


def load_checkpoint(directory: Path, model: TSHSRModel, optimizer) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(directory / "weights.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    frozen = tuple(model._frozen_prefixes())
    missing = [k for k in missing if not k.startswith(frozen)]
    if missing or unexpected:
        raise RuntimeError(f"Checkpoint {directory} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    blob = torch.load(directory / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"]["torch"])
    random.setstate(_to_tuple(blob["rng"]["python"]))
    _set_numpy_state(blob["rng"]["numpy"])
    return blob["state"]


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------------------
def _display_path(directory: Path) -> str:
    """The folder as a user would type it: relative to the working directory when inside it."""
    try:
        return str(Path(directory).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(directory)


def _data_name(args: TrainArgs) -> str:
    """The dataset as a reader knows it: a local folder's name beside its format."""
    if args.dataset in ("imagefolder", "precomp") and args.data_dir:
        return f"{Path(args.data_dir).name} ({args.dataset})"
    return args.dataset


def write_model_card(directory: Path, args: TrainArgs, metrics: dict | None, history: list) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    lines = [
        "---", "library_name: tshsr", "license: mit", "tags:", "- image-text-matching",
        "- cross-modal-retrieval", "- tshsr", "---", "",
        f"# TSHSR ({cfg.get('preset_name') or cfg['head']}) trained on {_data_name(args)}", "",
        "Two-stream Hierarchical Similarity Reasoning for image-text matching "
        "(the `tshsr` library). Load with:", "",
        "```python", "from tshsr import TSHSRModel",
        f'model = TSHSRModel.from_pretrained("{args.push_to_hub or _display_path(directory)}")',
        'out = model.score(["photo.jpg"], ["a dog runs on the beach"])', "```", "",
        "## Training", "",
        f"- data: `{_data_name(args)}` split `{args.train_split}`"
        + (f" (first {args.max_train_images} images)" if args.max_train_images else ""),
        f"- image backbone: `{cfg['image_backbone'] if cfg['image_encoder'] == 'timm' else 'precomputed regions'}`"
        f" ({'fine-tuned' if cfg['finetune_image'] else 'frozen'}), text encoder: `{cfg['text_model']}`"
        f" ({'fine-tuned' if cfg['finetune_text'] else 'frozen'})",
        f"- D = {cfg['embed_dim']}, m = {cfg['sim_dim']}, epochs {args.epochs}, batch {args.batch_size}, "
        f"lr {args.lr} ({args.lr_schedule}), seed {args.seed}",
        "- frozen pretrained backbones are not stored here; they are resolved by name when loading "
        "(offline PyPI packages first).", "",
    ]
    if metrics:
        lines += [f"## Validation ({_data_name(args)} `{args.val_split}`, {metrics.get('n_images')} images, "
                  f"{metrics.get('n_captions')} captions, {metrics.get('protocol', '')})", "",
                  "| i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM |", "|---|---|---|---|---|---|---|",
                  "| {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} |".format(
                      metrics["i2t"]["r1"], metrics["i2t"]["r5"], metrics["i2t"]["r10"],
                      metrics["t2i"]["r1"], metrics["t2i"]["r5"], metrics["t2i"]["r10"], metrics["rsum"]), ""]
    if history:
        best = max(history, key=lambda h: h["rsum"])["epoch"]
        lines += ["Validation RSUM by epoch: " + ", ".join(
            f"{h['epoch']}: {h['rsum']:.1f}" + (" (best, kept)" if h["epoch"] == best else "") for h in history), ""]
    (directory / "README.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_source(model: TSHSRModel, source: BatchSource, device):
    """Encode every image and caption of a split from its (cached) backbone features."""
    from .model import ImageEncoding, TextEncoding

    split = source.split
    img_parts, txt_parts = [], []
    for start in range(0, len(split), 128):
        idx = np.arange(start, min(start + 128, len(split)))
        img_parts.append(model.encode_image_features(*source.images(idx, device)))
    for start in range(0, len(split.captions), 512):
        idx = np.arange(start, min(start + 512, len(split.captions)))
        txt_parts.append(model.encode_text_features(*source.texts(idx, device)))
    return ImageEncoding.cat(img_parts), TextEncoding.cat(txt_parts)


@torch.no_grad()
def validate(model: TSHSRModel, source: BatchSource, rerank_k: int | None, device, progress: bool) -> dict:
    from .evaluate import score_split

    model.eval()
    split = source.split
    images, texts = encode_source(model, source, device)
    t0 = time.time()
    metrics = score_split(model, images, texts, split.caption_image, rerank_k=rerank_k, progress=progress).metrics()
    metrics.update(n_images=len(split), n_captions=len(split.captions), seconds=round(time.time() - t0, 2),
                   protocol="exhaustive" if rerank_k is None else f"global shortlist + rerank top-{rerank_k}")
    model.train()
    return metrics


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def run(args: TrainArgs) -> Path:
    """Train; returns the output folder holding the best model."""
    from .data import load_split

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    _setup_distributed(device)
    rank, world = _dist_info()
    main = rank == 0
    out = Path(args.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    checkpoint = find_checkpoint(out) if args.resume else None
    if not args.resume and find_checkpoint(out) is not None:
        raise SystemExit(f"{out} already holds a training run; pass --resume to continue it or choose "
                         f"another --output-dir")

    random.seed(args.seed + rank), np.random.seed(args.seed + rank), torch.manual_seed(args.seed + rank)
    train_split = load_split(args.dataset, args.train_split, data_dir=args.data_dir, image_root=args.image_root,
                             max_images=args.max_train_images)
    val_split = load_split(args.dataset, args.val_split, data_dir=args.data_dir, image_root=args.image_root,
                           max_images=args.max_val_images) if args.val_split else None

    vocabulary = None
    if args.text_encoder == "bigru":
        vocabulary = Vocabulary.load(checkpoint) if checkpoint else Vocabulary.build(train_split.captions)
    config = build_config(args, vocabulary)
    model = TSHSRModel(config, vocabulary=vocabulary).to(device)
    model.train()
    train_source = BatchSource(model, train_split, args.cache_dir, args.progress and main)
    val_source = BatchSource(model, val_split, args.cache_dir, args.progress and main) if val_split else None

    optimizer = torch.optim.Adam(_param_groups(model, args), lr=args.lr)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_rsum": -1.0, "history": []}
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        if main:
            print(f"Resumed from {checkpoint}: epoch {state['epoch']}, step {state['global_step']}", flush=True)

    if world > 1:  # every process starts from rank 0's weights (inits differ: seeds are per rank)
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor, 0)

    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device.type == "cuda")

    n_captions = len(train_split.captions)
    steps_per_epoch = max(1, n_captions // (args.batch_size * world))
    caption_image = torch.as_tensor(np.asarray(train_split.caption_image))
    log_path = out / "log.jsonl"
    params = [p for p in model.parameters() if p.requires_grad]

    def snapshot():
        save_checkpoint(out / "checkpoint", model, optimizer, state)

    done = False
    while state["epoch"] < args.epochs and not done:
        epoch = state["epoch"]
        order = torch.randperm(n_captions, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        bar = tqdm(total=steps_per_epoch, initial=state["step_in_epoch"], desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=not (args.progress and main), unit="step", dynamic_ncols=True)
        t_last, pairs_seen = time.time(), 0
        while state["step_in_epoch"] < steps_per_epoch:
            step = state["step_in_epoch"]
            start = (step * world + rank) * args.batch_size
            captions = order[start:start + args.batch_size]
            images = caption_image[captions]
            unique, inverse = torch.unique(images, return_inverse=True)
            positive = (unique.unsqueeze(1) == images.unsqueeze(0)).to(device)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * _lr_factor(args, epoch + step / steps_per_epoch)
            gen = torch.Generator().manual_seed(args.seed * 7_919 + state["global_step"] * world + rank)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                regions, region_mask = train_source.images(unique.numpy(), device)
                tokens, token_mask = train_source.texts(captions.numpy(), device)
                loss, parts = compute_loss(model, regions.to(device), region_mask.to(device), tokens.to(device),
                                           token_mask.to(device), positive, args,
                                           hardest=epoch >= args.warmup_epochs, generator=gen)
            if not torch.isfinite(loss):
                msg = (f"Loss became {loss.item()} at epoch {epoch + 1}, step {step}: training stopped. "
                       f"The last good checkpoint is in {out / 'checkpoint'}; lower --lr or check the data.")
                raise TrainingDiverged(msg)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if world > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= world
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip) if args.grad_clip > 0 else None
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                model.logit_scale.clamp_(max=math.log(100.0))
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            pairs_seen += int(parts.get("pairs", torch.tensor(0.0)).item()) or len(captions) * len(unique)
            bar.update(1)
            if args.max_steps is not None and state["global_step"] >= args.max_steps:
                done = True
            if main and (state["global_step"] % args.log_every == 0 or state["step_in_epoch"] == steps_per_epoch
                         or done):
                elapsed = max(time.time() - t_last, 1e-6)
                record = {"epoch": epoch + 1, "step": state["global_step"], "loss": round(loss.item(), 5),
                          **{k: round(float(v.detach()), 5) for k, v in parts.items()},
                          "lr": optimizer.param_groups[0]["lr"], "pairs_per_s": round(pairs_seen * world / elapsed, 1),
                          "grad_norm": None if grad_norm is None else round(float(grad_norm), 4), "time": time.time()}
                _log(log_path, record)
                bar.set_postfix(loss=f"{loss.item():.4f}", pairs_s=f"{record['pairs_per_s']:.0f}")
                t_last, pairs_seen = time.time(), 0
            if main and (state["global_step"] % args.checkpoint_every == 0 or done):
                snapshot()
            if done:
                break
        bar.close()
        if done and state["step_in_epoch"] < steps_per_epoch:
            break
        # ---- end of epoch: validate, keep the best ----
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        if main:
            metrics = validate(model, val_source, args.val_rerank_k, device, args.progress) if val_source else None
            record = {"epoch": state["epoch"], "validation": metrics, "time": time.time()}
            _log(log_path, record)
            if metrics is not None:
                print(f"epoch {state['epoch']}: i2t R@1/5/10 {metrics['i2t']['r1']:.1f}/{metrics['i2t']['r5']:.1f}/"
                      f"{metrics['i2t']['r10']:.1f}  t2i {metrics['t2i']['r1']:.1f}/{metrics['t2i']['r5']:.1f}/"
                      f"{metrics['t2i']['r10']:.1f}  RSUM {metrics['rsum']:.1f}", flush=True)
                state["history"].append({"epoch": state["epoch"], "rsum": metrics["rsum"]})
            if metrics is None or metrics["rsum"] > state["best_rsum"]:
                state["best_rsum"] = metrics["rsum"] if metrics else state["best_rsum"]
                model.save_pretrained(out)
                (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
                write_model_card(out, args, metrics, state["history"])
            snapshot()
        if world > 1:
            dist.barrier()
    if main and not (out / "model.safetensors").exists():
        model.save_pretrained(out)  # a --max-steps run that never reached the end of an epoch
        write_model_card(out, args, None, state["history"])
    if main:
        best_metrics = out / "metrics.json"
        if best_metrics.exists() and state["history"]:  # the card of the kept model, with every epoch's RSUM
            kept = json.loads(best_metrics.read_text())
            if kept:
                write_model_card(out, args, kept, state["history"])
        (out / "train_args.json").write_text(json.dumps(asdict(args), indent=2))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out
