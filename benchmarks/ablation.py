#!/usr/bin/env python
"""The ablation study of the paper's two claims, on Flickr8k with the same frozen encoders and the
same training budget for every model.

    python benchmarks/ablation.py [--seeds 0 1] [--presets dual sgr saf t2i i2t flat tshsr]

Each (preset, seed) run trains with train.py and is recorded in benchmarks/results/ablation.json
as soon as it finishes; a restarted script skips finished runs and resumes an interrupted one
(--resume), so the table can be completed over several sessions. After every run the
"ablation" section of docs/RESULTS.md is rewritten from what is recorded so far.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from results_md import git_commit, machine, write_section  # noqa: E402

PRESETS = ["dual", "sgr", "saf", "t2i", "i2t", "flat", "tshsr"]
BUDGET = ["--max-train-images", "2000", "--epochs", "3", "--lr-update", "2", "--batch-size", "128",
          "--embed-dim", "256", "--sim-dim", "128", "--max-val-images", "200", "--val-rerank-k", "0"]
STORE = ROOT / "benchmarks" / "results" / "ablation.json"


def run_one(preset: str, seed: int, data_dir: str, runs: Path, threads: int | None) -> dict:
    out = runs / f"{preset}-s{seed}"
    cmd = [sys.executable, "train.py", "--dataset", "flickr8k", "--data-dir", data_dir, "--output-dir", str(out),
           "--preset", preset, "--seed", str(seed), "--no-progress", *BUDGET]
    if threads:
        cmd += ["--threads", str(threads)]
    if (out / "checkpoint").exists() and not (out / "train_args.json").exists():
        cmd.append("--resume")
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"preset": preset, "seed": seed, "metrics": metrics, "train_seconds": round(time.time() - start),
            "threads": threads, "commit": git_commit(), "command": " ".join(["python", *cmd[1:]])}


def summarize(records: dict) -> str:
    by_preset: dict[str, list[dict]] = {}
    for rec in records.values():
        by_preset.setdefault(rec["preset"], []).append(rec)

    def stat(recs, path):
        values = [r["metrics"] for r in recs]
        for key in path:
            values = [v[key] for v in values]
        mean = statistics.fmean(values)
        spread = (max(values) - min(values)) / 2 if len(values) > 1 else float("nan")
        return mean, spread, values

    commits = sorted({rec.get("commit", "unknown") for rec in records.values()})
    threads = sorted({str(rec.get("threads") or "all") for rec in records.values()})
    total = sum(rec.get("train_seconds", 0) for rec in records.values())
    lines = ["## Ablation: the paper's claims on Flickr8k", "",
             f"Machine: {machine(threads=False)}. Runs at commit {', '.join(commits)}, torch threads per run: "
             f"{', '.join(threads)}; {len(records)} runs took {total / 3600:.2f} h wall-clock in all (one run at a "
             "time, sometimes sharing the 2 cores with other work). Written by `python benchmarks/ablation.py`.",
             "Same frozen encoders (EfficientNet-Lite0 grid, all-MiniLM-L6-v2 tokens) and budget for every model: "
             "first 2,000 training images (10,000 captions), 3 epochs, batch 128, D 256, m 128, Adam 2e-4 with "
             "x0.1 at epoch 2; exhaustive evaluation on the first 200 validation images (1,000 captions), best "
             "epoch kept. Mean over seeds, +- half the range.", "",
             "| model | seeds | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | RSUM |",
             "|---|---|---|---|---|---|---|---|---|"]
    rsum = {}
    for preset in PRESETS:
        recs = by_preset.get(preset)
        if not recs:
            lines.append(f"| {preset} | 0 | not run yet | | | | | | |")
            continue
        cells = []
        for path in (("i2t", "r1"), ("i2t", "r5"), ("i2t", "r10"), ("t2i", "r1"), ("t2i", "r5"), ("t2i", "r10"),
                     ("rsum",)):
            mean, spread, values = stat(recs, path)
            cells.append(f"{mean:.1f}" + (f" +- {spread:.1f}" if len(values) > 1 else ""))
        rsum[preset] = stat(recs, ("rsum",))
        lines.append(f"| {preset} | {len(recs)} | " + " | ".join(cells) + " |")

    def verdict(a: str, others: list[str], claim: str) -> str:
        if a not in rsum or any(o not in rsum for o in others):
            return f"- {claim}: not decided yet (runs missing)."
        best = max(others, key=lambda o: rsum[o][0])
        gap = rsum[a][0] - rsum[best][0]
        noise = max([rsum[a][1], rsum[best][1]] + [0.0])
        if len(rsum[a][2]) < 2 or len(rsum[best][2]) < 2:
            return f"- {claim}: RSUM gap {gap:+.1f} vs {best}, but fewer than 2 seeds: not decided."
        held = gap > 0 and min(rsum[a][2]) > max(rsum[best][2])
        return (f"- {claim}: {'HELD' if held else 'NOT shown'} — {a} {rsum[a][0]:.1f} vs {best} {rsum[best][0]:.1f} "
                f"(gap {gap:+.1f}, seed spread +-{noise:.1f}; held means every seed of {a} beats every seed of {best}).")

    def per_seed(a: str, b: str) -> str:
        seeds = sorted({r["seed"] for r in by_preset.get(a, [])} & {r["seed"] for r in by_preset.get(b, [])})
        pick = {(r["preset"], r["seed"]): r["metrics"]["rsum"] for r in records.values()}
        return ", ".join(f"seed {s}: {pick[a, s] - pick[b, s]:+.1f}" for s in seeds)

    lines += ["", "Claims:",
              verdict("tshsr", ["t2i", "i2t"], "Two streams beat each single stream"),
              verdict("tshsr", ["flat"], "Hierarchical (with the context level) beats flat")]
    if all(k in rsum for k in ("tshsr", "t2i", "i2t", "flat")):
        lines += ["", "RSUM of tshsr minus the other model, same seed: "
                  f"vs t2i {per_seed('tshsr', 't2i')}; vs i2t {per_seed('tshsr', 'i2t')}; "
                  f"vs flat {per_seed('tshsr', 'flat')}."]
    if all(k in rsum for k in ("sgr", "saf", "dual")) and max(rsum["sgr"][0], rsum["saf"][0]) < rsum["dual"][0]:
        lines += ["", "Reading: SGRAF's heads alone (`sgr`, `saf`) score each pair only through their learned "
                  "reasoning head, with no cosine of pooled vectors to start from; with frozen encoders and 3 epochs "
                  "on 2,000 images they stay far below the dual encoder, as their paper's 20-40 epoch schedules "
                  "suggest. The TSHSR variants (`t2i`, `i2t`, `flat`, `tshsr`) include the global level and all beat "
                  "the dual encoder's mean RSUM. The claims are judged above on every seed; at this budget the gaps between "
                  "the TSHSR variants are a few RSUM points, the size of the seed-to-seed spread, so a decisive test "
                  "needs the paper's setting (region features, Flickr30K, 20+ epochs on a GPU) and more seeds."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    p.add_argument("--runs", default=str(ROOT / "runs" / "ablation"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--presets", nargs="+", default=PRESETS, choices=PRESETS)
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (speed only)")
    args = p.parse_args()
    STORE.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(STORE.read_text()) if STORE.exists() else {}
    if not args.summarize_only:
        for seed in args.seeds:
            for preset in args.presets:
                key = f"{preset}-s{seed}"
                if key in records:
                    continue
                records[key] = run_one(preset, seed, args.data_dir, Path(args.runs), args.threads)
                STORE.write_text(json.dumps(records, indent=2))
                write_section("ablation", summarize(records))
                print(f"finished {key}: RSUM {records[key]['metrics']['rsum']:.1f}", flush=True)
    write_section("ablation", summarize(records))
    print(summarize(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
