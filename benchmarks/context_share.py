#!/usr/bin/env python
"""Would the context level count at test time with a share of the score? Cross-fitted on validation.

    python benchmarks/context_share.py --model NAME=DIR [--model NAME=DIR ...] [--threads N]

Recipe v11 gives the context level no weight in the score (``--level-weights 1 0 1``): it reaches
the score only through the reasoning graph, which carries no test-time evidence (docs/STREAMS.md,
*The context level as the only path*). Yet every level is trained as a matcher of its own
(``--aux-level-weight``), so each stream's context score exists and ranks on its own. This script
asks whether adding it to the trained model's score, ``full + a * i2t/context + b * t2i/context``,
ranks better, with the weights (a, b) never chosen on the queries they are judged on:

* the 1,000 validation images are split in two folds (even and odd index; a caption belongs to
  its image's fold);
* on each fold, (a, b) is chosen from a grid by the fold's own RSUM (its image queries and its
  caption queries, ranked against all 1,000 images / 5,000 captions);
* every query is then ranked with the weights chosen on the *other* fold, and the 1K RSUM of
  that cross-fitted ranking is reported, beside the full score (a = b = 0) and, as an upper
  bound only, the best grid point chosen on all queries.

"Removing the context level" then costs cross-fitted − full. Both shortlists of the issue are
measured from one scoring pass: top-50 (the diagnosis protocol) and its top 20 (the trainer's).
The model is not changed; a share that helps would be set with ``--level-weights`` (both
streams) or need per-stream level weights. One JSON line per (model, weights) goes to
benchmarks/results/context_share.jsonl and the "context_share" section of docs/RESULTS.md is
rewritten from the records.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np

from results_md import git_commit, machine, read_jsonl, replace_jsonl, write_section

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "benchmarks" / "results" / "context_share.jsonl"
GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6)  # the level weights in the shipped score are 0.25 each
PARTS = ("i2t/context", "t2i/context")
SHORTLISTS = (50, 20)


def load_records(path: Path = STORE) -> list[dict]:
    return read_jsonl(path)


def query_ranks(s, caption_image: np.ndarray, weights: tuple[float, ...], k: int) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of each image query's best own caption and of each caption query's image, under
    ``full + sum(w * part)`` on the first ``k`` of the shortlisted candidates (``s``: a
    :class:`tshsr.analysis.Shortlisted`, scored at k or more); the rest in cosine order below."""
    from tshsr.analysis import reranked_matrices
    from tshsr.metrics import retrieval_ranks

    def value(side: dict) -> np.ndarray:
        v = side["full"][:, :k].copy()
        for w, part in zip(weights, PARTS):
            if w:
                v += w * side[part][:, :k]
        return v

    i2t, t2i = reranked_matrices(s, value(s.i2t), value(s.t2i))
    return retrieval_ranks(i2t, caption_image, t2i)


def rsum(image_ranks: np.ndarray, caption_ranks: np.ndarray) -> float:
    """RSUM (R@1 + R@5 + R@10, both ways, in percent) of the given queries' ranks."""
    from tshsr.metrics import recalls_from_ranks

    return float(sum(recalls_from_ranks(image_ranks).values()) + sum(recalls_from_ranks(caption_ranks).values()))


def cross_fit(ranks: dict[tuple[float, ...], tuple[np.ndarray, np.ndarray]], image_fold: np.ndarray,
              caption_fold: np.ndarray) -> dict:
    """From every grid point's per-query ranks: the weights each fold chooses on its own queries, the
    1K RSUM when each query is ranked with the other fold's choice, the full score's (all weights
    0) and the in-sample best (chosen on every query: an upper bound, not a result)."""
    def fold_rsum(w, f):
        image_ranks, caption_ranks = ranks[w]
        return rsum(image_ranks[image_fold == f], caption_ranks[caption_fold == f])

    zero = tuple(0.0 for _ in next(iter(ranks)))
    chosen = {f: max(ranks, key=lambda w: (fold_rsum(w, f), -sum(w))) for f in (0, 1)}  # ties: the smaller share
    image_ranks = np.where(image_fold == 0, ranks[chosen[1]][0], ranks[chosen[0]][0])
    caption_ranks = np.where(caption_fold == 0, ranks[chosen[1]][1], ranks[chosen[0]][1])
    best = max(ranks, key=lambda w: (rsum(*ranks[w]), -sum(w)))
    return {"full": rsum(*ranks[zero]), "cross_fitted": rsum(image_ranks, caption_ranks),
            "chosen": {str(f): list(w) for f, w in chosen.items()},
            "best_in_sample": rsum(*ranks[best]), "best_weights": list(best)}


def measure(model_dir: Path, data_dir: str, cache_dir: str) -> dict:
    import torch

    from streams_diagnosis import encode_split
    from tshsr.analysis import shortlisted_values

    model, split, images, texts = encode_split(model_dir, data_dir, cache_dir)
    with torch.no_grad():
        s = shortlisted_values(model, images, texts, max(SHORTLISTS))
    if any(part not in s.i2t for part in PARTS):
        raise SystemExit(f"{model_dir}: the model has no {' and '.join(PARTS)} level scores to share")
    caption_image = np.asarray(split.caption_image, dtype=np.int64)
    fold = np.arange(len(s.similarity)) % 2  # by image index; a caption goes with its image
    image_fold = fold[np.bincount(caption_image, minlength=len(fold)) > 0]  # image queries: images with captions
    caption_fold = fold[caption_image]
    out = {}
    for k in SHORTLISTS:
        ranks = {w: query_ranks(s, caption_image, w, k) for w in itertools.product(GRID, repeat=len(PARTS))}
        out[str(k)] = cross_fit(ranks, image_fold, caption_fold)
    return out


def summarize(records: list[dict]) -> str:
    lines = ["## A score share for the context level, cross-fitted on validation", "",
             "Written by `python benchmarks/context_share.py`. Flickr8k validation 1K, the trained model unchanged: "
             "full = its score (the context level has no share); shared = full + a · i2t/context + b · t2i/context "
             "(each level weight of the full score is 0.25), with (a, b) chosen from the grid "
             f"{', '.join(str(g) for g in GRID)} on one half of the images (even or odd index, captions with their "
             "image) and applied to the other half's queries, so no query is ranked with weights chosen on it. "
             "Δ = shared − full: what removing the shared context level would cost. The best grid point chosen on "
             "all queries is an upper bound, not a result.", "",
             "| model | shortlist | full | shared (cross-fitted) | Δ | (a, b) chosen on even / odd | best in sample "
             "(a, b) |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        for k, m in r["shortlists"].items():
            even, odd = (tuple(m["chosen"][f]) for f in ("0", "1"))
            lines.append(f"| {r['name']} | top-{k} | {m['full']:.1f} | {m['cross_fitted']:.1f} | "
                         f"{m['cross_fitted'] - m['full']:+.1f} | {even} / {odd} | {m['best_in_sample']:.1f} "
                         f"{tuple(m['best_weights'])} |")
    if records:
        lines += ["", f"Machine: {records[-1]['machine']}. Models: "
                  + "; ".join(sorted({f"{r['name']} = `{r['model']}` (weights {r['weights']}, commit {r['commit']})"
                                      for r in records})) + "."]
    return "\n".join(lines)


def main() -> None:
    from streams_diagnosis import _digest, model_parser, parse_model_args

    args = parse_model_args(model_parser(__doc__))
    records = load_records()
    for spec in [] if args.summary_only else args.model:
        name, _, directory = spec.partition("=")
        model_dir = Path(directory or name)
        weights = _digest(model_dir)
        if any(r["name"] == name and r["weights"] == weights for r in records):
            continue
        start = time.time()
        record = {"name": name, "model": str(model_dir), "weights": weights,
                  "shortlists": measure(model_dir, args.data_dir, args.cache_dir),
                  "seconds": round(time.time() - start), "commit": git_commit(), "machine": machine()}
        records = replace_jsonl(record, STORE, lambda r: r["name"] == name)
        print(json.dumps({k: record[k] for k in ("name", "shortlists", "seconds")}), flush=True)
    write_section("context_share", summarize(records))


if __name__ == "__main__":
    main()
