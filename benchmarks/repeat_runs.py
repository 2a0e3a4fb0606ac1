#!/usr/bin/env python
"""How far does the same training command move when it runs again, and which margins survive that?

    python benchmarks/repeat_runs.py [--recipes A B] [--seeds 0 1 2] [--threads 1] [--group NAME]

The streams study (benchmarks/streams_study.py) and the decisive ablation compare recipes by the
validation RSUM of one run per seed, and those runs landed on whichever machine a session had
(Intel Xeon or AMD EPYC, 1 or 2 threads). The same command and seed do not end at the same
number on another CPU (float kernels differ, and four epochs of training amplify the difference),
so a margin between two recipes is only a claim if it is larger than that.

This script reruns study recipes (the study's flags and budget, `streams_study.RECIPES`) with every
run of one *group* on one machine and one thread count: by default the group is named after this
CPU (vendor, family, model) and the thread count, e.g. ``amd-epyc-f26m2-t1``. Runs live in
runs/repeat/GROUP/RECIPE-sSEED and resume when killed; a finished run is one record in
benchmarks/results/repeat_runs.jsonl. The "repeat_runs" section of docs/RESULTS.md is rewritten
from those records and the study's own (benchmarks/results/streams_runs.jsonl):

* every run of each (recipe, seed) with the machine and threads it ran on, and the spread
  (largest minus smallest) of the runs of the same command;
* margins seed by seed, within each group that has both runs (the study's records are one more
  "group", mixed machines), beside the spread: for each budget, its hierarchical recipe over each
  control of the same budget (flat, the dual encoder), and a longer-budget recipe over the same
  flags at the study's budget (`comparisons`).

``--adopt RECIPE:SEED=DIR`` records a finished run trained elsewhere (another session's, the study's)
in this machine's group, after checking that a fresh start of the same command here logs its first
50 steps bit-identically (training is deterministic on one CPU type and thread count).

The 48 example photos of the demo are never used: everything here is validation RSUM.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flickr8k_default import DEFAULT_RECIPE
from results_md import cpu_tag, git_commit, machine, write_section
from streams_diagnosis import load_records, store_record
from streams_study import (BUDGET, RECIPES, RUNS_STORE, _history, _wall_seconds, budget_of, epochs_of, flag_value,
                           train, train_command)

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "benchmarks" / "results" / "repeat_runs.jsonl"
BACKBONE = "--image-backbone"
SWITCHES = ("--channels-last",)  # how the backbone's features are computed, not what the recipe is
FLAT = "flat-separate-views2-text1"  # the default recipe without a context level: the hierarchy's control


def record_of(recipe: str, seed: int, group: str, out: Path, threads: int | None) -> dict:
    history = _history(out)
    return {"name": f"{recipe}-s{seed}@{group}", "protocol": "repeat", "recipe": recipe, "seed": seed,
            "group": group, "flags": " ".join(RECIPES[recipe][1]), "budget": " ".join(budget_of(recipe)),
            "history": history,
            "best": max(history) if history else None, "seconds": _wall_seconds(out), "threads": threads,
            "cpu": cpu_tag(), "machine": machine(), "commit": git_commit()}


def _steps(log: Path) -> dict[int, tuple]:
    """{step: (loss, grad norm)} of a run's logged training steps."""
    rows = [json.loads(x) for x in log.read_text().splitlines() if '"step"' in x] if log.exists() else []
    return {r["step"]: (r.get("loss"), r.get("grad_norm")) for r in rows if "step" in r}


def same_numerics(recipe: str, seed: int, threads: int, data_dir: str, run: Path, steps: int = 50,
                  timeout: float = 900) -> int:
    """Start ``recipe``/``seed`` afresh on this machine, stop it once ``steps`` training steps are logged, and
    return how many logged steps match ``run``'s log to the last printed digit (loss and gradient norm); 0 when
    one differs. Training is deterministic on one CPU type and thread count, so identical steps say that
    ``run`` ran with this machine's numerics and belongs in its group."""
    reference = _steps(run / "log.jsonl")
    with tempfile.TemporaryDirectory(prefix="tshsr-repeat-") as tmp:
        out = Path(tmp) / "run"
        proc = subprocess.Popen(train_command(recipe, seed, data_dir, threads, out), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = time.time()
        try:
            while proc.poll() is None and time.time() - start < timeout:
                if max(_steps(out / "log.jsonl"), default=0) >= steps:
                    break
                time.sleep(5)
        finally:
            proc.terminate()
            proc.wait()
        fresh = _steps(out / "log.jsonl")
        shutil.rmtree(out, ignore_errors=True)
    common = sorted(s for s in fresh if s in reference and s <= steps)
    if not common or any(fresh[s] != reference[s] for s in common):
        return 0
    return common[-1]


def adopt(recipe: str, seed: int, group: str, run: Path, threads: int, data_dir: str) -> dict:
    """The record of a finished run trained elsewhere (another session, the study) in ``group``, once its first
    training steps are bit-identical to a fresh start of the same command on this machine."""
    args = json.loads((run / "train_args.json").read_text())
    if args.get("seed") != seed or args.get("threads") != threads:
        raise SystemExit(f"{run}: seed {args.get('seed')}, threads {args.get('threads')}; expected {seed}, {threads}")
    checked = same_numerics(recipe, seed, threads, data_dir, run)
    if not checked:
        raise SystemExit(f"{run}: its first steps differ from this machine's (or a fresh start logged none in "
                         f"15 min); not adopted into {group}")
    record = record_of(recipe, seed, group, run, threads)
    record["adopted"] = {"from": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run),
                         "identical_steps": checked}
    return record


def study_runs(recipes: list[str]) -> list[dict]:
    """The streams study's recorded runs of ``recipes`` as one more group ("study"): the machine each
    record names, or "not recorded" for the early records that name none."""
    found = []
    for r in load_records(RUNS_STORE):
        recipe, _, seed = r["name"].rpartition("-s")
        if recipe in recipes and seed.isdigit() and r.get("history"):
            found.append({"recipe": recipe, "seed": int(seed), "group": "study", "best": max(r["history"]),
                          "threads": r.get("threads"), "machine": r.get("machine", "not recorded"),
                          "folder": f"runs/streams/{r['name']}"})
    return found


def _folder(run: dict) -> str:
    """The folder a run trained in: a study run's, an adopted run's origin, or its repeat folder."""
    return (run.get("folder") or (run.get("adopted") or {}).get("from")
            or f"runs/repeat/{run['group']}/{run['recipe']}-s{run['seed']}")


def _where(run: dict) -> str:
    m = run.get("machine") or "?"
    cpu = "Xeon" if "Xeon" in m else "EPYC" if "EPYC" in m else m.split(",")[0]
    if run.get("cpu") and "-f" in run["cpu"]:
        cpu += " " + run["cpu"].rsplit("-", 1)[1]
    return f"{cpu}, {run.get('threads') or '?'} thr"


def summarize(recipes: list[str], runs: list[dict], pairs: list[tuple[str, str]] | None = None) -> str:
    """The section's text: every run of ``recipes``, then the margin of a over b for each (a, b) of ``pairs``
    (default: the first recipe over each other one)."""
    lines = ["## Repeated runs: the same command on other machines, and the margins that survive it", "",
             "Written by `python benchmarks/repeat_runs.py` from benchmarks/results/repeat_runs.jsonl and the streams "
             "study's records. Validation RSUM of the kept epoch (trainer's protocol, cosine top-20), Flickr8k "
             "validation 1,000 images / 5,000 captions, the study's flags and budget (4 epochs, the rate dropped "
             "after 3; a recipe named -e6: 6 epochs, the drop after 4). A *group* is one CPU type "
             "(vendor, family, model) and one thread count; `study` is the study's own record of each run, "
             "which landed on whichever machine its session had. `spread` is the largest minus the smallest "
             "result of one command (recipe and seed) over its distinct runs; a run adopted into a group after its "
             "first 50 steps proved bit-identical to a fresh start there (`--adopt`) is listed once, with both "
             "groups.", "",
             "| recipe | seed | runs (RSUM: CPU, threads, group) | spread |", "|---|---|---|---|"]
    spreads = []
    for recipe in recipes:
        for seed in sorted({r["seed"] for r in runs if r["recipe"] == recipe}):
            # One run may be in two groups (a study run adopted into a machine's group): listed once.
            distinct: dict[tuple, dict] = {}
            for r in runs:
                if r["recipe"] == recipe and r["seed"] == seed and r["best"] is not None:
                    key = (_folder(r), round(r["best"], 2))
                    if key in distinct:
                        distinct[key] = {**distinct[key], "group": f"{distinct[key]['group']} = {r['group']}"}
                    else:
                        distinct[key] = r
            same = list(distinct.values())
            if not same:
                continue
            cells = "; ".join(f"{r['best']:.1f} ({_where(r)}, {r['group']})" for r in same)
            spread = max(r["best"] for r in same) - min(r["best"] for r in same) if len(same) > 1 else None
            if spread is not None:
                spreads.append(spread)
            lines.append(f"| {recipe} | {seed} | {cells} | {'—' if spread is None else f'{spread:.1f}'} |")
    for a, b in pairs if pairs is not None else [(recipes[0], b) for b in recipes[1:]]:
        by_group = group_margins(runs, a, b)
        if not by_group:
            continue  # no group ran both yet
        lines += ["", f"Margin of `{a}` over `{b}` (RSUM, seed by seed) within each group that ran both "
                  "(sd: standard deviation of the margins over seeds):", "",
                  "| group | per seed | mean | sd | seeds won |", "|---|---|---|---|---|"]
        for group, by_seed in by_group.items():
            margins = list(by_seed.values())
            sd = f"{statistics.stdev(margins):.1f}" if len(margins) > 1 else "—"
            lines.append(f"| {group} | {_per_seed(by_seed)} | {statistics.mean(margins):+.1f} | {sd} | "
                         f"{sum(m > 0 for m in margins)}/{len(margins)} |")
    if len(recipes) >= 2 and spreads:
        lines += ["", f"The same command's spread: {min(spreads):.1f} to {max(spreads):.1f} RSUM over "
                  f"{len(spreads)} commands run more than once (median {statistics.median(spreads):.1f}). "
                  "A margin between recipes inside that range, or one whose sign changes between groups, "
                  "is not a result."]
    return "\n".join(lines)


def group_margins(runs: list[dict], a: str, b: str) -> dict[str, dict[int, float]]:
    """{group: {seed: best RSUM of recipe a minus that of b}} over the seeds a group ran both; the study first."""
    out = {}
    for group in sorted({r["group"] for r in runs}, key=lambda g: (g != "study", g)):
        best = {(r["recipe"], r["seed"]): r["best"] for r in runs if r["group"] == group and r["best"] is not None}
        seeds = sorted(s for (rec, s) in best if rec == a and (b, s) in best)
        if seeds:
            out[group] = {s: best[(a, s)] - best[(b, s)] for s in seeds}
    return out


def _per_seed(by_seed: dict[int, float]) -> str:
    return ", ".join(f"s{s} {m:+.1f}" for s, m in by_seed.items())


def all_runs(recipes: list[str]) -> list[dict]:
    return study_runs(recipes) + [r for r in load_records(STORE) if r["recipe"] in recipes]


PRESET_ORDER = {"tshsr": 0, "flat": 1, "dual": 3}  # the hierarchical recipe first, then its controls


def _preset(recipe: str) -> str:
    return flag_value(RECIPES[recipe][1], "--preset") or "tshsr"


def _without_budget(recipe: str, drop: tuple[str, ...] = ()) -> list[str]:
    """The recipe's flags less those that set the budget (--epochs, --lr-update, ...) and the options ``drop``
    (with their values; SWITCHES have none)."""
    flags, names = RECIPES[recipe][1], set(BUDGET[::2]) | set(drop)
    valued = names - set(SWITCHES)
    return [f for i, f in enumerate(flags) if f not in names and (i == 0 or flags[i - 1] not in valued)]


def comparisons(recipes: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(recipes in table order, (a, b) pairs to compare). Recipes are grouped by budget and image backbone, the
    shortest budget and the default backbone first, and within a group the hierarchical recipes come before flat
    and the dual encoder; each hierarchical recipe is compared with each control of its group and with the default
    recipe (or the first hierarchical one) of its group, and a recipe trained at a longer budget or on another
    backbone with the same recipe at the study's budget on the default backbone (what the extra epochs or the
    other backbone gave)."""
    def variant(r: str) -> tuple:  # (epochs, the whole budget, backbone): two schedules or backbones never mixed
        return epochs_of(r), tuple(budget_of(r)), flag_value(RECIPES[r][1], BACKBONE) or ""
    ordered = sorted(recipes, key=lambda r: (variant(r), PRESET_ORDER.get(_preset(r), 2), r != DEFAULT_RECIPE,
                                             recipes.index(r)))
    pairs = []
    for key in dict.fromkeys(variant(r) for r in ordered):
        same = [r for r in ordered if variant(r) == key]
        # every hierarchical recipe against each control, and against the default recipe (or the first) of its group
        hier = sorted((r for r in same if _preset(r) == "tshsr"), key=lambda r: r != DEFAULT_RECIPE)
        controls = [r for r in same if r not in hier]
        if not hier:
            pairs += [(same[0], b) for b in same[1:]]
        for h in hier:
            pairs += [(h, c) for c in controls] + ([(h, hier[0])] if h != hier[0] else [])
    pairs += [(r, base) for r in ordered for base in ordered if variant(r) != variant(base)
              and budget_of(base) == BUDGET and BACKBONE not in RECIPES[base][1]
              and _without_budget(r, (BACKBONE, *SWITCHES)) == RECIPES[base][1]]
    return ordered, pairs


def section(recipes: list[str]) -> str:
    """The RESULTS section: ``recipes`` and every recipe recorded here before (a run with other recipes keeps
    the earlier ones' tables), compared as `comparisons` pairs them."""
    recorded = [r["recipe"] for r in load_records(STORE)]
    ordered, pairs = comparisons(list(dict.fromkeys([*recipes, *recorded])))
    return summarize(ordered, all_runs(ordered), pairs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    p.add_argument("--recipes", nargs="+", default=[DEFAULT_RECIPE, FLAT], choices=list(RECIPES),
                   help="recipes to train (default: the default model's recipe and flat); the section compares "
                        "each budget's hierarchical recipe with its controls and a longer budget with the study's, "
                        "over these and every recipe recorded before")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads per run; part of the group's name")
    p.add_argument("--group", default=None, help="group name (default: this CPU's tag and the thread count)")
    p.add_argument("--adopt", nargs="+", default=[], metavar="RECIPE:SEED=DIR",
                   help="record finished runs trained elsewhere in this group, each after checking that its first "
                        "50 training steps are bit-identical to a fresh start here (about 2 minutes each)")
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args()
    group = args.group or f"{cpu_tag()}-t{args.threads}"
    for spec in args.adopt:
        key, _, run = spec.partition("=")
        recipe, _, seed = key.rpartition(":")
        if recipe not in RECIPES or not seed.isdigit() or not (Path(run) / "train_args.json").exists():
            raise SystemExit(f"--adopt {spec}: expected RECIPE:SEED=DIR with a known recipe and a finished run")
        store_record(adopt(recipe, int(seed), group, Path(run).resolve(), args.threads, args.data_dir), STORE)
    if not args.summary_only:
        for seed in args.seeds:  # seed-major: a complete pair lands as early as possible
            for recipe in args.recipes:
                if any(r["name"] == f"{recipe}-s{seed}@{group}" for r in load_records(STORE)):
                    continue
                out = ROOT / "runs" / "repeat" / group / f"{recipe}-s{seed}"
                train(recipe, seed, args.data_dir, args.threads, out=out)
                store_record(record_of(recipe, seed, group, out, args.threads), STORE)
                write_section("repeat_runs", section(args.recipes))
    body = section(args.recipes)
    write_section("repeat_runs", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
