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


def paired_passes(split, processor, settings: list[int], batch_size: int, rounds: int, step_s: float = 0.0) -> dict:
    """images/s of every pass, per worker count, in paired rounds.

    One loader per setting with persistent workers (idle workers wait without using the CPU);
    each is first run once to start its workers (that cold pass is reported apart), then the
    settings take turns, one epoch pass each per round, so that the load swings of a shared
    machine hit every setting alike. ``step_s`` > 0 stands for the accelerator's share of a
    training step: the main process sleeps that long per batch (a process waiting on a GPU
    leaves the CPU free, as sleeping does), so the rate shows how much decoding the workers
    hide behind the step."""
    from tshsr.pipeline import image_batch_loader, normalize_pixels

    def one_pass(loader, epoch: int) -> tuple[int, float]:
        loader.batch_sampler.set_epoch(epoch)
        start = time.perf_counter()
        images = 0
        for batch in loader:
            # Normalising (on the device in training) is timed here too, in the main process.
            images += len(normalize_pixels(batch["pixels"], processor.config))
            if step_s:
                time.sleep(step_s)
        return images, time.perf_counter() - start

    loaders = {w: image_batch_loader(split, processor, batch_size=batch_size, seed=0, num_workers=w,
                                     prefetch_factor=4 if w else None, persistent_workers=bool(w)) for w in settings}
    results = {w: {"cold": None, "passes": []} for w in settings}
    for w in settings:
        images, seconds = one_pass(loaders[w], 0)
        results[w]["cold"] = images / seconds
    for epoch in range(1, rounds + 1):
        for w in settings:
            images, seconds = one_pass(loaders[w], epoch)
            results[w]["passes"].append((images, seconds))
    del loaders  # stops the workers
    return results


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--images", type=int, default=300, help="first N training images")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=32, help="captions per step (as --batch-size in training)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="paired rounds: timed passes (epochs) per setting, after a first pass that starts "
                             "the workers; the median is reported")
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
    steps = len(split.captions) // args.batch_size
    plain = paired_passes(split, processor, args.workers, args.batch_size, args.rounds)
    stepped = paired_passes(split, processor, args.workers, args.batch_size, args.rounds,
                            args.step_ms / 1000) if args.step_ms else None
    results = []
    for workers in args.workers:
        rates = [i / t for i, t in plain[workers]["passes"]]
        r = {"workers": workers, "images_per_s": _median(rates), "low": min(rates), "high": max(rates),
             "cold_images_per_s": plain[workers]["cold"]}
        if stepped:
            passes = stepped[workers]["passes"]
            r["step_images_per_s"] = _median([i / t for i, t in passes])
            # Share of a pass not spent in the simulated accelerator step: the input stall.
            r["stall"] = _median([max(0.0, 1 - steps * args.step_ms / 1000 / t) for _, t in passes])
        results.append(r)
        print(f"{workers} workers: {r['images_per_s']:.1f} images/s (range {r['low']:.1f}-{r['high']:.1f}; first "
              f"pass, starting workers: {r['cold_images_per_s']:.1f})"
              + (f"; with a {args.step_ms:g} ms step: {r['step_images_per_s']:.1f} images/s, "
                 f"{100 * r['stall']:.0f} % of the time waiting on input" if stepped else ""), flush=True)

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
        f"(starting the workers), then {args.rounds} paired rounds in which the settings take turns, one epoch pass "
        "each, so load swings of the shared machine hit all settings alike; medians (and the range) reported; "
        "no model in the loop.",
        "",
        f"The last columns add a simulated accelerator step of {args.step_ms:g} ms per batch (the main process "
        "sleeps, as it would waiting on a GPU): workers decode the next batches meanwhile, so the stall "
        "(share of the time not spent in the step) shows what the pipeline hides.",
        "",
        "| DataLoader workers | images/s (input only) | range | vs 0 workers | first pass incl. worker start, images/s | "
        f"images/s with a {args.step_ms:g} ms step | vs 0 workers | time waiting on input |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        step_cells = (f"{r['step_images_per_s']:.1f} | {r['step_images_per_s'] / step_base:.2f}x | {100 * r['stall']:.0f} %"
                      if step_base else "- | - | -")
        lines.append(f"| {r['workers']} | {r['images_per_s']:.1f} | {r['low']:.0f}-{r['high']:.0f} | "
                     f"{r['images_per_s'] / base:.2f}x | "
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
