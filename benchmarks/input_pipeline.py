#!/usr/bin/env python
"""Images/s of the live-image input pipeline (tshsr.pipeline): decode + resize + normalise real
Flickr8k photos for fine-tuning batches, in the training process (0 workers) and in DataLoader
workers, and write the table into docs/RESULTS.md.

    python benchmarks/input_pipeline.py [--data-dir ../shared/data/flickr8k] [--images 300]
        [--workers 0 2] [--batch-size 32] [--rounds 2] [--write-results]

Each worker and the main process use one thread, so the numbers measure process parallelism.
Only the input side is timed (no model): a GPU step needs at least this rate to never wait.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
from results_md import git_commit, machine, write_section  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "flickr8k"
BACKBONE = "tf_efficientnet_lite0"  # the default image backbone; its preprocessing is what we time


def backbone_preprocessing(name: str) -> dict:
    """Input size, mean and std of a timm backbone from its pretrained config (no weights)."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(name)
    return {"image_size": int(cfg.input_size[-1]), "image_mean": tuple(cfg.mean), "image_std": tuple(cfg.std)}


def measure(split, processor, workers: int, batch_size: int, rounds: int, step_s: float = 0.0) -> dict:
    """One loader with persistent workers: the first pass includes starting the workers (cold),
    the later passes (new epochs, as in training) are steady state; the fastest is reported.

    ``step_s`` > 0 stands for the accelerator's share of a training step: the main process
    sleeps that long per batch (a process waiting on a GPU leaves the CPU free, as sleeping
    does), so the rate shows how much of the decoding the workers hide behind the step."""
    from tshsr.pipeline import image_batch_loader, normalize_pixels

    loader = image_batch_loader(split, processor, batch_size=batch_size, seed=0, num_workers=workers,
                                prefetch_factor=4 if workers else None, persistent_workers=bool(workers))
    passes = []
    for epoch in range(rounds + 1):
        loader.batch_sampler.set_epoch(epoch)
        start = time.perf_counter()
        images = 0
        for batch in loader:
            # Normalising (on the device in training) is timed here too, in the main process.
            images += len(normalize_pixels(batch["pixels"], processor.config))
            if step_s:
                time.sleep(step_s)
        passes.append((images, time.perf_counter() - start))
    cold_images, cold_seconds = passes[0]
    images, seconds = max(passes[1:], key=lambda p: p[0] / p[1])
    del loader  # stops persistent workers before the next setting starts its own
    return {"workers": workers, "images": images, "seconds": seconds, "images_per_s": images / seconds,
            "cold_images_per_s": cold_images / cold_seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--images", type=int, default=300, help="first N training images")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=32, help="captions per step (as --batch-size in training)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="timed passes (epochs) per setting after a first pass that starts the workers; "
                             "the fastest is reported")
    parser.add_argument("--step-ms", type=float, default=100.0,
                        help="also time each setting with this much simulated accelerator time per step (0: skip)")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)

    train_dir = Path(args.data_dir) / "train"
    if not train_dir.is_dir():
        print(f"SKIP: no Flickr8k training images at {train_dir} (pass --data-dir)")
        return 0

    import torch

    from tshsr.config import TSHSRConfig
    from tshsr.data import load_split
    from tshsr.processing import TSHSRProcessor

    torch.set_num_threads(1)
    split = load_split("flickr8k", "train", data_dir=args.data_dir, max_images=args.images)
    prep = backbone_preprocessing(BACKBONE)
    processor = TSHSRProcessor(TSHSRConfig.preset("tshsr", image_backbone=BACKBONE, **prep))
    load_before = os.getloadavg()[0]
    results = []
    for workers in args.workers:
        result = measure(split, processor, workers, args.batch_size, args.rounds)
        if args.step_ms:
            overlapped = measure(split, processor, workers, args.batch_size, args.rounds, args.step_ms / 1000)
            result["step_images_per_s"] = overlapped["images_per_s"]
            steps = len(split.captions) // args.batch_size
            # Share of the pass not spent in the simulated accelerator step: the input stall.
            result["stall"] = max(0.0, 1 - steps * args.step_ms / 1000 / overlapped["seconds"])
        results.append(result)
        print(f"{workers} workers: {result['images_per_s']:.1f} images/s ({result['images']} images in "
              f"{result['seconds']:.2f} s; first pass, starting workers: {result['cold_images_per_s']:.1f})"
              + (f"; with a {args.step_ms:g} ms step: {result['step_images_per_s']:.1f} images/s, "
                 f"{100 * result['stall']:.0f} % of the time waiting on input" if args.step_ms else ""), flush=True)

    base = results[0]["images_per_s"]
    step_base = results[0].get("step_images_per_s")
    lines = [
        "## Input pipeline: live image batches (images/s)",
        "",
        f"`python benchmarks/input_pipeline.py --images {args.images} --workers {' '.join(map(str, args.workers))} "
        f"--batch-size {args.batch_size} --rounds {args.rounds} --step-ms {args.step_ms:g} --write-results`: decode + resize to "
        f"{prep['image_size']} px in the workers (uint8 handed over) + normalise in the main process ({BACKBONE}'s preprocessing) of the first {len(split)} Flickr8k "
        f"training photos, batched per training step by `tshsr.pipeline.image_batch_loader` "
        f"(the trainer's caption order, unique images per step; images counted with repeats across steps). "
        f"One thread per process; one loader per setting with persistent workers: a first pass "
        f"(starting the workers) then {args.rounds} epoch passes, the fastest reported; no model in the loop.",
        "",
        f"The last columns add a simulated accelerator step of {args.step_ms:g} ms per batch (the main process "
        "sleeps, as it would waiting on a GPU): workers decode the next batches meanwhile, so the stall "
        "(share of the time not spent in the step) shows what the pipeline hides.",
        "",
        "| DataLoader workers | images/s (input only) | vs 0 workers | first pass incl. worker start, images/s | "
        f"images/s with a {args.step_ms:g} ms step | vs 0 workers | time waiting on input |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        step_cells = (f"{r['step_images_per_s']:.1f} | {r['step_images_per_s'] / step_base:.2f}x | {100 * r['stall']:.0f} %"
                      if step_base else "- | - | -")
        lines.append(f"| {r['workers']} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}x | "
                     f"{r['cold_images_per_s']:.1f} | {step_cells} |")
    lines += ["", f"Machine: {machine(threads=False)}. Commit {git_commit()}. Load average (1 min) "
              f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after the run on {os.cpu_count()} cores: "
              "where other jobs share the cores, workers only get what is left, so these rates are lower "
              "bounds and the worker gain is the part to read with care."]
    body = "\n".join(lines)
    if args.write_results:
        write_section("input_pipeline", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
