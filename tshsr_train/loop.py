"""The training loop behind ``train.py`` / ``tshsr-train``: cached frozen features or end-to-end
fine-tuning, mined hard negatives, crash-safe checkpoints and exact resume, optional
multi-process (gloo/nccl).

Layout of an output folder::

    OUT/config.json, model.safetensors, README.md   the best model so far (loadable any time)
    OUT/checkpoint/                                 last training state, for --resume
    OUT/log.jsonl                                   one JSON line per logged step and epoch (and
                                                    the setup's seconds, features cached included)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from tshsr.analysis import context_cut
from tshsr.config import TSHSRConfig
from tshsr.encoding import ImageEncoding, TextEncoding
from tshsr.evaluate import score_split
from tshsr.hub import model_card
from tshsr.model import TSHSRModel
from tshsr.processing import Vocabulary

from .args import TrainArgs
from .batches import BatchSource, drop_units
from .checkpoint import claim_output_dir, find_checkpoint, load_checkpoint, save_checkpoint
from .model_config import build_config, resumed_config
from .distributed import GlobalBatchLoss, dist_info, setup_distributed


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------
def _resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def compute_loss(model: TSHSRModel, images, image_mask, texts, text_mask, positive, args: TrainArgs,
                 hardest: bool, generator: torch.Generator):
    """(loss, parts) of a batch of backbone features: the model's forward with ``args``' loss settings."""
    out = model(images, image_mask, texts, text_mask, positive, settings=args.loss_settings(), hardest=hardest,
                generator=generator)
    return out.loss, out.parts


def _lr_factor(args: TrainArgs, epoch_float: float) -> float:
    if args.lr_schedule == "step":
        return 0.1 ** int(epoch_float // args.lr_update) if args.lr_update > 0 else 1.0
    if args.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, epoch_float / max(1, args.epochs))))
    return 1.0


# Scalar mixing weights (level and stream weights, the cosine mix) get a larger learning rate:
# at the head's 2e-4 they barely move in a short run and stay near their initial values.
FUSION_PARAMETERS = ("level_logits", "stream_logits", "cosine_mix", "alignment_mix")


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


def write_model_card(directory: Path, args: TrainArgs, metrics: dict | None, history: list,
                     name: str | None = None) -> None:
    """README.md of the kept model: the library's model card with this run's training and validation.
    ``name``: what the card's loading example loads (default: the Hub repo pushed to, else the folder)."""
    config = TSHSRConfig.load(directory)
    training = [f"data: `{_data_name(args)}` split `{args.train_split}`"
                + (f" (first {args.max_train_images} images)" if args.max_train_images else ""),
                args.budget_text()]
    if recipe := args.recipe_flags():
        training.append(f"recipe (flags off the trainer's defaults): `{' '.join(recipe)}`")
    local = args.dataset in ("imagefolder", "precomp") and args.data_dir
    card = model_card(config, repo_id=name or args.push_to_hub or _display_path(directory), metrics=metrics or None,
                      dataset=Path(args.data_dir).name if local else args.dataset, dataset_name=_data_name(args),
                      split=args.val_split, training=training, history=history)
    card.save(directory / "README.md")


@torch.no_grad()
def encode_source(model: TSHSRModel, source: BatchSource, device):
    """Encode every image and caption of a split from its (cached) backbone features."""
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


@dataclass
class _Run:
    """What one training process holds while it trains."""

    args: TrainArgs
    out: Path
    device: torch.device
    rank: int
    world: int
    model: TSHSRModel
    optimizer: torch.optim.Optimizer
    train_source: BatchSource
    val_source: BatchSource | None
    state: dict
    caption_image: torch.Tensor
    steps_per_epoch: int
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    params: list = field(default_factory=list)
    ddp: torch.nn.Module | None = None  # DistributedDataParallel over GlobalBatchLoss(model), world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def snapshot(self) -> None:
        save_checkpoint(self.out / "checkpoint", self.model, self.optimizer, self.state)


def _use_channels_last(model: TSHSRModel, args: TrainArgs) -> None:
    """``--channels-last``: the frozen timm CNN computes the features to cache in channels-last layout."""
    if args.channels_last:
        if model.config.image_encoder != "timm" or args.finetune_image:
            raise SystemExit("--channels-last is for caching the features of a frozen timm image backbone")
        model.image_backbone.set_channels_last()


def _start(args: TrainArgs) -> _Run:
    """Device, process group, data, model, optimizer, and the state of a resumed run."""
    from tshsr.data import load_split_from_args

    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _resolve_device(args.device)
    setup_distributed(device, args.dist_timeout_min)
    rank, world = dist_info()
    out = Path(args.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        claim_output_dir(out)
    checkpoint = find_checkpoint(out) if args.resume else None
    if not args.resume and find_checkpoint(out) is not None:
        raise SystemExit(f"{out} already holds a training run; pass --resume to continue it or choose "
                         f"another --output-dir")

    random.seed(args.seed + rank), np.random.seed(args.seed + rank), torch.manual_seed(args.seed + rank)
    train_split = load_split_from_args(args, args.train_split, max_images=args.max_train_images)
    val_split = load_split_from_args(args, args.val_split, max_images=args.max_val_images) if args.val_split else None

    vocabulary = None
    if checkpoint is not None:
        if (checkpoint / "vocab.json").exists():
            vocabulary = Vocabulary.load(checkpoint)
        config = resumed_config(args, checkpoint, vocabulary)
    else:
        if args.text_encoder == "bigru":
            vocabulary = Vocabulary.build(train_split.captions)
        config = build_config(args, vocabulary)
    model = TSHSRModel(config, vocabulary=vocabulary).to(device)
    if args.context_detach:
        if not model.has_context:
            raise SystemExit("--context-detach needs a preset with the context level (tshsr, t2i, i2t)")
        model.head_kind.set_context_detach(model, True)
    if args.context_path_dropout > 0 and not model.has_context:
        raise SystemExit("--context-path-dropout needs a preset whose reasoning has the context level (tshsr, t2i, i2t)")
    if args.context_gain_weight > 0 and not model.has_context:
        raise SystemExit("--context-gain-weight needs a preset whose reasoning has the context level (tshsr, t2i, i2t)")
    if args.context_gain_weight > 0 and args.context_path_dropout > 0:
        raise SystemExit("--context-gain-weight and --context-path-dropout do not combine: a step with the context "
                         "path cut has no context gain to train")
    _use_channels_last(model, args)
    model.train()
    progress = args.progress and rank == 0
    train_source = BatchSource(model, train_split, args.cache_dir, progress)
    train_source.use_loader(args)
    train_source.use_views(args, progress)
    val_source = BatchSource(model, val_split, args.cache_dir, progress) if val_split else None
    if rank == 0:  # data, model and backbone features (cached on a first run): what precedes step 1
        _log(out / "log.jsonl", {"setup_seconds": round(time.time() - started, 1), "time": time.time()})

    optimizer = torch.optim.Adam(_param_groups(model, args), lr=args.lr)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_rsum": -1.0, "history": []}
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        if rank == 0:
            print(f"Resumed from {checkpoint}: epoch {state['epoch']}, step {state['global_step']}", flush=True)
    ddp = None
    if world > 1:  # DDP starts every process from rank 0's weights (inits differ: seeds are per rank)
        # A fine-tuned transformers text encoder carries layers the token features never reach
        # (BERT's pooler); DDP must then look for parameters without gradients each step.
        unused = model.config.finetune_text and model.config.text_encoder == "transformers"
        ddp = torch.nn.parallel.DistributedDataParallel(
            GlobalBatchLoss(model), device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused)

    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return _Run(args=args, out=out, device=device, rank=rank, world=world, model=model, optimizer=optimizer,
                train_source=train_source, val_source=val_source, state=state,
                caption_image=torch.as_tensor(np.asarray(train_split.caption_image)),
                steps_per_epoch=max(1, len(train_split.captions) // (args.batch_size * world)),
                autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision),
                scaler=torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device.type == "cuda"),
                params=[p for p in model.parameters() if p.requires_grad], ddp=ddp)


def _train_step(r: _Run, order: torch.Tensor, epoch: int):
    """One optimisation step; returns (loss, parts, grad_norm, pairs scored)."""
    args, state, device, model = r.args, r.state, r.device, r.model
    step = state["step_in_epoch"]
    start = (step * r.world + r.rank) * args.batch_size
    captions = order[start:start + args.batch_size]
    images = r.caption_image[captions]
    unique, inverse = torch.unique(images, return_inverse=True)
    positive = (unique.unsqueeze(1) == images.unsqueeze(0)).to(device)
    for group in r.optimizer.param_groups:
        group["lr"] = group["base_lr"] * _lr_factor(args, epoch + step / r.steps_per_epoch)
    # One seed per step, the same on every rank: all ranks mine the same global candidates.
    gen = torch.Generator().manual_seed(args.seed * 7_919 + state["global_step"])
    # Drawn only when asked for, so that every other recipe's draws stay as they were.
    cut = args.context_path_dropout > 0 and torch.rand((), generator=gen).item() < args.context_path_dropout
    with torch.autocast(device.type, dtype=r.autocast_dtype, enabled=r.autocast_dtype is not None), \
            (context_cut(model) if cut else contextlib.nullcontext()):
        # A generator of its own: a run with augmented views draws the same negatives as one without.
        views = (torch.Generator().manual_seed((args.seed + 1) * 1_000_003 + state["global_step"])
                 if args.augment_views else None)
        regions, region_mask = r.train_source.images(unique.numpy(), device, views)
        tokens, token_mask = r.train_source.texts(captions.numpy(), device)
        if args.unit_dropout > 0:
            region_mask = drop_units(region_mask, args.unit_dropout, gen)
            token_mask = drop_units(token_mask, args.unit_dropout, gen)
        if r.ddp is None:
            loss, parts = compute_loss(model, regions.to(device), region_mask.to(device), tokens.to(device),
                                       token_mask.to(device), positive, args,
                                       hardest=epoch >= args.warmup_epochs, generator=gen)
        else:
            out = r.ddp(regions.to(device), region_mask.to(device), tokens.to(device), token_mask.to(device),
                        unique, images, args.loss_settings(), epoch >= args.warmup_epochs, gen)
            loss, parts = out.loss, out.parts
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"Loss became {loss.item()} at epoch {epoch + 1}, step {step}: training stopped. "
                               f"The last good checkpoint is in {r.out / 'checkpoint'}; lower --lr or check the data.")
    r.optimizer.zero_grad(set_to_none=True)
    r.scaler.scale(loss).backward()  # under DDP the gradients arrive averaged over the ranks
    r.scaler.unscale_(r.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(r.params, args.grad_clip) if args.grad_clip > 0 else None
    r.scaler.step(r.optimizer)
    r.scaler.update()
    with torch.no_grad():
        model.logit_scale.clamp_(max=math.log(100.0))
    state["step_in_epoch"] += 1
    state["global_step"] += 1
    pairs = int(parts.get("pairs", torch.tensor(0.0)).item()) or len(captions) * len(unique)
    if r.ddp is not None:  # the global batch's pairs, scored on every rank: count this rank's share
        pairs = pairs // r.world
    return loss, parts, grad_norm, pairs


def _train_epoch(r: _Run) -> bool:
    """The rest of the current epoch's steps (logged, checkpointed); True when --max-steps is reached."""
    args, state = r.args, r.state
    epoch = state["epoch"]
    n_captions = len(r.caption_image)
    order = torch.randperm(n_captions, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
    r.train_source.begin_epoch(epoch, state["step_in_epoch"])
    bar = tqdm(total=r.steps_per_epoch, initial=state["step_in_epoch"], desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=not (args.progress and r.main), unit="step", dynamic_ncols=True)
    t_last, pairs_seen, done = time.time(), 0, False
    while state["step_in_epoch"] < r.steps_per_epoch:
        loss, parts, grad_norm, pairs = _train_step(r, order, epoch)
        pairs_seen += pairs
        bar.update(1)
        done = args.max_steps is not None and state["global_step"] >= args.max_steps
        if r.main and (state["global_step"] % args.log_every == 0 or state["step_in_epoch"] == r.steps_per_epoch
                       or done):
            elapsed = max(time.time() - t_last, 1e-6)
            record = {"epoch": epoch + 1, "step": state["global_step"], "loss": round(loss.item(), 5),
                      **{k: round(float(v.detach()), 5) for k, v in parts.items()},
                      "lr": r.optimizer.param_groups[0]["lr"], "pairs_per_s": round(pairs_seen * r.world / elapsed, 1),
                      "grad_norm": None if grad_norm is None else round(float(grad_norm), 4), "time": time.time()}
            _log(r.out / "log.jsonl", record)
            bar.set_postfix(loss=f"{loss.item():.4f}", pairs_s=f"{record['pairs_per_s']:.0f}")
            t_last, pairs_seen = time.time(), 0
        if r.main and (state["global_step"] % args.checkpoint_every == 0 or done):
            r.snapshot()
        if done:
            break
    bar.close()
    return done


def _end_epoch(r: _Run) -> None:
    """Validate, keep the model if it is the best so far, checkpoint."""
    args, state, out = r.args, r.state, r.out
    state["epoch"] += 1
    state["step_in_epoch"] = 0
    if r.main:
        metrics = validate(r.model, r.val_source, args.val_rerank_k, r.device, args.progress) if r.val_source else None
        _log(out / "log.jsonl", {"epoch": state["epoch"], "validation": metrics, "time": time.time()})
        if metrics is not None:
            print(f"epoch {state['epoch']}: i2t R@1/5/10 {metrics['i2t']['r1']:.1f}/{metrics['i2t']['r5']:.1f}/"
                  f"{metrics['i2t']['r10']:.1f}  t2i {metrics['t2i']['r1']:.1f}/{metrics['t2i']['r5']:.1f}/"
                  f"{metrics['t2i']['r10']:.1f}  RSUM {metrics['rsum']:.1f}", flush=True)
            state["history"].append({"epoch": state["epoch"], "rsum": metrics["rsum"]})
        if metrics is None or metrics["rsum"] > state["best_rsum"]:
            state["best_rsum"] = metrics["rsum"] if metrics else state["best_rsum"]
            r.model.save_pretrained(out)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            write_model_card(out, args, metrics, state["history"])
        r.snapshot()
    if r.world > 1:
        dist.barrier()


def _finish(r: _Run) -> None:
    args, out = r.args, r.out
    if r.main and not (out / "model.safetensors").exists():
        r.model.save_pretrained(out)  # a --max-steps run that never reached the end of an epoch
        write_model_card(out, args, None, r.state["history"])
    if r.main:
        best_metrics = out / "metrics.json"
        if best_metrics.exists() and r.state["history"]:  # the card of the kept model, with every epoch's RSUM
            kept = json.loads(best_metrics.read_text())
            if kept:
                write_model_card(out, args, kept, r.state["history"])
        (out / "train_args.json").write_text(json.dumps(asdict(args), indent=2))
    if r.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(args: TrainArgs) -> Path:
    """Train; returns the output folder holding the best model."""
    r = _start(args)
    done = False
    while r.state["epoch"] < args.epochs and not done:
        done = _train_epoch(r)
        if done and r.state["step_in_epoch"] < r.steps_per_epoch:
            break
        _end_epoch(r)
    _finish(r)
    return r.out
