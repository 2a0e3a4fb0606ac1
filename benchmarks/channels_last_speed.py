#!/usr/bin/env python
"""How much faster the frozen image backbone caches in the channels-last memory layout (``train.py
--channels-last``), and how far its features move, on real Flickr8k photos; writes the
"channels_last" section of docs/RESULTS.md.

    python benchmarks/channels_last_speed.py [--data-dir ../shared/data/flickr8k] [--images 64]
        [--backbones tf_efficientnet_lite0 tf_efficientnet_lite2] [--threads 2] [--rounds 9]
        [--write-results]

Each backbone runs at its native input size (Lite0 224 px, Lite2 260 px) on the first ``--images``
validation photos, preprocessed once beforehand (decoding is not timed). After one warm-up pass in
each layout the two layouts take turns, one pass each per round, so that the load swings of a shared
machine hit both alike; the median pass is reported. The features are compared as the cache stores
them (float16): the largest difference and the share of entries that change.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from results_md import git_commit, machine, write_section  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flickr8k"
BACKBONES = ["tf_efficientnet_lite0", "tf_efficientnet_lite2"]


def _pixels(backbone, photos: list) -> "torch.Tensor":  # noqa: F821
    """The photos as the cache's forward pass gets them: resized and normalised at the backbone's input size
    (its ``data_config``, which a model built on it takes as well)."""
    from tshsr.config import TSHSRConfig
    from tshsr.processing import TSHSRProcessor

    data = backbone.data_config
    # (preprocessing reads only the input size, mean and std)
    config = TSHSRConfig.preset("tshsr", image_size=data["image_size"], image_mean=data["mean"], image_std=data["std"])
    return TSHSRProcessor(config).preprocess_images(photos)


def time_layouts(backbone, pixels, rounds: int) -> dict:
    """Seconds of every pass in each layout (paired rounds after a warm-up pass each) and the features."""
    import torch

    passes: dict[str, list[float]] = {"default": [], "channels_last": []}
    features = {}
    with torch.inference_mode():
        for round_ in range(rounds + 1):  # round 0 warms up (first-call allocations, weight repacking)
            for layout in passes:
                backbone.set_channels_last(layout == "channels_last")
                start = time.perf_counter()
                regions, _ = backbone(pixels)
                seconds = time.perf_counter() - start
                if round_:
                    passes[layout].append(seconds)
                features[layout] = regions
    backbone.set_channels_last(False)
    return {"passes": passes, "features": features}


def compare(default, fast) -> dict:
    """Largest difference in float32 and the share of float16 entries (the cache's dtype) that change."""
    half_changed = (default.half() != fast.half()).float().mean().item()
    return {"max_abs_diff": (default - fast).abs().max().item(), "fp16_changed": half_changed,
            "grid": int(default.shape[1]), "feature_dim": int(default.shape[2])}


def measure(name: str, photos: list, rounds: int) -> dict:
    from tshsr.encoders import TimmImageBackbone

    backbone = TimmImageBackbone(name).eval()
    pixels = _pixels(backbone, photos)
    timed = time_layouts(backbone, pixels, rounds)
    default_s = statistics.median(timed["passes"]["default"])
    fast_s = statistics.median(timed["passes"]["channels_last"])
    return {"backbone": name, "image_size": int(pixels.shape[-1]), "images": len(photos),
            "default_s": default_s, "channels_last_s": fast_s, "speedup": default_s / fast_s,
            "passes": timed["passes"],
            **compare(timed["features"]["default"], timed["features"]["channels_last"])}


def section(rows: list[dict], threads: int, rounds: int) -> str:
    lines = [
        "## Channels-last image caching (`train.py --channels-last`): forward time and feature drift",
        "",
        f"`python benchmarks/channels_last_speed.py --threads {threads} --rounds {rounds} --write-results` "
        f"(commit {git_commit()}; {machine()}).",
        "",
        "Forward pass of the frozen image backbone over the first validation photos, preprocessed beforehand, in "
        "the default memory layout and in channels-last (`train.py --channels-last`, which only changes how the "
        "feature cache is built); the median of the paired passes after one warm-up pass each (in brackets: the "
        "fastest and the slowest pass). The features are compared as the cache stores them (float16).",
        "",
        "| backbone (input) | regions | photos | default layout | channels-last | speed-up | largest difference "
        "| float16 entries changed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spread = {k: f"{min(v):.2f}-{max(v):.2f}" for k, v in r["passes"].items()}
        lines.append(f"| {r['backbone']} ({r['image_size']} px) | {r['grid']} | {r['images']} | {r['default_s']:.2f} s "
                     f"({spread['default']}) | {r['channels_last_s']:.2f} s ({spread['channels_last']}) "
                     f"| **{r['speedup']:.2f}x** | {r['max_abs_diff']:.1e} "
                     f"| {100 * r['fp16_changed']:.2f} % |")
    lines += ["", "Channels-last features get cache entries of their own (`tshsr.features.feature_key`), so a "
              "default-layout cache is never mixed with them; the option is off by default and the study groups "
              "and the default recipe do not use it."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--images", type=int, default=64, help="the first N validation photos")
    parser.add_argument("--backbones", nargs="+", default=BACKBONES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9, help="timed passes per layout (after a warm-up pass)")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    if args.images < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--images, --rounds and --threads must be at least 1")
    if not (Path(args.data_dir) / "validation").is_dir():
        print(f"SKIP: no Flickr8k validation photos at {args.data_dir} (pass --data-dir)")
        return 0

    import torch

    from tshsr.data import load_split

    torch.set_num_threads(args.threads)
    split = load_split("flickr8k", "validation", data_dir=args.data_dir, max_images=args.images)
    rows = []
    for name in args.backbones:
        row = measure(name, list(split.image_refs), args.rounds)
        rows.append(row)
        print(f"{name}: default {row['default_s']:.2f} s, channels-last {row['channels_last_s']:.2f} s "
              f"({row['speedup']:.2f}x); largest difference {row['max_abs_diff']:.1e}, "
              f"{100 * row['fp16_changed']:.2f} % of float16 entries changed", flush=True)
    text = section(rows, args.threads, args.rounds)
    print(text)
    if args.write_results:
        write_section("channels_last", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
