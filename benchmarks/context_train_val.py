#!/usr/bin/env python
"""Does the context path overfit? The context knock-out on training images against validation.

    python benchmarks/context_train_val.py --model NAME=DIR [--model NAME=DIR ...] [--rerank-k 20]
        [--train-images 1000] [--splits train validation] [--threads N]

Cutting the context level out of the reasoning at evaluation *gains* 2-4 RSUM on Flickr8k
validation for every model of recipe v8 (docs/STREAMS.md). This script asks why: for each model
it scores the first ``--train-images`` training images (5 captions each, images the model was
trained on) and the 1,000 validation images with the full score, its cosine, and the full score
with the context level cut from the reasoning (``tshsr.analysis.context_cut``), all under the same
cosine top-K shortlist, and the full score with no reasoning step at all
(``tshsr.analysis.reasoning_off``: every level read out from its nodes as built, no message between
levels). If the cut costs RSUM on the training images but gains on validation, the
context path fits the training set rather than something that carries over; a model without a
context level (flat) gives the train-validation gap the rest of the model has anyway.

It also scores the mean of the full score and its context-cut variant (weights 1/2, fixed
beforehand): if two readouts of one model rank better together, removing the context level from
that mean costs what the cut alone loses. The control is the mean of the full score and its
no-reasoning variant: what averaging the score with any variant of itself gives.

One JSON line per (model, split) goes to benchmarks/results/context_train_val.jsonl (a pair
already recorded with the same weights is skipped, so a killed run resumes), and the
"context_train_val" section of docs/RESULTS.md is rewritten from the records.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from results_md import git_commit, machine, read_jsonl, replace_jsonl, write_section
from streams_diagnosis import _digest, encode_split, model_parser, parse_model_args

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "benchmarks" / "results" / "context_train_val.jsonl"
MEASURES = 3  # what a record holds: 1 full, cosine, context cut; 2 also no reasoning; 3 also both means
# (older records are re-measured when their model is given again)


def load_records(path: Path = STORE) -> list[dict]:
    return read_jsonl(path)


def measure(model_dir: Path, split_name: str, max_images: int | None, data_dir: str, cache_dir: str,
            rerank_k: int) -> dict:
    """RSUM of the full score, the cosine, the context knock-out, the mean of the full and the knocked-out
    score and the score with no reasoning step on one split (one cosine shortlist for all)."""
    import torch

    from tshsr.analysis import context_cut, reasoning_off, reranked_matrices, shortlisted_values
    from tshsr.metrics import retrieval_metrics

    model, split, images, texts = encode_split(model_dir, data_dir, cache_dir, split_name, max_images)
    variants = {}  # every variant of the full score on one cosine shortlist
    with torch.no_grad():
        variants["full"] = shortlisted_values(model, images, texts, rerank_k)
        with context_cut(model) as cuts:
            if cuts:
                variants["context cut"] = shortlisted_values(model, images, texts, rerank_k)
        with reasoning_off(model) as reasons:
            if reasons:
                variants["no reasoning"] = shortlisted_values(model, images, texts, rerank_k)
    full = variants["full"]

    def rsum_of(i2t, t2i) -> float:
        image_queries, caption_queries = reranked_matrices(full, i2t, t2i)
        return retrieval_metrics(image_queries, split.caption_image, caption_queries)["rsum"]

    rsum = {"cosine": rsum_of(full.i2t["cosine"], full.t2i["cosine"])}
    for name, v in variants.items():  # "full" first
        rsum[name] = rsum_of(v.i2t["full"], v.t2i["full"])
        # Two members with equal weight (fixed beforehand, not fitted). Removing the context level from the
        # mean with the cut leaves the cut alone; the mean with no reasoning is the control: what averaging the
        # full score with any other variant of itself gives.
        if name != "full":
            rsum[f"mean with {'cut' if name == 'context cut' else name}"] = rsum_of(
                (full.i2t["full"] + v.i2t["full"]) / 2, (full.t2i["full"] + v.t2i["full"]) / 2)
    return rsum


def summarize(records: list[dict]) -> str:
    lines = ["## Context knock-out on training images against validation (does the context path overfit?)", "",
             "Written by `python benchmarks/context_train_val.py`. RSUM (cosine top-K shortlist, the same for every "
             "ranker) of the full score, its cosine and the full score with the context level cut from the "
             "reasoning, on the first training images (seen in training) and on validation 1K. "
             "Δ cut = context cut − full: positive means the model ranks better without its context path. "
             "No reasoning: no step of the reasoning graph at all (each level read out from its nodes as built); "
             "Δ none = no reasoning − full (measured from session 26 on; — where not measured). "
             "Mean with cut: the mean of the full score and the context-cut score of the same model, weights "
             "fixed at 1/2 beforehand (session 33 on); Δ mean − cut is what removing the context level costs a "
             "model that scores this way. Mean with none: the full score averaged with its no-reasoning variant "
             "instead, the control (what averaging the score with another variant of itself gives).", "",
             "| model | split | images | full | cosine | full − cosine | context cut | Δ cut | no reasoning | Δ none "
             "| mean with cut | Δ mean − cut | mean with none |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        s = r["rsum"]
        cut = f"{s['context cut']:.1f}" if "context cut" in s else "—"
        delta = f"{s['context cut'] - s['full']:+.1f}" if "context cut" in s else "—"
        none = f"{s['no reasoning']:.1f} | {s['no reasoning'] - s['full']:+.1f}" if "no reasoning" in s else "— | —"
        mean = (f"{s['mean with cut']:.1f} | {s['mean with cut'] - s['context cut']:+.1f}" if "mean with cut" in s
                else "— | —")
        mean += f" | {s['mean with no reasoning']:.1f}" if "mean with no reasoning" in s else " | —"
        lines.append(f"| {r['name']} | {r['split']} | {r['images']} | {s['full']:.1f} | {s['cosine']:.1f} | "
                     f"{s['full'] - s['cosine']:+.1f} | {cut} | {delta} | {none} | {mean} |")
    if records:
        lines += ["", f"Protocol: cosine top-{records[-1]['rerank_k']} shortlist. Machine: {records[-1]['machine']}. "
                  "Models: " + "; ".join(sorted({f"{r['name']} = `{r['model']}` (weights {r['weights']})"
                                                 for r in records})) + "."]
    return "\n".join(lines)


def main() -> None:
    p = model_parser(__doc__)
    p.add_argument("--rerank-k", type=int, default=20)
    p.add_argument("--train-images", type=int, default=1000)
    p.add_argument("--splits", nargs="+", choices=["train", "validation"], default=["train", "validation"],
                   help="which splits to score (validation alone: the knock-out of a new model at the trainer's "
                        "protocol)")
    args = parse_model_args(p)
    records = load_records()
    for spec in [] if args.summary_only else args.model:
        name, _, directory = spec.partition("=")
        model_dir = Path(directory or name)
        weights = _digest(model_dir)
        for split_name, max_images in (("train", args.train_images), ("validation", None)):
            if split_name not in args.splits:
                continue
            if any(r["name"] == name and r["split"] == split_name and r["weights"] == weights
                   and r.get("measures", 1) >= MEASURES for r in records):
                continue
            start = time.time()
            m = measure(model_dir, split_name, max_images, args.data_dir, args.cache_dir, args.rerank_k)
            record = {"name": name, "model": str(model_dir), "weights": weights, "split": split_name,
                      "images": max_images or 1000, "rsum": m, "measures": MEASURES, "rerank_k": args.rerank_k,
                      "seconds": round(time.time() - start), "commit": git_commit(), "machine": machine()}
            records = replace_jsonl(record, STORE, lambda r: r["name"] == name and r["split"] == split_name)
            print(json.dumps({k: record[k] for k in ("name", "split", "rsum", "seconds")}), flush=True)
            write_section("context_train_val", summarize(records))
    write_section("context_train_val", summarize(records))


if __name__ == "__main__":
    main()
