#!/usr/bin/env python
"""Train a TSHSR model (or an ablation) on Flickr30K, MSCOCO, a local image folder or SCAN
precomputed features.

Examples:
  # CPU, frozen backbones with cached features (the default model of checkpoints/):
  python train.py --dataset imagefolder --data-dir ../shared/data/flickr8k --output-dir runs/f8k
  # GPU, Flickr30K from the Hub, fine-tuning the text encoder, pushed to the Hub at the end:
  python train.py --dataset flickr30k --split-val val --finetune-text --push-to-hub you/tshsr-f30k
  # Paper setting: 36 x 2048 bottom-up features, BiGRU text encoder:
  python train.py --dataset precomp --data-dir data/f30k_precomp --text-encoder bigru \\
      --embed-dim 1024 --sim-dim 256 --epochs 40 --lr-update 30
  # Several GPUs (or CPU processes with gloo):
  torchrun --nproc_per_node 4 train.py --dataset flickr30k ...
  # After a crash, continue exactly where the last checkpoint was written:
  python train.py ... --resume
"""

from __future__ import annotations

import argparse
import sys

from tshsr.config import TSHSRConfig


def parse_args(argv=None):
    from tshsr.training import TrainArgs

    d = TrainArgs()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, choices=["imagefolder", "flickr8k", "flickr30k", "coco", "precomp"])
    g.add_argument("--data-dir", default=d.data_dir, help="local folder (imagefolder, save_to_disk copy, precomp)")
    g.add_argument("--image-root", default=d.image_root, help="COCO image root (train2014/, val2014/)")
    g.add_argument("--split-train", dest="train_split", default=d.train_split)
    g.add_argument("--split-val", dest="val_split", default=d.val_split, help="'' to skip validation")
    g.add_argument("--max-train-images", type=int, default=d.max_train_images)
    g.add_argument("--max-val-images", type=int, default=d.max_val_images)
    g.add_argument("--cache-dir", default=d.cache_dir, help="feature cache for frozen backbones")
    g.add_argument("--hf-dataset", default=d.hf_dataset, metavar="REPO",
                   help="any Hub image-caption dataset (script repos fall back to refs/convert/parquet)")
    g.add_argument("--hf-revision", default=d.hf_revision, help="branch, tag or commit of --hf-dataset")
    g.add_argument("--columns", default=d.columns,
                   help="column mapping, e.g. image=img,caption=sentences,split=split,image_id=cocoid")
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
    g.add_argument("--level-fusion", default=d.level_fusion, choices=["learned", "equal"],
                   help="level weights within a stream: learned softmax, or fixed equal")
    g.add_argument("--finetune-text", action="store_true")
    g.add_argument("--finetune-image", action="store_true")
    g.add_argument("--text-lr-mult", type=float, default=d.text_lr_mult)
    g.add_argument("--image-lr-mult", type=float, default=d.image_lr_mult)
    g.add_argument("--fusion-lr-mult", type=float, default=d.fusion_lr_mult,
                   help="learning-rate multiplier of the level/stream mixing weights")
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
    g.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp16"])
    g.add_argument("--device", default=d.device)
    g.add_argument("--threads", type=int, default=d.threads, help="CPU threads (torch.set_num_threads)")
    g.add_argument("--seed", type=int, default=d.seed)
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
    ns = p.parse_args(argv)
    values = vars(ns)
    if values["dataset"] == "flickr8k":
        values["dataset"] = "imagefolder"
    if values["val_split"] == "":
        values["val_split"] = None
    if values["val_rerank_k"] == 0:
        values["val_rerank_k"] = None
    return TrainArgs(**values)


def main(argv=None) -> int:
    from tshsr.training import TrainingDiverged, run

    args = parse_args(argv)
    try:
        out = run(args)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Best model saved in {out}")
    if args.push_to_hub:
        from huggingface_hub import HfApi

        try:
            api = HfApi()
            api.create_repo(args.push_to_hub, exist_ok=True)
            url = api.upload_folder(folder_path=str(out), repo_id=args.push_to_hub,
                                    allow_patterns=["config.json", "model.safetensors", "vocab.json",
                                                    "README.md", "metrics.json"],
                                    commit_message="Upload TSHSR model trained with train.py")
        except Exception as exc:  # network, auth, permissions: the local model is kept either way
            print(f"error: push to the Hub as {args.push_to_hub!r} failed ({type(exc).__name__}: {exc}). "
                  f"The trained model is kept in {out}; push it later with "
                  f"TSHSRModel.from_pretrained('{out}').push_to_hub('{args.push_to_hub}').", file=sys.stderr)
            return 4
        print(f"Pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
