#!/usr/bin/env python
"""Latency of the demo app's request handlers after start-up, measured in-process.

    python benchmarks/app_latency.py [--model checkpoints/tshsr-flickr8k] [--requests 40]
        [--threads N] [--no-write]

Builds the app exactly as ``python app.py`` does (model loaded, built-in photos and caption pool
encoded once), then calls the functions behind the API endpoints directly (no HTTP):

* caption -> images over the built-in gallery (``/rank_images``), target p50 < 300 ms;
* image -> captions over a 1,000-caption pool encoded at start-up (``/rank_captions``; the
  built-in pool topped up with generated captions), target p50 < 1 s;

and, for context, the same request with 1,000 pasted captions (encoded with the request) and
the interactive UI handlers (which also draw the plots and explain the top match).
Results go to the ``app_latency`` section of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

import app  # noqa: E402

POOL_SIZE = 1000
SUBJECTS = ["a man", "a woman", "two children", "a brown dog", "a black cat", "an old couple", "a cyclist",
            "a group of friends", "a small bird", "a horse", "a young boy", "a girl in a red coat"]
ACTIONS = ["walks along", "sits beside", "runs across", "looks at", "plays near", "stands on", "rests under",
           "waits by", "jumps over", "talks near"]
PLACES = ["a busy street", "a sandy beach", "a wooden fence", "a snowy hill", "a quiet lake", "a stone bridge",
          "a green park", "a market stall", "a tall tree", "an old building"]


def generated_captions(n: int, salt: str = "") -> list[str]:
    """Deterministic, varied captions (no dataset needed)."""
    combos = itertools.product(SUBJECTS, ACTIONS, PLACES)
    out = []
    for i, (s, a, p) in enumerate(combos):
        if len(out) == n:
            break
        out.append(f"{s} {a} {p}{salt}".capitalize())
    while len(out) < n:  # more than the combinations: number them
        out.append(f"{out[len(out) % 1200]} ({len(out)}{salt})")
    return out


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def summary(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1000
    return {"n": len(times), "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "mean": float(ms.mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("TSHSR_MODEL") or str(app.DEFAULT_MODEL))
    parser.add_argument("--requests", type=int, default=40, help="timed requests per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: what app.py uses, CPU cores / 2 concurrent requests)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/RESULTS.md alone")
    args = parser.parse_args(argv)

    threads = args.threads or app.default_threads(2)
    torch.set_num_threads(threads)
    load_before = os.getloadavg()

    t0 = time.perf_counter()
    model = app.load_model(args.model)
    load_s = time.perf_counter() - t0
    builtin = app.read_examples(app.EXAMPLES_DIR)[1]
    if not builtin:
        print("note: no built-in caption pool (examples/captions.json); the 1,000 captions are all generated")
    extra = generated_captions(POOL_SIZE - len(builtin)) if len(builtin) < POOL_SIZE else []
    t0 = time.perf_counter()
    engine = app.DemoEngine(model, model_name=args.model, extra_pool=extra, progress=False)
    startup_s = time.perf_counter() - t0
    handlers = app.Handlers(engine)
    if not engine.example_photos:
        print("error: no example photos in examples/images; nothing to rank", file=sys.stderr)
        return 1
    n_pool = len(engine.pool)
    queries = [c for c in engine.pool[: len(builtin)]] or generated_captions(50)
    photos = engine.example_photos
    n = args.requests

    def cycle(items, count):
        return [items[i % len(items)] for i in range(count)]

    results: dict[str, dict] = {}
    # caption -> images over the built-in gallery
    for q in queries[: args.warmup]:
        handlers.api_rank_images(q, 10)
    results["caption_to_images"] = summary([timed(handlers.api_rank_images, q, 10) for q in cycle(queries, n)])
    # image -> captions over the 1,000-caption pool encoded at start-up
    for p in photos[: args.warmup]:
        handlers.api_rank_captions(p, "", 10)
    results["image_to_captions_1k"] = summary([timed(handlers.api_rank_captions, p, "", 10) for p in cycle(photos, n)])

    # 1,000 pasted captions on top of the pool: encoded with the request, each time.
    pasted_runs = max(2, min(5, n // 8))
    fresh = [timed(handlers.api_rank_captions, photos[i % len(photos)],
                   "\n".join(generated_captions(1000, salt=f" #{i}")), 10) for i in range(pasted_runs)]
    results["pasted_1k"] = summary(fresh)
    # The interactive handlers: ranking + breakdown plot + attention explanation of the top match.
    ui_n = max(5, n // 4)
    results["ui_caption_to_images"] = summary([timed(handlers.ui_rank_images, q, 8, None)
                                               for q in cycle(queries, ui_n)])
    results["ui_image_to_captions_1k"] = summary([timed(handlers.ui_rank_captions, p, "", True, 5)
                                                  for p in cycle(photos, ui_n)])
    load_after = os.getloadavg()

    rows = [
        ("caption → images, built-in gallery", f"{len(engine.gallery)} photos", "caption_to_images", 300),
        ("image → captions, pool encoded at start-up", f"{n_pool:,} captions", "image_to_captions_1k", 1000),
        ("image → captions + 1,000 pasted lines", f"{n_pool:,} + 1,000", "pasted_1k", None),
        ("UI: caption → images (+ plots, explain #1)", f"{len(engine.gallery)} photos", "ui_caption_to_images", None),
        ("UI: image → captions (+ plots, explain #1)", f"{n_pool:,} captions", "ui_image_to_captions_1k", None),
    ]
    from results_md import git_commit, machine, write_section

    lines = [
        "## Demo app latency (request handlers, in-process, after start-up)",
        "",
        f"Machine: {machine()}. Commit {git_commit()}. Written by `python benchmarks/app_latency.py`.",
        f"Model `{Path(args.model).name}`; torch threads {threads} (what `app.py` uses: cores / 2 concurrent "
        f"requests); load average before/after {load_before[0]:.1f}/{load_after[0]:.1f} (other work on the "
        "machine slows every number). Each request is timed end to end: input checks, query encoding, "
        "full-model scoring of every candidate (no shortlist), sorting, JSON. Start-up: model "
        f"{load_s:.1f} s, encoding {len(engine.gallery)} photos + {n_pool:,} captions {startup_s:.1f} s.",
        "",
        "| request | candidates | n | p50 ms | p95 ms | target p50 |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    for label, cands, key, target in rows:
        r = results[key]
        met = "" if target is None else (f"< {target} ms: **{'met' if r['p50'] < target else 'missed'}**")
        if target is not None:
            verdicts.append(r["p50"] < target)
        lines.append(f"| {label} | {cands} | {r['n']} | {r['p50']:.0f} | {r['p95']:.0f} | {met} |")
    lines += ["", "The pool of 1,000 is the built-in caption pool topped up with generated captions "
              "(\"a brown dog runs across a sandy beach\"-style); pasted lines are encoded with "
              "each request (the app keeps no cache of them)."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("app_latency", body)
        print(f"\nwrote the app_latency section of {ROOT / 'docs' / 'RESULTS.md'}")
    return 0 if all(verdicts) else 3


if __name__ == "__main__":
    sys.exit(main())
