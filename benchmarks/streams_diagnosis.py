#!/usr/bin/env python
"""What each stream and each level of a trained model adds, on Flickr8k validation (1K).

    python benchmarks/streams_diagnosis.py --model shipped=checkpoints/tshsr-flickr8k [--model NAME=DIR ...]
        [--rerank-k 0] [--data-dir ../shared/data/flickr8k] [--threads N]

For every model: R@1/5/10 and RSUM of the full score, of the cosine of its global vectors, of
each of the six stream/level scores alone, of each stream alone, and leave-one-out (the full
score without one stream's contributions, or without one level's), and for a model with a
context level the full score with that level cut out of the reasoning graph (knock-out: what the
other levels lose without it). ``--rerank-k 0`` (default)
scores all 5M pairs; ``--rerank-k K`` gives every ranker the same cosine top-K shortlist (cheap,
for comparing training recipes). One JSON line per (model, protocol) goes to
benchmarks/results/streams.jsonl (a model already recorded with the same weights is not
rescored), and the "streams" section of docs/RESULTS.md is rewritten from all the records.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from results_md import git_commit, machine, read_jsonl, replace_jsonl, write_jsonl, write_section

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "benchmarks" / "results" / "streams.jsonl"


def _digest(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:16]


def _slim(metrics: dict[str, dict]) -> dict[str, dict]:
    """The recorded part of each ranker's metrics."""
    return {k: {"i2t": m["i2t"], "t2i": m["t2i"], "rsum": m["rsum"]} for k, m in metrics.items()}


def _recorded(records: list[dict], name: str, model_dir: Path, protocol: str | None = None) -> list[dict]:
    """The records of ``name`` diagnosed with these weights (and ``protocol``, if given); exits when none."""
    mine = [r for r in records if r["name"] == name and r["weights"] == _digest(model_dir)
            and protocol in (None, r["protocol"])]
    if not mine:
        raise SystemExit(f"{name}: no {protocol + ' ' if protocol else ''}diagnosis of these weights recorded; "
                         "diagnose it first")
    return mine


def load_records(path: Path = STORE) -> list[dict]:
    return read_jsonl(path)


def store_record(record: dict, path: Path = STORE) -> list[dict]:
    """Add ``record`` to the file (replacing one of the same name and protocol) and return all records.
    The file is read again just before the write, so that records another study process stored while
    this one diagnosed are kept, and it is replaced atomically."""
    return replace_jsonl(record, path, lambda r: r["name"] == record["name"] and r["protocol"] == record["protocol"])


def _write(records: list[dict], path: Path = STORE) -> list[dict]:
    return write_jsonl(records, path)


def encode_split(model_dir: Path, data_dir: str, cache_dir: str, split_name: str = "validation",
                 max_images: int | None = None):
    """(model, split, image encoding, text encoding) of a Flickr8k split (default: validation),
    from the feature cache; ``max_images`` keeps the split's first images. A run trained with
    ``--channels-last`` reads the features it trained on (that layout's cache entries)."""
    import torch

    from tshsr import TSHSRModel
    from tshsr.data import load_split
    from tshsr_train.loop import BatchSource, encode_source

    model = TSHSRModel.from_pretrained(model_dir)
    train_args = Path(model_dir) / "train_args.json"
    if train_args.exists() and json.loads(train_args.read_text()).get("channels_last"):
        model.image_backbone.set_channels_last()
    split = load_split("imagefolder", split_name, data_dir=data_dir, max_images=max_images)
    source = BatchSource(model, split, cache_dir, progress=True)
    images, texts = encode_source(model, source, torch.device("cpu"))
    return model, split, images, texts


def add_spread(name: str, model_dir: Path, data_dir: str, cache_dir: str) -> list[dict]:
    """Measure the context units' spread of an already diagnosed model (same name and weights) and
    add it to its records in place (records written before the spread was measured)."""
    records = load_records()
    mine = _recorded(records, name, model_dir)
    _, _, images, texts = encode_split(model_dir, data_dir, cache_dir)
    spread = {"text": context_spread(texts), "image": context_spread(images)}
    for record in mine:
        if spread["text"]:
            record["context_spread"] = spread
    print(f"{name}: {spread}")
    return _write(records)


def add_knockout(name: str, model_dir: Path, data_dir: str, cache_dir: str, rerank_k: int | None) -> list[dict]:
    """Score an already diagnosed model (same name, weights and protocol) with its context level cut
    from the reasoning and add those rankers to its record in place (records written before the
    knock-out was measured)."""
    from tshsr.analysis import knockout_metrics

    protocol = "exhaustive" if rerank_k is None else f"rerank-{rerank_k}"
    records = load_records()
    mine = _recorded(records, name, model_dir, protocol)
    model, split, images, texts = encode_split(model_dir, data_dir, cache_dir)
    score_all = (lambda: model.score_encoded(images, texts, progress=True)) if rerank_k is None else None
    knocked = knockout_metrics(model, images, texts, split.caption_image, rerank_k=rerank_k, score_all=score_all)
    if not knocked:
        raise SystemExit(f"{name}: the model has no context level in its reasoning to cut")
    for record in mine:
        record["metrics"].update(_slim(knocked))
    print(f"{name}: " + ", ".join(f"{k} {m['rsum']:.1f}" for k, m in knocked.items()))
    return _write(records)


def context_spread(encoding) -> dict | None:
    """How far each context unit spreads over its side's units, on average over the items and the
    units: the effective count exp(entropy of its membership) against the item's valid units. A
    unit that spreads over nearly all of them is the item's mean, i.e. a second global vector."""
    import torch

    if encoding.membership is None:
        return None
    p = encoding.membership.float()
    effective = torch.exp(-(p * p.clamp_min(1e-12).log()).sum(-1))  # [N, C]
    return {"effective": round(float(effective.mean()), 2), "units": round(float(encoding.mask.sum(1).float().mean()), 2),
            "count": int(p.shape[1])}


def diagnose(name: str, model_dir: Path, data_dir: str, rerank_k: int | None, cache_dir: str) -> dict:
    from tshsr.analysis import knockout_metrics, part_metrics, shortlisted_values, stream_agreement

    model, split, images, texts = encode_split(model_dir, data_dir, cache_dir)
    start = time.time()
    if rerank_k is None:
        from tshsr.evaluate import resolve_compile

        compile = resolve_compile("auto", model, len(images) * len(texts), images.device)
        score_all = lambda: model.score_encoded(images, texts, progress=True, compile=compile)  # noqa: E731
        metrics = part_metrics(model, images, texts, split.caption_image, score_all=score_all)
        metrics.update(knockout_metrics(model, images, texts, split.caption_image, score_all=score_all))
        agreement = {}
    else:
        shortlisted = shortlisted_values(model, images, texts, rerank_k)
        metrics = part_metrics(model, images, texts, split.caption_image, rerank_k=rerank_k, shortlisted=shortlisted)
        agreement = stream_agreement(shortlisted, split.caption_image)
        metrics.update(knockout_metrics(model, images, texts, split.caption_image, rerank_k=rerank_k))
    spread = {side: context_spread(enc) for side, enc in (("text", texts), ("image", images))}
    return {"name": name, "model": str(model_dir), "weights": _digest(model_dir), "agreement": agreement,
            **({"context_spread": spread} if spread["text"] else {}),
            "protocol": "exhaustive" if rerank_k is None else f"rerank-{rerank_k}",
            "mixing_weights": {k: round(v, 4) for k, v in model.mixing_weights().items()},
            "metrics": _slim(metrics),
            "seconds": round(time.time() - start, 1), "n_images": len(split), "n_captions": len(split.captions),
            "commit": git_commit(), "machine": machine()}


def _row(label: str, m: dict, full: float | None) -> str:
    delta = "" if full is None else f"{m['rsum'] - full:+.1f}"
    return (f"| {label} | {m['i2t']['r1']:.1f} | {m['i2t']['r5']:.1f} | {m['i2t']['r10']:.1f} | "
            f"{m['t2i']['r1']:.1f} | {m['t2i']['r5']:.1f} | {m['t2i']['r10']:.1f} | {m['rsum']:.1f} | {delta} |")


def summarize(records: list[dict]) -> str:
    lines = ["## Streams and levels: what each part adds (Flickr8k validation, 1,000 images / 5,000 captions)", "",
             "Written by `python benchmarks/streams_diagnosis.py` from benchmarks/results/streams.jsonl. "
             "*alone*: that score used as the only ranker; *without*: the full score minus that part's "
             "contributions (leave-one-out); *without context in reasoning*: the full score with the context level "
             "cut out of each stream's reasoning graph (knock-out: the global and local nodes no longer read it; "
             "measured on models diagnosed since it exists); Δ is RSUM minus the full model's. Protocol `exhaustive` ranks all "
             "5M pairs; `rerank-K` reranks the same cosine top-K shortlist with every ranker.", ""]
    for rec in records:
        metrics = rec["metrics"]
        full = metrics["full"]["rsum"]
        weights = ", ".join(f"{k} {v:.3f}" for k, v in rec["mixing_weights"].items())
        lines += [f"### {rec['name']} ({rec['protocol']})", "",
                  f"Model `{rec['model']}` (weights {rec['weights']}); mixing weights: {weights}. "
                  f"Commit {rec['commit']}; {rec['machine']}; scoring took {rec['seconds']:.0f} s.", "",
                  "| ranker | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM | Δ vs full |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key, m in metrics.items():
            label = key if key in ("full", "cosine") or key.startswith("without") else f"{key} alone"
            lines.append(_row(label, m, None if key == "full" else full))
        lines.append("")
        for direction, a in rec.get("agreement", {}).items():
            queries = "photo" if direction == "i2t" else "caption"
            lines.append(f"- {direction}, the two streams alone: same first candidate for {100 * a['same_top1']:.0f} % "
                         f"of the {queries} queries, mean rank correlation {a['spearman']:.2f} over the shortlist; "
                         f"first candidate right for both {100 * a['both']:.1f} %, only i2t {100 * a['only_i2t']:.1f} "
                         f"%, only t2i {100 * a['only_t2i']:.1f} %, neither {100 * a['neither']:.1f} %.")
        spread = rec.get("context_spread")
        if spread:
            t, i = spread["text"], spread["image"]
            lines.append(f"- context units: each of the {t['count']} text units spreads over {t['effective']:.1f} of a "
                         f"caption's {t['units']:.1f} tokens, each of the {i['count']} image units over "
                         f"{i['effective']:.1f} of {i['units']:.0f} regions (effective count, exp of the entropy of "
                         f"its membership).")
        if rec.get("agreement") or spread:
            lines.append("")
    return "\n".join(lines)


def model_parser(doc: str | None, model_help: str = "a model (repeatable)") -> argparse.ArgumentParser:
    """The arguments of every script here that scores trained models on Flickr8k from the feature
    cache: --model NAME=DIR (repeatable), --data-dir, --cache-dir, --threads and --summary-only."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR", help=model_help)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    p.add_argument("--cache-dir", default=str(ROOT / "cache" / "features"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--summary-only", action="store_true", help="rewrite the RESULTS section from the records")
    return p


def parse_model_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse a :func:`model_parser` command line and apply --threads."""
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def main() -> None:
    p = model_parser(__doc__, "model to diagnose (repeatable)")
    p.add_argument("--rerank-k", type=int, default=0, help="0: exhaustive; K: same cosine top-K shortlist for all")
    p.add_argument("--spread-only", action="store_true",
                   help="only measure the context units' spread of already diagnosed models and add it to their records")
    p.add_argument("--knockout-only", action="store_true",
                   help="only score already diagnosed models with the context level cut from the reasoning and "
                        "add that to their records")
    args = parse_model_args(p)
    records = load_records()
    rerank_k = args.rerank_k or None
    protocol = "exhaustive" if rerank_k is None else f"rerank-{rerank_k}"
    for spec in [] if args.summary_only else args.model:
        name, _, directory = spec.partition("=")
        model_dir = Path(directory or name)
        if args.spread_only:
            records = add_spread(name, model_dir, args.data_dir, args.cache_dir)
            continue
        if args.knockout_only:
            records = add_knockout(name, model_dir, args.data_dir, args.cache_dir, rerank_k)
            continue
        done = any(r["name"] == name and r["protocol"] == protocol and r["weights"] == _digest(model_dir)
                   and ("agreement" in r or rerank_k is None) for r in records)  # older: no stream agreement
        if done:
            print(f"{name}: already recorded ({protocol})")
            continue
        record = diagnose(name, model_dir, args.data_dir, rerank_k, args.cache_dir)
        records = store_record(record)
        print(json.dumps({k: v["rsum"] for k, v in record["metrics"].items()}, indent=1))
    write_section("streams", summarize(records))


if __name__ == "__main__":
    main()
