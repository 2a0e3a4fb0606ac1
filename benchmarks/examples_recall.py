#!/usr/bin/env python
"""The demo's own out-of-distribution check: the 48 example photos against their 138-caption pool.

    python benchmarks/examples_recall.py --model shipped=checkpoints/tshsr-flickr8k [--model NAME=DIR ...]

For every model: image -> caption R@1 and R@5 (a hit when one of the photo's own two captions is
ranked there, among all 138 pool captions) and caption -> image R@1 (each of the 96 own captions
ranks the 48 photos), for the full score and for the model's own global cosine alone, plus the
photos whose top caption is wrong. For the diagnosis, the same counts for every part of the score
(each stream and each stream's level alone, each left out, as ``tshsr.analysis.rankers`` names
them) and for the context level cut out of the reasoning. These photos and captions are never used for training, early
stopping or choosing a recipe: this is a check of the demo, not a target to tune on. Records go
to benchmarks/results/examples_recall.jsonl (one per model and weights) and the
"examples_recall" section of docs/RESULTS.md is rewritten from them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from results_md import git_commit, machine, write_section

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
STORE = ROOT / "benchmarks" / "results" / "examples_recall.jsonl"


def recall_counts(scores: np.ndarray, own: list[list[int]]) -> dict:
    """scores [photos, pool captions]; own[i]: pool indices of photo i's captions."""
    order = np.argsort(-scores, axis=1, kind="stable")
    i2t_r1 = sum(order[i, 0] in own[i] for i in range(len(own)))
    i2t_r5 = sum(bool(set(order[i, :5]) & set(own[i])) for i in range(len(own)))
    t2i_hits = [int(np.argmax(scores[:, c]) == i) for i in range(len(own)) for c in own[i]]
    misses = [i for i in range(len(own)) if order[i, 0] not in own[i]]
    return {"i2t_r1": int(i2t_r1), "i2t_r5": int(i2t_r5), "t2i_r1": int(sum(t2i_hits)),
            "n_photos": len(own), "n_queries": len(t2i_hits), "misses": misses}


def part_counts(model, images, texts, own: list[list[int]], out=None) -> dict[str, dict]:
    """Counts of every ranker of one scoring pass (``out``, scored here when not given), and of the
    full score with the context level cut out of the reasoning (when the model has one); no miss lists."""
    from tshsr.analysis import context_cut, rankers

    out = out if out is not None else model.score_encoded(images, texts)
    ranked = rankers(out.contributions, out.level_scores, out.stream_scores, out.global_similarity)
    with context_cut(model) as has_context:
        if has_context:
            ranked["without context in reasoning"] = model.score_encoded(images, texts).scores
    counts = {name: recall_counts(v.float().numpy(), own) for name, v in ranked.items()}
    return {name: {k: c[k] for k in ("i2t_r1", "i2t_r5", "t2i_r1")} for name, c in counts.items()}


def measure(name: str, model_dir: Path) -> dict:
    from tshsr import TSHSRModel

    data = json.loads((EXAMPLES / "captions.json").read_text())
    photos = sorted(data["images"])
    pool = data["pool"]
    own = [[pool.index(c) for c in data["images"][p]] for p in photos]
    model = TSHSRModel.from_pretrained(model_dir)
    images = model.encode_images([str(EXAMPLES / "images" / p) for p in photos])
    texts = model.encode_texts(pool)
    out = model.score_encoded(images, texts)
    full = recall_counts(out.scores.numpy(), own)
    cosine = recall_counts(out.global_similarity.numpy(), own)
    full["misses"] = [photos[i] for i in full["misses"]]
    cosine["misses"] = [photos[i] for i in cosine["misses"]]
    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:16]
    return {"name": name, "model": str(model_dir), "weights": digest, "full": full, "cosine": cosine,
            "parts": part_counts(model, images, texts, own, out), "n_pool": len(pool), "commit": git_commit(),
            "machine": machine()}


def summarize(records: list[dict]) -> str:
    lines = ["## Demo examples: 48 photos against the 138-caption pool (out-of-distribution check)", "",
             "Written by `python benchmarks/examples_recall.py`. Counts, not percent: image -> caption R@1/R@5 "
             "out of 48 photos (hit = one of the photo's own two captions), caption -> image R@1 out of 96 "
             "captions. These photos are never used to train, early-stop or choose a recipe. Targets for "
             "the shipped model: R@1 >= 36/48, R@5 >= 46/48, caption -> image R@1 >= 72/96, and the full model "
             ">= 3 photos better at R@1 than its own cosine.", "",
             "| model | ranker | image→caption R@1 | R@5 | caption→image R@1 | photos ranked wrong at R@1 |",
             "|---|---|---|---|---|---|"]
    for rec in records:
        for ranker in ("full", "cosine"):
            r = rec[ranker]
            misses = ", ".join(m.removesuffix(".jpg") for m in r["misses"])
            lines.append(f"| {rec['name']} | {ranker} | {r['i2t_r1']}/{r['n_photos']} | {r['i2t_r5']}/{r['n_photos']} | "
                         f"{r['t2i_r1']}/{r['n_queries']} | {misses} |")
    lines += ["", "Models: " + "; ".join(f"{r['name']} = `{r['model']}` (weights {r['weights']}, commit "
                                          f"{r['commit']})" for r in records) + "."]
    return "\n".join(lines + parts_table(records))


def parts_table(records: list[dict]) -> list[str]:
    """The parts of the score on the photos, for the latest model measured with them."""
    with_parts = [r for r in records if "parts" in r]
    if not with_parts:
        return []
    rec = with_parts[-1]
    n, q = rec["full"]["n_photos"], rec["full"]["n_queries"]
    lines = ["", f"Each part of {rec['name']}'s score used alone as the ranker on the photos, or left out "
             "(as in the *Streams and levels* section; a diagnosis, never a choice of recipe):", "",
             "| ranker | image→caption R@1 | R@5 | caption→image R@1 |", "|---|---|---|---|"]
    for part, c in rec["parts"].items():
        lines.append(f"| {part} | {c['i2t_r1']}/{n} | {c['i2t_r5']}/{n} | {c['t2i_r1']}/{q} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR")
    args = p.parse_args()
    records = [json.loads(x) for x in STORE.read_text().splitlines() if x.strip()] if STORE.exists() else []
    for spec in args.model:
        name, _, directory = spec.partition("=")
        record = measure(name, Path(directory or name))
        records = [r for r in records if r["name"] != name] + [record]
        STORE.parent.mkdir(parents=True, exist_ok=True)
        STORE.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(json.dumps({k: record[k] for k in ("name", "full", "cosine")}))
    write_section("examples_recall", summarize(records))


if __name__ == "__main__":
    main()
