#!/usr/bin/env python
"""Time a recipe's training from scratch, backbone feature caching included (by default the default model's).

    python benchmarks/train_time.py [--recipe NAME] [--data-dir ../shared/data/flickr8k] [--threads 2]

Trains the recipe (default: benchmarks/flickr8k_default.py's DEFAULT_RECIPE; any streams-study recipe,
e.g. a candidate for the next default, at the study's budget with the recipe's own epochs), seed 0,
into runs/train_time/ (another recipe: runs/train_time-RECIPE/) with an empty feature cache, so the
clock covers what a fresh machine does: loading the data, caching the frozen EfficientNet-Lite0 grid
and MiniLM token features of the 6,000 training and 1,000 validation photos, the recipe's epochs,
and validating after each. Each timing is one record in benchmarks/results/train_time.jsonl, and
the "train_time" section of docs/RESULTS.md is rewritten from the records: the default recipe's
latest timing against the target (60 min on 2 CPU cores), then every timing, with the seconds of
each phase, so that two timings can be compared phase by phase (the same work on a slower day shows
as a slower setup and slower first epochs).

A timing is only meaningful on an otherwise idle machine: the script refuses to start while
another train.py runs (one paused with ``kill -STOP`` does not count; ``--allow-busy`` overrides,
and the section then says so), and it always starts from scratch (an interrupted timing cannot be
resumed into an honest number). ``--report-only`` records the timing in ``--out`` if it is not
recorded yet and rewrites the section.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from flickr8k_default import COMMON, DEFAULT_RECIPE  # noqa: E402
from results_md import git_commit, machine, read_jsonl, write_jsonl, write_section  # noqa: E402
from streams_study import RECIPES, epochs_of, flag_value  # noqa: E402

STORE = ROOT / "benchmarks" / "results" / "train_time.jsonl"
TARGET_MIN = 60


def _stopped(pid: str) -> bool:
    """Whether the process is stopped (``kill -STOP``): it holds memory but no core."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def other_trainers() -> list[str]:
    """Command lines of other running train.py processes (they would share the cores); stopped ones are left
    out, so that background runs can be paused with ``kill -STOP`` for a timing."""
    found = subprocess.run(["pgrep", "-af", "train.py"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in found if str(os.getpid()) != line.split()[0] and "train_time.py" not in line
            and not _stopped(line.split()[0])]


def default_out(recipe: str) -> Path:
    return ROOT / "runs" / ("train_time" if recipe == DEFAULT_RECIPE else f"train_time-{recipe}")


def record_of(timing: dict, model_dir: Path) -> dict:
    """The JSONL record of a finished timing: its phases from the run's log, the best validation RSUM, and
    whether the run is the shipped default model (same bytes)."""
    records = [json.loads(x) for x in (model_dir / "log.jsonl").read_text().splitlines()]
    setup = next(r["setup_seconds"] for r in records if "setup_seconds" in r)
    start = next(r["time"] for r in records if "setup_seconds" in r)
    epochs, last = [], start
    for r in records:
        if "validation" in r:
            epochs.append(round(r["time"] - last, 1))
            last = r["time"]
    shipped = ROOT / "checkpoints" / "tshsr-flickr8k"
    return {"recipe": timing.get("recipe", DEFAULT_RECIPE), "total": timing["total"],
            "setup": setup, "epoch_seconds": epochs,
            "best": json.loads((model_dir / "metrics.json").read_text())["rsum"],
            "shipped": (shipped / "model.safetensors").exists()
            and (shipped / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes(),
            **{k: timing[k] for k in ("threads", "load_before", "busy", "machine", "commit", "command")},
            "date": timing.get("date") or time.strftime("%Y-%m-%d", time.gmtime(start)), "note": timing.get("note")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES),
                   help="the recipe to time (default: the default model's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="run folder (default: runs/train_time, or runs/train_time-RECIPE)")
    p.add_argument("--allow-busy", action="store_true", help="time even while other training runs share the cores")
    p.add_argument("--note", default=None, help="a remark kept with the timing (e.g. what else ran on the machine)")
    p.add_argument("--report-only", action="store_true",
                   help="record the timing in --out if it is not recorded yet, and rewrite the section")
    args = p.parse_args()
    out = Path(args.out) if args.out else default_out(args.recipe)
    model_dir = out / "model"
    if not args.report_only:
        busy = other_trainers()
        if busy and not args.allow_busy:
            print("other training runs share the cores; the timing would not mean anything:\n  " + "\n  ".join(busy),
                  file=sys.stderr)
            return 2
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "train.py", "--data-dir", args.data_dir, "--output-dir", str(model_dir), "--cache-dir",
               str(out / "cache"), "--threads", str(args.threads), *COMMON, *RECIPES[args.recipe][1]]
        load_before = os.getloadavg()[0]
        start = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True)
        timing = {"recipe": args.recipe, "total": time.time() - start, "load_before": load_before, "busy": busy,
                  "threads": args.threads, "command": " ".join(["python", *cmd[1:]]),
                  "machine": machine(threads=False), "commit": git_commit()}
        (out / "timing.json").write_text(json.dumps(timing, indent=1))
    if (out / "timing.json").exists():
        timing = json.loads((out / "timing.json").read_text())
        if args.report_only and "recipe" not in timing:  # written before timings named their recipe
            timing["recipe"] = args.recipe
        if args.note:
            timing["note"] = args.note
            (out / "timing.json").write_text(json.dumps(timing, indent=1))
        record = record_of(timing, model_dir)
        records = read_jsonl(STORE)
        same = [i for i, r in enumerate(records) if (r["recipe"], r["command"], round(r["total"])) ==
                (record["recipe"], record["command"], round(record["total"]))]
        if same:  # recorded before: updated where it stands, so that the list stays in the order timings were made
            records[same[0]] = record
        else:
            records.append(record)
        write_jsonl(records, STORE)
    body = "\n".join(report(read_jsonl(STORE)))
    print(body)
    write_section("train_time", body)
    return 0


def _views(recipe: str) -> str:
    """The augmented views the setup also caches, in words (empty when the recipe has none)."""
    n = flag_value(RECIPES[recipe][1], "--augment-views")
    return f" (+ {n} augmented views of each of the 6,000 training photos)" if n else ""


def _caption_layer(recipe: str) -> str:
    """The extra caption states the setup caches, in words (empty when the recipe reads none)."""
    layer = flag_value(RECIPES[recipe][1], "--text-context-layer")
    return f" (+ their layer-{layer} states for the context units)" if layer else ""


def report(records: list[dict]) -> list[str]:
    lines = ["## Training time from scratch (feature caching included)", ""]
    default = [r for r in records if r["recipe"] == DEFAULT_RECIPE]
    if default:
        r = default[-1]
        total, setup, busy = r["total"], r["setup"], r["busy"]
        verdict = "met" if total <= TARGET_MIN * 60 else "not met"
        same = (" This run is the shipped default model (`checkpoints/tshsr-flickr8k`)." if r["shipped"] else
                " It is not the shipped default model's run (a different thread count or machine sums floats in "
                "another order, and runs drift apart by a few RSUM).")
        lines += [
            f"The default recipe `{DEFAULT_RECIPE}`, seed 0. Machine: {r['machine']}, `--threads {r['threads']}`, "
            f"{r['date']}. Commit {r['commit']}. Written by `python benchmarks/train_time.py`. Empty feature cache at "
            f"the start; load average {r['load_before']:.2f} at the start"
            + (f"; **{len(busy)} other training runs shared the cores**" if busy else ", no other training run") + ".",
            "",
            "| phase | seconds | minutes |",
            "|---|---|---|",
            f"| setup: data, model, caching the backbone features of 7,000 photos{_views(r['recipe'])} and 35,000 "
            f"captions{_caption_layer(r['recipe'])} | {setup:.0f} | {setup / 60:.1f} |",
            f"| training: {epochs_of(r['recipe'])} epochs + validation after each | {total - setup:.0f} | "
            f"{(total - setup) / 60:.1f} |",
            f"| **total** | **{total:.0f}** | **{total / 60:.1f}** |",
            "",
            f"Best validation RSUM reached (cosine top-20 reranked): {r['best']:.1f}.{same} Target: at most "
            f"{TARGET_MIN} min on 2 CPU cores: **{verdict}**.",
            "",
            f"Command: `{r['command']}`",
        ]
    if records:
        lines += ["", "Every timing recorded (benchmarks/results/train_time.jsonl; seconds per epoch include its "
                  "validation; a recipe other than the default is a candidate timed before a decision):", "",
                  "| date | recipe | machine, threads | setup s | seconds per epoch | total min | best RSUM | "
                  f"≤ {TARGET_MIN} min |", "|---|---|---|---|---|---|---|---|"]
        for r in records:
            epochs = " / ".join(f"{e:.0f}" for e in r["epoch_seconds"])
            lines.append(f"| {r['date']} | `{r['recipe']}` | {r['machine']}, {r['threads']} | {r['setup']:.0f} | "
                         f"{epochs} | {r['total'] / 60:.1f} | {r['best']:.1f} | "
                         f"{'yes' if r['total'] <= TARGET_MIN * 60 else 'no'}"
                         + (" (busy)" if r["busy"] else "") + (f"; {r['note']}" if r.get("note") else "") + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
