#!/usr/bin/env python
"""The decisive ablation: every preset trained on all of Flickr8k train (6,000 images, 30,000
captions) and evaluated on all of validation (1,000 images, 5,000 captions), seed by seed.

    python benchmarks/ablation_full.py [--seeds 0 1 2] [--presets dual t2i i2t flat tshsr sgr saf] [--threads 1]

Two instances may run at once on different presets (one core each): each appends its own lines
and rewrites the table from the file.

Every preset trains with the recipe the streams study of docs/RESULTS.md chose (``recipe(preset)``
below) and the same frozen encoders. dual, t2i, i2t, flat and tshsr get 3 seeds; sgr and saf one
(``--sgraf-seeds``). A run that is killed continues with ``--resume`` the next time the script
starts; each finished run appends one JSON line (with the recipe it trained with) to
benchmarks/results/ablation_full.jsonl, and the "ablation_full" section of docs/RESULTS.md is
rewritten from those lines after every run (``--summarize-only`` just rewrites it). When the
chosen recipe changes, only the presets whose flags change are retrained (in their own run
folders); the table of the earlier recipe stays in the section below the current one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results_md import git_commit, machine, read_jsonl, write_section
from streams_study import RECIPES as STUDY_RECIPES
from streams_study import (ALIGN_NCE, LAYER0, LAYER3, RUNS_STORE, SCORELESS_CONTEXT, TEXT_TOP, VIEWS, WINDOWS,
                           _history, _wall_seconds)

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "benchmarks" / "results" / "ablation_full.jsonl"
PRESETS = ["dual", "t2i", "i2t", "flat", "tshsr", "sgr", "saf"]
BUDGET = ["--epochs", "4", "--lr-update", "3", "--batch-size", "128", "--embed-dim", "256", "--sim-dim", "128",
          "--val-rerank-k", "20"]
NO_LEVELS = ("dual", "sgr", "saf")  # no levels to fuse or align: the budget alone
WITH_CONTEXT = ("t2i", "i2t", "tshsr")  # --context-detach and --context-skip need a context level
CAPTION_CONTEXT = ("t2i", "tshsr")  # a context level whose caption units a stream reads (--text-context-layer)
# The recipes, newest first. Each maps a preset to the flags it trains with beside BUDGET.
#   v11: the streams study's "detach-skip-separate-windows-ctx0-layer0-views2-text1": v10 with --text-context-layer 0
#       (the caption context units pool MiniLM's token embeddings instead of its layer-3 states) on t2i and tshsr;
#       every other preset keeps v10's flags (and runs).
#   v10: the streams study's "detach-skip-separate-windows-ctx0-layer3-views2-text1": v9 + --text-context-layer 3
#       (the caption context units pool MiniLM's frozen layer-3 states) on every preset whose text-to-image stream
#       has a context level (t2i, tshsr): only that stream reads the caption context units. i2t (whose context
#       units are the image's), dual, flat, sgr and saf keep v9's flags (and runs).
#   v9: the streams study's "detach-skip-separate-windows-ctx0-views2-text1": v8 + --augment-views 2 (each step
#       shows each training photo as itself, mirrored or cropped, from cached views) on every preset: the views
#       lift tshsr and flat alike, so the baselines see the same data.
#   v8: the streams study's "detach-skip-separate-windows-ctx0-text1": v7 + --text-finetune-layers 1 (the last of
#       MiniLM's 6 layers trains on cached states of the 5 below) on every preset, the dual encoder, sgr and saf
#       included: the baselines read the same, better text encoder.
#   v7: the streams study's "detach-skip-separate-windows-ctx0": v6 + fixed window context units
#       (--context-pooling windows --context-units 9 4) that feed the reasoning without a score weight
#       (--level-fusion fixed --level-weights 1 0 1) on every preset with a context level; flat has none, so it
#       keeps v6's flags (and runs).
#   v6: the streams study's "detach-skip-separate": v5 + --separate-streams (each stream its own towers) on the
#       presets with two streams (tshsr, flat); t2i and i2t have one stream, so they keep v5's flags (and runs).
#   v5: the streams study's "detach-skip": v4 + --context-skip (the reasoning also links local and global directly)
#       on every preset with a context level; flat keeps v3's flags (it links them directly already).
#   v4: the streams study's "detach" (benchmarks/streams_study.py): fixed-aux-align-nce + --context-detach on every
#       preset with a context level; flat has none, so it keeps v3's flags (and its runs).
#   v3: the streams study's "fixed-aux-align-nce" on every preset with levels.
V5 = {**{p: [*ALIGN_NCE, "--context-detach", "--context-skip"] for p in WITH_CONTEXT}, "flat": ALIGN_NCE}
V6 = {**V5, "tshsr": [*V5["tshsr"], "--separate-streams"], "flat": [*ALIGN_NCE, "--separate-streams"]}
V7 = {**V6, **{p: [*V6[p], *WINDOWS, *SCORELESS_CONTEXT] for p in WITH_CONTEXT}}
ROUNDS: list[tuple[str, dict[str, list[str]]]] = [
    ("v11", {p: [*V7.get(p, []), *(LAYER0 if p in CAPTION_CONTEXT else []), *VIEWS, *TEXT_TOP] for p in PRESETS}),
    ("v10", {p: [*V7.get(p, []), *(LAYER3 if p in CAPTION_CONTEXT else []), *VIEWS, *TEXT_TOP] for p in PRESETS}),
    ("v9", {p: [*V7.get(p, []), *VIEWS, *TEXT_TOP] for p in PRESETS}),
    ("v8", {p: [*V7.get(p, []), *TEXT_TOP] for p in PRESETS}),
    ("v7", V7),
    ("v6", V6),
    ("v5", V5),
    ("v4", {**{p: [*ALIGN_NCE, "--context-detach"] for p in WITH_CONTEXT}, "flat": ALIGN_NCE}),
    ("v3", {p: ALIGN_NCE for p in ("t2i", "i2t", "flat", "tshsr")}),
]
DUAL_MARGIN = 20.0  # RSUM by which issue 12 asks the full model to beat the dual encoder
# Controls of a round, read from the streams study's records (benchmarks/results/streams_runs.jsonl): a model
# that is not a preset but that a claim of the round has to be read against.
TWO_TOWER_DUAL = ("dual-separate", "dual, two towers",
                  "full model > dual encoder with as many towers (`--preset dual --separate-streams`)")
VIEWS_TWO_TOWER_DUAL = ("dual-separate-views2-text1", "dual, two towers + views + the text layer",
                        "full model > dual encoder with as many towers, the same views and text layer "
                        "(`--preset dual --separate-streams`)")
CONTROLS = {"v11": VIEWS_TWO_TOWER_DUAL, "v10": VIEWS_TWO_TOWER_DUAL, "v9": VIEWS_TWO_TOWER_DUAL,
            "v7": TWO_TOWER_DUAL, "v6": TWO_TOWER_DUAL}
# Flags that name a run folder beside the preset, so that runs of different recipes never share one. A tag with
# "{}" takes the flag's value ("--augment-views 4" -> "views4"), so a round that only changes a number gets
# folders of its own too.
FOLDER_TAGS = {"--context-detach": "detach", "--context-skip": "skip", "--separate-streams": "separate",
               "--context-pooling": "windows", "--level-weights": "ctx0", "--augment-views": "views{}",
               "--text-finetune-layers": "text{}", "--text-context-layer": "layer{}"}


def recipe(preset: str, round_: str = ROUNDS[0][0]) -> list[str]:
    """The flags ``preset`` trains with (beside BUDGET) in the recipe round ``round_``."""
    return dict(ROUNDS)[round_].get(preset, [])


def run_folder(runs: Path, preset: str, seed: int, flags: list[str]) -> Path:
    tags = "".join(f"-{tag.format(flags[flags.index(flag) + 1] if '{}' in tag else '')}"
                   for flag, tag in FOLDER_TAGS.items() if flag in flags)
    return runs / f"{preset}{tags}-s{seed}"


def load_records(path: Path = STORE) -> list[dict]:
    return read_jsonl(path)


def study_record(preset: str, seed: int, flags: list[str]) -> dict | None:
    """The streams study's record of a run with exactly this preset, these flags and this seed, if any:
    the ablation reads such a run instead of training it again."""
    if not RUNS_STORE.exists():
        return None
    want = " ".join(["--preset", preset, *flags])
    for line in RUNS_STORE.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("flags") == want and record.get("name", "").endswith(f"-s{seed}") and record.get("history"):
            return record
    return None


def record_from_study(preset: str, seed: int, flags: list[str], study: dict) -> dict:
    """An ablation record from the study's record alone (its run folder is not on this machine): the best
    validation RSUM of its history, without the recall@K the run folder's metrics.json held."""
    return {"preset": preset, "seed": seed, "recipe": " ".join(flags), "budget": " ".join(BUDGET),
            "metrics": {"rsum": max(study["history"]), "protocol": "global shortlist + rerank top-20",
                        "n_images": 1000, "n_captions": 5000},
            "rsum_by_epoch": study["history"], "train_seconds": study.get("seconds"), "threads": study.get("threads"),
            "commit": study.get("commit"), "source": f"streams study record {study['name']} (recall@K not kept)",
            "command": f"python benchmarks/streams_study.py --recipes {study['recipe']} --seeds {seed}"}


def run_one(preset: str, seed: int, data_dir: str, runs: Path, threads: int | None) -> dict:
    flags = recipe(preset)
    out = run_folder(runs, preset, seed, flags)
    study = None if out.exists() else study_record(preset, seed, flags)
    if study is not None:  # the streams study trained this very run: read it rather than train it again
        folder = ROOT / "runs" / "streams" / study["name"]
        if not (folder / "train_args.json").exists():
            return record_from_study(preset, seed, flags, study)
        out = folder
    cmd = [sys.executable, "train.py", "--dataset", "flickr8k", "--data-dir", data_dir, "--split-val", "validation",
           "--output-dir", str(out), "--preset", preset, "--seed", str(seed), "--no-progress", *BUDGET, *flags]
    if threads:
        cmd += ["--threads", str(threads)]
    if (out / "checkpoint").exists() and not (out / "train_args.json").exists():
        cmd.append("--resume")
    start = time.time()
    if (out / "train_args.json").exists():  # a finished run (e.g. the streams study's) is only read
        seconds = _wall_seconds(out)
    else:
        subprocess.run(cmd, cwd=ROOT, check=True)
        seconds = round(time.time() - start)
    if (out / "wall_seconds.txt").exists():
        seconds = int((out / "wall_seconds.txt").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    history = _history(out)
    return {"preset": preset, "seed": seed, "recipe": " ".join(flags), "budget": " ".join(BUDGET),
            "metrics": {k: metrics[k] for k in ("i2t", "t2i", "rsum", "protocol", "n_images", "n_captions")},
            "rsum_by_epoch": history, "train_seconds": seconds, "threads": threads,
            "commit": git_commit(), "command": " ".join(["python", *cmd[1:]])}


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f}" + (f" ± {(max(values) - min(values)) / 2:.1f}" if len(values) > 1 else "")


def _matches(record: dict, round_: str) -> bool:
    return record["recipe"] == " ".join(recipe(record["preset"], round_))


def _round_table(records: list[dict], round_: str) -> list[str]:
    """The results table and the seed-by-seed claims of one recipe round."""
    mine = [r for r in records if _matches(r, round_)]
    by = {(r["preset"], r["seed"]): r for r in mine}
    flags = dict(ROUNDS)[round_]
    groups: dict[str, list[str]] = {}
    for preset, f in flags.items():
        groups.setdefault(" ".join(f), []).append(preset)
    bare = [p for p in PRESETS if p not in flags]
    lines = ["Recipe per preset: " + "; ".join(f"{', '.join(ps)}: `{r}`" for r, ps in groups.items())
             + (f"; {', '.join(bare)}: the budget alone." if bare else "."), "",
             "| model | seeds | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM | RSUM per seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for preset in PRESETS:
        recs = sorted((r for r in mine if r["preset"] == preset), key=lambda r: r["seed"])
        if not recs:
            lines.append(f"| {preset} | 0 | not run yet | | | | | | | |")
            continue
        recalled = [r for r in recs if "i2t" in r["metrics"]]  # a record read from the study may lack them
        cells = [_cell([r["metrics"][d][k] for r in recalled]) if recalled else "" for d in ("i2t", "t2i")
                 for k in ("r1", "r5", "r10")]
        if 0 < len(recalled) < len(recs):
            cells[0] += f" (s{', s'.join(str(r['seed']) for r in recalled)})"
        per_seed = ", ".join(f"s{r['seed']} {r['metrics']['rsum']:.1f}" + ("*" if "source" in r else "")
                             for r in recs)
        lines.append(f"| {preset} | {len(recs)} | " + " | ".join(cells)
                     + f" | {_cell([r['metrics']['rsum'] for r in recs])} | {per_seed} |")

    def gaps_by_seed(a: str, b: str) -> dict[int, float]:
        """{seed: RSUM of a minus RSUM of b} over the seeds both have run."""
        seeds = sorted({s for (p, s) in by if p == a} & {s for (p, s) in by if p == b})
        return {s: by[a, s]["metrics"]["rsum"] - by[b, s]["metrics"]["rsum"] for s in seeds}

    def paired(a: str, b: str) -> tuple[list[str], bool | None]:
        by_seed = gaps_by_seed(a, b)
        seeds, gaps = list(by_seed), list(by_seed.values())
        text = [f"seed {s}: {g:+.1f}" for s, g in by_seed.items()]
        if any(g <= 0 for g in gaps):  # a claim that must hold on every seed has failed once: decided
            return text, False
        return text, (True if len(seeds) >= 3 else None)

    control = _control_rsum(round_)
    if control:
        label = CONTROLS[round_][1]
        lines.append(f"| {label} (control, streams study `{CONTROLS[round_][0]}`) | {len(control)} | | | | | | | "
                     f"{_cell(list(control.values()))} | " + ", ".join(f"s{k} {v:.1f}" for k, v in control.items())
                     + " |")
    if any("source" in r for r in mine):
        lines += ["", "\\* read from the streams study's record (the same flags and seed; its run folder, with the "
                  "recall@K, was not kept): the recall columns average the other seeds."]
    lines += ["", "Seed by seed, RSUM of tshsr minus the other model (a claim holds when tshsr wins on all 3 "
              "paired seeds):"]
    for other, claim in (("t2i", "two streams > text-to-image only"), ("i2t", "two streams > image-to-text only"),
                         ("flat", "hierarchical > flat"), ("dual", "full model > dual encoder")):
        text, held = paired("tshsr", other)
        verdict = ("not decided yet (tshsr ahead on fewer than 3 paired seeds)" if held is None
                   else "HELD" if held else "NOT held (tshsr is not ahead on every paired seed)")
        same_machine = _same_machine(round_, other) if other in SAME_MACHINE_RECIPES else {}
        if same_machine:
            verdict += " on these runs, which mix CPUs and thread counts (same-machine pairs in the next line)"
        lines.append(f"- {claim}: {verdict}" + (f" — {', '.join(text)}" if text else ""))
        lines += _same_machine_lines(same_machine, claim, DUAL_MARGIN if other == "dual" else None)
    dual_gaps = list(gaps_by_seed("tshsr", "dual").values())
    if dual_gaps:  # issue 12 asks for a margin, not just a win
        lines.append(f"- full model ≥ dual encoder + {DUAL_MARGIN:g} RSUM (issue 12's target): on "
                     f"{sum(g >= DUAL_MARGIN for g in dual_gaps)} of {len(dual_gaps)} paired seeds")
    if control:
        gaps = [f"seed {k}: {by['tshsr', k]['metrics']['rsum'] - v:+.1f}" for k, v in control.items()
                if ("tshsr", k) in by]
        lines.append(f"- {CONTROLS[round_][2]}: " + (", ".join(gaps) if gaps else "no paired seed yet"))
    return lines


SAME_MACHINE_RECIPES = {"flat": "flat-separate-views2-text1", "dual": "dual-views2-text1"}


def _same_machine(round_: str, other: str) -> dict[str, dict[int, float]]:
    """{group: {seed: tshsr − other}} with both runs of a seed on one CPU type and thread count
    (benchmarks/repeat_runs.py), for a round whose tshsr and ``other`` flags are the study recipes that
    script trained; {} otherwise."""
    from repeat_runs import DEFAULT_RECIPE, all_runs, group_margins

    flags = dict(ROUNDS)[round_]
    pairs = ((DEFAULT_RECIPE, "tshsr"), (SAME_MACHINE_RECIPES.get(other), other))
    if not all(r in STUDY_RECIPES and STUDY_RECIPES[r][1] == ["--preset", p, *flags[p]] for r, p in pairs):
        return {}
    recipe = SAME_MACHINE_RECIPES[other]
    return {g: m for g, m in group_margins(all_runs([DEFAULT_RECIPE, recipe]), DEFAULT_RECIPE, recipe).items()
            if g != "study"}


def _same_machine_lines(groups: dict[str, dict[int, float]], claim: str, margin: float | None = None) -> list[str]:
    """One claim line per group of :func:`_same_machine`; with ``margin``, also on how many seeds tshsr leads by it."""
    return [f"- {claim} with both runs of each seed on one CPU type and thread count (`benchmarks/repeat_runs.py`, "
            f"group {g}): " + ", ".join(f"seed {s}: {m:+.1f}" for s, m in by_seed.items())
            + f"; ahead on {sum(m > 0 for m in by_seed.values())} of {len(by_seed)}"
            + (f", by ≥ {margin:g} on {sum(m >= margin for m in by_seed.values())}" if margin is not None else "")
            for g, by_seed in groups.items()]


def _control_rsum(round_: str) -> dict[int, float]:
    """{seed: best validation RSUM} of the round's control runs in the streams study's records."""
    if round_ not in CONTROLS or not RUNS_STORE.exists():
        return {}
    name = CONTROLS[round_][0]
    out = {}
    for line in RUNS_STORE.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("recipe") == name and record.get("history"):
            out[int(record["name"].rsplit("-s", 1)[1])] = max(record["history"])
    return dict(sorted(out.items()))


def summarize(records: list[dict]) -> str:
    lines = ["## Decisive ablation: full Flickr8k (6,000 training images, validation 1,000 images / 5,000 captions)",
             "",
             f"Written by `python benchmarks/ablation_full.py` from benchmarks/results/ablation_full.jsonl. Machine: "
             f"{machine(threads=False)}. Budget `{' '.join(BUDGET)}`, frozen EfficientNet-Lite0 grid + "
             "all-MiniLM-L6-v2 tokens (from v8 on, MiniLM's last layer trains on cached states of the 5 below; from v9 "
             "on, each training photo is also seen mirrored and cropped, 2 cached views; from v10 on, the caption "
             "context units read MiniLM's frozen layer 3, from v11 on its token embeddings); the "
             "best epoch by validation RSUM is kept (protocol: cosine shortlist + rerank top-20 for every model). "
             "Mean ± half the range over seeds. A run that trains with the same flags in two recipes (dual, sgr, saf "
             "from v3 to v7 and from v9 to v11; flat from v6 to v7 and from v9 to v11; i2t from v9 to v11) is trained "
             "once and counted in both tables."]
    for i, (round_, _) in enumerate(ROUNDS):
        title = "current recipe, chosen by the streams study" if i == 0 else "earlier recipe, kept for comparison"
        lines += ["", f"### Recipe {round_} ({title})", "", *_round_table(records, round_)]
    other = [r for r in records if not any(_matches(r, name) for name, _ in ROUNDS)]
    if other:
        lines += ["", f"{len(other)} records with another recipe are kept in the JSONL file but in neither table."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    p.add_argument("--runs", default=str(ROOT / "runs" / "ablation_full"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sgraf-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--presets", nargs="+", default=PRESETS, choices=PRESETS)
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (speed only)")
    args = p.parse_args()
    records = load_records()
    if not args.summarize_only:
        # Seed-major order: a complete paired comparison lands as early as possible.
        for seed in args.seeds:
            for preset in args.presets:
                if preset in ("sgr", "saf") and seed not in args.sgraf_seeds:
                    continue
                if any(r["preset"] == preset and r["seed"] == seed and _matches(r, ROUNDS[0][0]) for r in records):
                    continue
                record = run_one(preset, seed, args.data_dir, Path(args.runs), args.threads)
                STORE.parent.mkdir(parents=True, exist_ok=True)
                with open(STORE, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                records = load_records()  # with the records of another instance running other presets
                write_section("ablation_full", summarize(records))
                print(f"finished {preset}-s{seed}: RSUM {record['metrics']['rsum']:.1f}", flush=True)
    write_section("ablation_full", summarize(records))
    print(summarize(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
