#!/usr/bin/env python
"""How much do two independently trained models add to each other, next to how much one
model's two streams add to each other?

    python benchmarks/seed_ensemble.py --model s0=runs/streams/detach-skip-lite2-s0 \
        --model s1=runs/streams/detach-skip-lite2-s1 [--rerank-k 50] [--threads 1]
    python benchmarks/seed_ensemble.py --model s0-i2t=runs/streams/detach-skip-lite2-s0@i2t \
        --model s1-t2i=runs/streams/detach-skip-lite2-s1@t2i

``DIR@STREAM`` takes only that stream's score of the model: one model's i2t stream with another
seed's t2i stream is the two-stream model whose streams share nothing.

Removing a stream from a TSHSR score costs a few RSUM at most (docs/STREAMS.md): the two streams
agree (rank correlation ~0.95). This measures the scale to read that against: the same models
trained with different seeds, their full scores averaged. Every model, alone and in the
average, reranks one common shortlist (the top K of the mean of the models' cosines, per image
and per caption; the rest stays in that cosine order), so the gain is the models' and not the
shortlist's. Dual encoders (cosine only) are ranked exhaustively. Records go to
benchmarks/results/seed_ensemble.jsonl (one per set of models) and the "seed_ensemble" section
of docs/RESULTS.md is rewritten from them. Flickr8k validation, 1,000 images / 5,000 captions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from results_md import git_commit, machine, read_jsonl, replace_jsonl, write_section
from streams_diagnosis import _digest, encode_split, model_parser, parse_model_args

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "benchmarks" / "results" / "seed_ensemble.jsonl"
PAIR_CHUNK = 4096


def _pair_scores(model, images, texts, rows: np.ndarray, cols: np.ndarray, stream: str | None) -> np.ndarray:
    """The full score of each pair, or only ``stream``'s score."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(rows), PAIR_CHUNK):
            r = torch.from_numpy(rows[start:start + PAIR_CHUNK])
            c = torch.from_numpy(cols[start:start + PAIR_CHUNK])
            scored = model.score_pairs(images, texts, r, c)
            out.append((scored.scores if stream is None else scored.stream_scores[stream]).double().numpy())
    return np.concatenate(out)


def _parse(spec: str) -> tuple[str, Path, str | None]:
    name, _, rest = spec.partition("=")
    directory, _, stream = (rest or name).partition("@")
    if stream not in ("", "i2t", "t2i"):
        raise SystemExit(f"seed_ensemble: unknown stream {stream!r} in {spec!r} (i2t or t2i)")
    return name, Path(directory), stream or None


def ensemble(models: dict[str, tuple[Path, str | None]], data_dir: str, cache_dir: str, rerank_k: int) -> dict:
    """Metrics of each model alone and of the mean of their scores, on one common protocol."""
    import torch

    from tshsr.analysis import shortlist_pairs
    from tshsr.metrics import retrieval_metrics

    start = time.time()
    encoded = {name: encode_split(d, data_dir, cache_dir) for name, (d, _) in models.items()}
    caption_image = np.asarray(next(iter(encoded.values()))[1].caption_image, dtype=np.int64)
    with torch.no_grad():
        cosines = {n: m.global_similarity(i, t).double().numpy() for n, (m, _, i, t) in encoded.items()}
    mean_cosine = sum(cosines.values()) / len(cosines)
    cross = [m.head_kind.cross_attention for m, *_ in encoded.values()]
    if not any(cross):
        ranked = {**cosines, "mean": mean_cosine}
        metrics = {n: retrieval_metrics(s, caption_image) for n, s in ranked.items()}
        protocol = "exhaustive cosine"
    elif all(cross):
        i2t_rows, i2t_cols, t2i_rows, t2i_cols = shortlist_pairs(mean_cosine, rerank_k)
        n_texts = mean_cosine.shape[1]
        keys = np.concatenate([i2t_rows * n_texts + i2t_cols, t2i_rows * n_texts + t2i_cols]).astype(np.int64)
        unique, inverse = np.unique(keys, return_inverse=True)
        scores = {n: _pair_scores(m, i, t, unique // n_texts, unique % n_texts, models[n][1])
                  for n, (m, _, i, t) in encoded.items()}
        scores["mean"] = sum(scores.values()) / len(scores)
        metrics = {}
        n_i2t = len(i2t_rows)
        for name, values in scores.items():
            floor = values.min() - 1.0
            low = mean_cosine - mean_cosine.max() + floor  # cosine order, below every reranked value
            i2t, t2i = low.copy(), low.copy()
            i2t[i2t_rows, i2t_cols] = values[inverse[:n_i2t]]
            t2i[t2i_rows, t2i_cols] = values[inverse[n_i2t:]]
            metrics[name] = retrieval_metrics(i2t, caption_image, t2i)
        protocol = f"rerank-{rerank_k} of the mean cosine"
    else:
        raise SystemExit("seed_ensemble: give models of one kind (all dual encoders, or all cross-attention models)")
    return {"models": {n: str(d) + (f"@{st}" if st else "") for n, (d, st) in models.items()},
            "weights": {n: _digest(d) + (f"@{st}" if st else "") for n, (d, st) in models.items()},
            "protocol": protocol, "metrics": metrics, "seconds": round(time.time() - start, 1),
            "commit": git_commit(), "machine": machine()}


def load_records() -> list[dict]:
    return read_jsonl(STORE)


def summarize(records: list[dict]) -> str:
    lines = ["## Seed ensembles: what a second model adds, next to what a second stream adds", "",
             "Written by `python benchmarks/seed_ensemble.py`. Flickr8k validation (1,000 images / 5,000 "
             "captions). Each model alone and the mean of their scores, on one common protocol; *gain* is the "
             "ensemble's RSUM minus the mean of the models' own. Read it against the cost of removing one "
             "stream from a model (docs/STREAMS.md): two streams of one model add to each other far less "
             "than two seeds do when the gain here is much larger.", "",
             "| models | protocol | RSUM alone | ensemble | gain |", "|---|---|---|---|---|"]
    for rec in records:
        m = rec["metrics"]
        alone = [m[n]["rsum"] for n in rec["models"]]
        gain = m["mean"]["rsum"] - sum(alone) / len(alone)
        names = ", ".join(f"{n} (`{Path(d).name}`)" for n, d in rec["models"].items())  # DIR or DIR@STREAM
        lines.append(f"| {names} | {rec['protocol']} | {', '.join(f'{v:.1f}' for v in alone)} | "
                     f"{m['mean']['rsum']:.1f} | {gain:+.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = model_parser(__doc__, "a model (two or more)")
    p.add_argument("--rerank-k", type=int, default=50)
    args = parse_model_args(p)
    records = load_records()
    if not args.summary_only:
        if len(args.model) < 2:
            p.error("give at least two --model NAME=DIR")
        models = {name: (directory, stream) for name, directory, stream in map(_parse, args.model)}
        if any(stream for _, stream in models.values()) and not all(
                (d / "config.json").exists() and json.loads((d / "config.json").read_text()).get("head") != "dual"
                for d, _ in models.values()):
            p.error("@STREAM needs two-stream models")
        record = ensemble(models, args.data_dir, args.cache_dir, args.rerank_k)
        print(json.dumps({n: m["rsum"] for n, m in record["metrics"].items()}))
        records = replace_jsonl(record, STORE, lambda r: r["weights"] == record["weights"])
    write_section("seed_ensemble", summarize(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
