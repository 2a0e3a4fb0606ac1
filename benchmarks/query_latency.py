#!/usr/bin/env python
"""Query latency of gallery search, exhaustive vs two-stage (global shortlist + rerank top-K),
on the Flickr8k validation split used as a 1,000-image / 5,000-caption gallery.

    python benchmarks/query_latency.py [--model checkpoints/tshsr-flickr8k] [--rerank-k 20 50 100]
        [--queries 200] [--write-results]

Both galleries are encoded once (as in the app); each query is then timed end to end (query
encoding, shortlist, full-model scoring, sort). Recall is measured on the same queries under
both settings: for a caption query, its image; for an image query, any of its 5 captions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from tshsr import TSHSRModel  # noqa: E402
from tshsr.data import load_split  # noqa: E402
from tshsr.retrieval import GalleryIndex  # noqa: E402

STORE = ROOT / "benchmarks" / "results" / "query_latency.json"


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1000, q))


def run_queries(index: GalleryIndex, queries, relevant, rerank_k, top_k=10):
    times, hits = [], {1: 0, 5: 0, 10: 0}
    for query, good in zip(queries, relevant):
        start = time.perf_counter()
        result = index.search(query, top_k=top_k, rerank_k=rerank_k)
        times.append(time.perf_counter() - start)
        ranked = [h.id for h in result]
        for k in hits:
            hits[k] += any(r in good for r in ranked[:k])
    n = len(queries)
    return {"p50_ms": round(percentile(times, 50), 1), "p95_ms": round(percentile(times, 95), 1),
            **{f"r{k}": round(100 * v / n, 2) for k, v in hits.items()}}


def write(record: dict) -> None:
    """The RESULTS.md section, with the verdict on the targets."""
    from results_md import write_section

    ks, n, results = record["rerank_k"], record["queries"], record["results"]
    ks = ks if isinstance(ks, list) else [ks]
    lines = ["## Query latency: exhaustive vs shortlist + rerank", "",
             f"Machine: {record['machine']}. Commit {record['commit']}. "
             f"`python benchmarks/query_latency.py --rerank-k {' '.join(map(str, ks))} --queries {n} --write-results` "
             "on the default model; gallery = Flickr8k validation (1,000 images, 5,000 captions) encoded once; "
             "per-query time includes encoding the query. Recalls over the same "
             f"{n} queries per direction (one query = {100 / n:.2f} points). Target: rerank p50 < 200 ms with R@10 "
             "within 0.5 of exhaustive.", "",
             "| direction | mode | p50 ms | p95 ms | R@1 | R@5 | R@10 | R@10 - exhaustive | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, modes in results.items():
        full = modes["exhaustive"]
        for mode, r in modes.items():
            if mode == "exhaustive":
                diff = verdict = ""
            else:
                d = r["r10"] - full["r10"]
                diff = f"{d:+.2f}"
                verdict = "met" if r["p50_ms"] < 200 and abs(d) <= 0.5 else "NOT met"
            lines.append(f"| {name} | {mode} | {r['p50_ms']} | {r['p95_ms']} | {r['r1']} | {r['r5']} | {r['r10']} | "
                         f"{diff} | {verdict} |")
    lines.append("")
    for name, modes in results.items():
        full = modes["exhaustive"]
        met = [k for k in ks if modes[f"rerank-{k}"]["p50_ms"] < 200
               and abs(modes[f"rerank-{k}"]["r10"] - full["r10"]) <= 0.5]
        if met:
            fast = modes[f"rerank-{met[0]}"]
            lines.append(f"- {name}: met from K = {met[0]}: rerank p50 {fast['p50_ms']} ms vs {full['p50_ms']} ms "
                         f"exhaustive ({full['p50_ms'] / fast['p50_ms']:.0f}x faster), R@10 {fast['r10']} vs "
                         f"{full['r10']}.")
        else:
            lines.append(f"- {name}: NOT met at any K timed ({', '.join(map(str, ks))}).")
    lines.append("- A positive R@10 difference means the shortlist left out a distractor that the full model ranks "
                 "above the match: reranking a shortlist then finds more matches than scoring everything; larger K "
                 "converges to exhaustive.")
    write_section("query_latency", "\n".join(lines))


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "tshsr-flickr8k"))
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    p.add_argument("--rerank-k", type=int, nargs="+", default=[20, 50, 100],
                   help="shortlist sizes to time (each against the same exhaustive run)")
    p.add_argument("--queries", type=int, default=200, help="queries per direction")
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--summarize-only", action="store_true",
                   help="rewrite the RESULTS.md section from benchmarks/results/query_latency.json")
    args = p.parse_args()
    if args.summarize_only:
        write(json.loads(STORE.read_text()))
        return 0
    model = TSHSRModel.from_pretrained(args.model).eval()
    split = load_split("imagefolder", "validation", data_dir=args.data_dir)
    images = GalleryIndex(model, "images")
    images.add(split.images(), ids=split.image_ids, progress=True)
    texts = GalleryIndex(model, "texts")
    texts.add(split.captions, ids=[str(i) for i in range(len(split.captions))], progress=True)

    rng = np.random.default_rng(0)
    caption_queries = rng.choice(len(split.captions), size=min(args.queries, len(split.captions)), replace=False)
    image_queries = rng.choice(len(split), size=min(args.queries, len(split)), replace=False)
    t2i_q = [split.captions[c] for c in caption_queries]
    t2i_rel = [{split.image_ids[split.caption_image[c]]} for c in caption_queries]
    all_images = split.images()
    i2t_q = [all_images[int(i)] for i in image_queries]
    i2t_rel = [{str(c) for c in np.flatnonzero(np.asarray(split.caption_image) == i)} for i in image_queries]

    results = {}
    for name, index, queries, relevant in (("text-to-image", images, t2i_q, t2i_rel),
                                           ("image-to-text", texts, i2t_q, i2t_rel)):
        index.search(queries[0], top_k=10, rerank_k=args.rerank_k[0])  # warm-up
        results[name] = {"exhaustive": run_queries(index, queries, relevant, None)}
        for k in args.rerank_k:
            results[name][f"rerank-{k}"] = run_queries(index, queries, relevant, k)
        print(name, json.dumps(results[name]), flush=True)
    from results_md import git_commit, machine

    record = {"results": results, "rerank_k": args.rerank_k, "queries": args.queries, "commit": git_commit(),
              "machine": machine()}
    STORE.parent.mkdir(exist_ok=True)
    STORE.write_text(json.dumps(record, indent=2))
    if args.write_results:
        write(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
