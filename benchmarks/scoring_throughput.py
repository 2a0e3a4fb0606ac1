#!/usr/bin/env python
"""Scoring throughput of the cross-attention head on random region and word features.

    python benchmarks/scoring_throughput.py --preset tshsr --regions 36 --words 12 \\
        --embed-dim 1024 --sim-dim 256 --images 100 --captions 300 --json OUT [--write-results] [--no-compile]

Writes ``{"pairs_per_s", "gflop_per_pair", "peak_gflops", "efficiency", ...}``:
``gflop_per_pair`` counts the multiply-adds of the per-pair work (x2 FLOPs; the per-item
projections are shared by all pairs of an item and not counted), ``peak_gflops`` is a large
fp32 matrix product timed in the same run, ``efficiency = pairs_per_s x gflop_per_pair /
peak_gflops``: each of ``--repeats`` rounds times the peak right before a pass over all pairs, and
the round with the median efficiency is reported (its pairs/s and peak), with the range. It also
times SGRAF's evaluation style (one caption against all images at a time) and checks that both
give the same scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from tshsr import TSHSRConfig, TSHSRModel, Vocabulary  # noqa: E402
from tshsr.evaluate import AUTO_COMPILE_PAIRS, resolve_compile  # noqa: E402


def pair_macs(cfg: TSHSRConfig, K: int, L: int) -> int:
    """Multiply-adds per (image, caption) pair of the head's per-pair work."""
    D, m, T = cfg.embed_dim, cfg.sim_dim, cfg.reasoning_steps
    if cfg.head == "dual":
        return D
    if cfg.head in ("sgr", "saf"):
        n = L + 1
        macs = 2 * L * K * D + L * D * m + D * m + m
        if cfg.head == "sgr":
            macs += T * (3 * n * m * m + 2 * n * n * m)
        else:
            macs += 2 * n * m
        return macs
    total = 0
    for stream in cfg.streams:
        nq, nk = (K, L) if stream == "i2t" else (L, K)
        C = cfg.context_units_image if stream == "i2t" else cfg.context_units_text
        total += 2 * nq * nk * D + nq * D * m + D * m  # attention, attended, local + global nodes
        total += 2 * nq * m + 2 * m  # local readout, global readout
        has_ctx = "context" in cfg.levels
        if has_ctx:
            total += 2 * C * nk * D + C * D * m + 2 * C * m
        per_step = 2 * nq * m + m * m  # local gate + down gate, up to global
        per_step += (C * nq * m + C * m * m + C * m + 4 * C * m * m + nq * C * m) if has_ctx else (nq * m + m * m)
        total += T * per_step
    return total


def peak_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _range(r: dict) -> str:
    lo, hi = r.get("efficiency_range") or (None, None)
    return "" if lo is None else f"{100 * lo:.0f}-{100 * hi:.0f} %"


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tshsr", choices=list(TSHSRConfig.PRESETS))
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--words", type=int, default=12)
    p.add_argument("--embed-dim", type=int, default=1024)
    p.add_argument("--sim-dim", type=int, default=256)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--captions", type=int, default=300)
    p.add_argument("--block-pairs", type=int, default=None, help="default: the scoring engine's auto_block_pairs")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="score through torch.compile (timed after compiling); default: on when a C++ compiler is "
                        "found, as `python -m tshsr.evaluate` does for large splits")
    p.add_argument("--repeats", type=int, default=5,
                   help="rounds of (peak measurement, timed pass over all pairs); the median round is reported")
    p.add_argument("--naive-captions", type=int, default=30, help="captions timed in the naive loop")
    p.add_argument("--json", default=None)
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    vocab = Vocabulary([f"w{i}" for i in range(100)])
    cfg = TSHSRConfig.preset(args.preset, image_encoder="precomputed", image_feature_dim=args.embed_dim,
                             text_encoder="bigru", vocab_size=len(vocab), embed_dim=args.embed_dim,
                             sim_dim=args.sim_dim)
    model = TSHSRModel(cfg, vocabulary=vocab).eval()
    if args.compile is None:  # what the evaluation does on a large split (tshsr.evaluate.resolve_compile)
        args.compile = resolve_compile("auto", model, AUTO_COMPILE_PAIRS, torch.device("cpu"))
    K, L = args.regions, args.words
    img = model.encode_image_features(torch.randn(args.images, K, args.embed_dim),
                                      torch.ones(args.images, K, dtype=torch.bool))
    txt = model.encode_text_features(torch.randn(args.captions, L, args.embed_dim),
                                     torch.ones(args.captions, L, dtype=torch.bool))
    block = args.block_pairs or model.engine.auto_block_pairs(img, txt)
    start = time.perf_counter()
    bi, bt = model.engine.block_shape(img, txt, block)  # the block shape score_encoded will use
    model.score_encoded(img[:bi], txt[:bt], block_pairs=block, compile=args.compile)  # warm-up (and compilation)
    warmup_seconds = time.perf_counter() - start
    # Paired rounds: each timed pass over all pairs is preceded by its own peak measurement, so
    # both see the same state of this shared machine (other tenants move both by +-15 %), and the
    # round with the median efficiency is reported.
    rounds = []
    for _ in range(args.repeats):
        peak = peak_gflops(reps=5)
        start = time.perf_counter()
        scores = model.score_encoded(img, txt, block_pairs=block, compile=args.compile).scores
        rounds.append((args.images * args.captions / (time.perf_counter() - start), peak))
    gflop = 2 * pair_macs(cfg, K, L) / 1e9
    ranked = sorted(rounds, key=lambda r: r[0] / r[1])  # by efficiency
    pairs_per_s, peak = ranked[(len(ranked) - 1) // 2]
    effs = [pps * gflop / pk for pps, pk in ranked]

    # SGRAF-style evaluation: one caption against every image at a time.
    n_naive = min(args.naive_captions, args.captions)
    start = time.perf_counter()
    naive = torch.empty(args.images, n_naive)
    every_image = torch.arange(args.images)
    for t in range(n_naive):
        naive[:, t] = model.score_pairs(img, txt, every_image, torch.full_like(every_image, t)).scores
    naive_pairs_per_s = args.images * n_naive / (time.perf_counter() - start)
    max_diff = (naive - scores[:, :n_naive]).abs().max().item()
    if max_diff > 1e-4:
        raise SystemExit(f"naive and blocked scores differ by {max_diff}")

    result = {"preset": args.preset, "pairs_per_s": round(pairs_per_s, 1), "gflop_per_pair": gflop,
              "peak_gflops": round(peak, 1), "efficiency": round(pairs_per_s * gflop / peak, 4),
              "efficiency_range": [round(effs[0], 4), round(effs[-1], 4)],
              "rounds": [{"pairs_per_s": round(pps, 1), "peak_gflops": round(pk, 1)} for pps, pk in rounds],
              "naive_pairs_per_s": round(naive_pairs_per_s, 1), "max_abs_diff_vs_naive": max_diff,
              "threads": torch.get_num_threads(), "block_pairs": block, "repeats": args.repeats, "compile": args.compile,
              "warmup_seconds": round(warmup_seconds, 1), "sizes": {k: getattr(args, k) for k in
                                                           ("regions", "words", "embed_dim", "sim_dim", "images", "captions")}}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.write_results:
        from results_md import git_commit, machine, write_section

        store = ROOT / "benchmarks" / "results" / "scoring_throughput.json"
        store.parent.mkdir(exist_ok=True)
        table = json.loads(store.read_text()) if store.exists() else {}
        table[args.preset + (" (compiled)" if args.compile else "")] = result
        store.write_text(json.dumps(table, indent=2))
        lines = ["## Scoring throughput (random features, exhaustive blocks)", "",
                 f"Machine: {machine()}. Commit {git_commit()}.",
                 f"`python benchmarks/scoring_throughput.py --preset P --regions {K} --words {L} --embed-dim "
                 f"{args.embed_dim} --sim-dim {args.sim_dim} --images {args.images} --captions {args.captions} "
                 "--write-results [--no-compile]` (compiled is the default, as in `python -m tshsr.evaluate` on large splits). GFLOP/pair counts the per-pair multiply-adds x2; efficiency = pairs/s x "
                 f"GFLOP/pair / peak. The run is {args.repeats} rounds, each a peak measurement (a 2048^3 fp32 matmul, best of 5) right before a "
                 "timed pass over all pairs, so that both see the same state of this shared VM (other tenants move either by "
                 "+-15 %); the table shows the round with the median efficiency and the range over the rounds. "
                 "Targets: sgr >= 60 %, tshsr >= 50 %.", "",
                 "| preset | block pairs | pairs/s | GFLOP/pair | peak GFLOP/s | efficiency | range over rounds | naive loop pairs/s | max diff |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for name, r in table.items():
            lines.append(f"| {name} | {r['block_pairs']} | {r['pairs_per_s']:.0f} | {r['gflop_per_pair']:.4f} | {r['peak_gflops']:.0f} | "
                         f"{100 * r['efficiency']:.1f} % | {_range(r)} | {r['naive_pairs_per_s']:.0f} | {r['max_abs_diff_vs_naive']:.1e} |")
        write_section("scoring_throughput", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
