"""``tshsr-evaluate`` / ``python -m tshsr.evaluate``: retrieval metrics of a checkpoint on a split.

Both sides are encoded once; every (image, caption) pair is then scored by the full model
(exhaustive, the paper protocol), or, with ``--rerank-k K``, two-stage: each query's K best items
by global cosine are rescored by the full model and ranked first. The work is done by the
library's :mod:`tshsr.evaluate`; this module is its command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from tshsr.data import DATASETS, load_split_from_args
from tshsr import evaluate as library
from tshsr.evaluate import AUTO_COMPILE_PAIRS, evaluate_split
from tshsr.model import TSHSRModel


def format_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> str:
    """A paper-style results table (recalls in percent)."""
    lines = [
        title,
        f"{'':<12}{'Image-to-text':^24}  {'Text-to-image':^24}",
        f"{'':<12}{'R@1':>8}{'R@5':>8}{'R@10':>8}  {'R@1':>8}{'R@5':>8}{'R@10':>8}{'RSUM':>9}",
    ]
    for name, m in rows:
        cells = [m["i2t"]["r1"], m["i2t"]["r5"], m["i2t"]["r10"]]
        cells2 = [m["t2i"]["r1"], m["t2i"]["r5"], m["t2i"]["r10"]]
        lines.append(
            f"{name:<12}" + "".join(f"{v:8.1f}" for v in cells) + "  " + "".join(f"{v:8.1f}" for v in cells2)
            + f"{m['rsum']:9.1f}"
        )
    return "\n".join(lines)


def _size_label(n: int) -> str:
    """A split size as a table label: 5K, 1K, or 8 images."""
    return f"{n // 1000}K" if n >= 1000 and n % 1000 == 0 else f"{n} images"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tshsr-evaluate",
        description="Image-text retrieval metrics (R@1/5/10 both ways, RSUM) of a TSHSR model on a split.",
    )
    parser.add_argument("--model", required=True, help="checkpoint folder or Hugging Face Hub id")
    parser.add_argument("--dataset", required=True, choices=list(DATASETS))
    parser.add_argument("--data-dir", default=None, help="dataset folder (imagefolder, save_to_disk or precomp)")
    parser.add_argument("--image-root", default=None, help="COCO: folder holding train2014/ and val2014/")
    parser.add_argument("--hf-dataset", default=None, metavar="REPO",
                        help="any Hub image-caption dataset (script repos fall back to refs/convert/parquet)")
    parser.add_argument("--hf-revision", default=None, help="branch, tag or commit of --hf-dataset")
    parser.add_argument("--columns", default=None,
                        help="column mapping, e.g. image=img,caption=sentences,split=split,image_id=cocoid")
    parser.add_argument("--streaming", action="store_true",
                        help="stream --hf-dataset instead of downloading it (with --max-images)")
    parser.add_argument("--split", default=None,
                        help="split to evaluate (default: validation for imagefolder/flickr8k, else test)")
    parser.add_argument("--output", default="metrics.json", help="where to write the metrics JSON")
    parser.add_argument("--rerank-k", type=int, default=None,
                        help="two-stage: rerank each query's K best by global cosine (default: exhaustive)")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--batch-size", type=int, default=32, help="images encoded at a time")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--coco-1k", action="store_true",
                        help="also report the 1K-fold mean (automatic for --dataset coco --split test)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="exhaustive scoring through torch.compile, faster after a one-off compilation (on CPU "
                             "it needs a C++ compiler); default: on for CPU runs of at least "
                             f"{AUTO_COMPILE_PAIRS:,} pairs when a C++ compiler is found")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="exhaustive scoring precision (default: bf16 autocast on a GPU, fp32 on CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    split_name = args.split or ("validation" if args.dataset in ("imagefolder", "flickr8k") else "test")
    device = args.device or _default_device()
    progress = not args.no_progress
    split = load_split_from_args(args, split_name, max_images=args.max_images)
    model = TSHSRModel.from_pretrained(args.model, map_location=device)
    want_1k = args.coco_1k or (args.dataset == "coco" and split_name == "test")
    can_1k = len(split) >= library.COCO_FOLD_SIZE and len(split) % library.COCO_FOLD_SIZE == 0
    if want_1k and not can_1k:
        print(f"note: no 1K folds: {len(split)} images is not a multiple of {library.COCO_FOLD_SIZE}", file=sys.stderr)
    result, folds = evaluate_split(model, split, rerank_k=args.rerank_k, batch_size=args.batch_size,
                                   progress=progress, coco_1k=want_1k and can_1k, fold_size=library.COCO_FOLD_SIZE,
                                   compile="auto" if args.compile is None else args.compile,
                                   precision=args.precision)
    protocol = "exhaustive" if args.rerank_k is None else f"two-stage, rerank top {args.rerank_k}"
    title = (f"{args.model} on {split.name}: {result['n_images']} images, {result['n_captions']} captions "
             f"({protocol}, {device}), {result['seconds']:.1f} s")
    n, fold = len(split), library.COCO_FOLD_SIZE
    rows = [(_size_label(n), result)]
    if folds is not None:
        rows.append((f"{_size_label(fold)} x {n // fold}", folds))
    print(format_table(title, rows))
    output = Path(args.output)
    _write_json(output, result)
    written = [str(output)]
    if folds is not None:
        folds_path = output.with_name(f"{output.stem}_1k{output.suffix or '.json'}")
        _write_json(folds_path, folds)
        written.append(str(folds_path))
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
