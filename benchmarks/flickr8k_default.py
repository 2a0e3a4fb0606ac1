#!/usr/bin/env python
"""Train the bundled default model and its dual-encoder baseline on Flickr8k, evaluate both on
the validation split, copy the model to checkpoints/tshsr-flickr8k and write the results section
of docs/RESULTS.md.

    python benchmarks/flickr8k_default.py [--data-dir ../shared/data/flickr8k]

Resumable: a finished run (train_args.json present) is not retrained, an interrupted one is
continued with --resume.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from results_md import git_commit, machine, write_section  # noqa: E402
from streams_study import BUDGET, RECIPES, _wall_seconds, budget_of, validation_by_epoch  # noqa: E402

# The default model trains with the recipe the streams study chose (benchmarks/streams_study.py),
# at the study's budget; the dual encoder is its baseline at the same budget.
DEFAULT_RECIPE = "detach-skip-separate-windows-ctx0-layer0-views2-text1"
# The dual encoder with the same encoders, views and trained text layer
BASELINE_RECIPE = "dual-views2-text1"
COMMON = ["--dataset", "flickr8k", "--split-val", "validation", *BUDGET, "--seed", "0", "--no-progress"]
RUNS = {
    "tshsr": RECIPES[DEFAULT_RECIPE][1],
    "dual": RECIPES[BASELINE_RECIPE][1],
}
SHIPPED = ("config.json", "model.safetensors", "README.md", "metrics.json")


def stale_settings(out: Path, cmd: list[str]) -> dict:
    """{setting: (the finished run's, the recipe's)} where the run in ``out`` trained with other settings than
    ``cmd`` asks (paths, threads and progress bars aside): empty when the run is the recipe's."""
    import dataclasses

    from tshsr_train.args import parse_args

    ran = json.loads((out / "train_args.json").read_text())
    wanted = dataclasses.asdict(parse_args(cmd[2:]))
    skip = {"given", "data_dir", "output_dir", "cache_dir", "progress", "threads", "max_val_images", "device"}
    return {k: (ran.get(k), v) for k, v in wanted.items() if k not in skip and k in ran and ran[k] != v}


def train(name: str, data_dir: str, runs: Path) -> tuple[list[str], float | None]:
    out = runs / f"f8k-{name}"
    cmd = [sys.executable, "train.py", "--data-dir", data_dir, "--output-dir", str(out), *COMMON, *RUNS[name]]
    if (out / "train_args.json").exists():
        differ = stale_settings(out, cmd)
        if differ:  # a run of an earlier default recipe: never ship or report it as this one
            raise SystemExit(f"{out} was trained with other settings than the {name} recipe asks (run's, recipe's): "
                             f"{differ}; move it away (or link the recipe's run there) and run this again")
        return cmd, None
    if (out / "checkpoint").exists():
        cmd.append("--resume")
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    seconds = time.time() - start
    (out / "wall_seconds.txt").write_text(f"{seconds:.0f}\n")
    return cmd, seconds


def evaluate(model_dir: Path, data_dir: str, rerank_k: int | None) -> dict:
    output = model_dir / (f"eval_rerank{rerank_k}.json" if rerank_k else "eval_exhaustive.json")
    if not output.exists():
        cmd = [sys.executable, "-m", "tshsr.evaluate", "--model", str(model_dir), "--dataset", "imagefolder",
               "--data-dir", data_dir, "--split", "validation", "--output", str(output), "--no-progress"]
        if rerank_k:
            cmd += ["--rerank-k", str(rerank_k)]
        subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads(output.read_text())


def ship_card(run: Path, target: Path) -> None:
    """The shipped model's card, written again for its new folder (the run's card names the run's
    folder in its loading example) from the run's settings, kept metrics and validation history."""
    from tshsr_train.args import TrainArgs
    from tshsr_train.loop import write_model_card

    settings = json.loads((run / "train_args.json").read_text())
    args = TrainArgs(**{k: v for k, v in settings.items() if k in TrainArgs.__dataclass_fields__})
    history = [{"epoch": e, "rsum": v} for e, v in validation_by_epoch(run).items()]
    # The card names the folder relative to the repository: checkpoints/tshsr-flickr8k
    write_model_card(target, args, json.loads((run / "metrics.json").read_text()), history,
                     name=target.resolve().relative_to(ROOT).as_posix())


def _provenance(run: Path) -> str:
    """Where the shipped run came from, when runs/f8k-tshsr links to a run made by another script."""
    if not run.is_symlink():
        return ""
    if any(part.startswith("train_time") for part in run.resolve().parts):  # runs/train_time*/model
        return " (the run `benchmarks/train_time.py` timed: 2 torch threads on an otherwise idle machine)"
    return " (a run of the streams study: one torch thread, sharing the 2 cores with another run)"


def row(name: str, m: dict, protocol: str) -> str:
    return (f"| {name} | {protocol} | {m['i2t']['r1']:.1f} | {m['i2t']['r5']:.1f} | {m['i2t']['r10']:.1f} | "
            f"{m['t2i']['r1']:.1f} | {m['t2i']['r5']:.1f} | {m['t2i']['r10']:.1f} | **{m['rsum']:.1f}** | "
            f"{m['seconds']:.0f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    p.add_argument("--runs", default=str(ROOT / "runs"))
    p.add_argument("--rerank-k", type=int, default=20)
    p.add_argument("--exhaustive", action="store_true", help="also evaluate exhaustively (5M pairs, slow on CPU)")
    args = p.parse_args()
    runs = Path(args.runs)
    commands, rows = {}, []
    for name in RUNS:
        cmd, _ = train(name, args.data_dir, runs)
        commands[name] = " ".join(["python", *cmd[1:]])
    for name in RUNS:
        model_dir = runs / f"f8k-{name}"
        label = "TSHSR (full)" if name == "tshsr" else "dual encoder (baseline)"
        if name == "dual":
            rows.append(row(label, evaluate(model_dir, args.data_dir, None), "cosine (exhaustive)"))
            continue
        rows.append(row(label, evaluate(model_dir, args.data_dir, args.rerank_k),
                        f"shortlist + rerank top-{args.rerank_k}"))
        if args.exhaustive:
            rows.append(row(label, evaluate(model_dir, args.data_dir, None), "exhaustive"))
    wall = {n: (runs / f"f8k-{n}" / "wall_seconds.txt").read_text().strip()
            if (runs / f"f8k-{n}" / "wall_seconds.txt").exists() else _wall_seconds(runs / f"f8k-{n}") or "?"
            for n in RUNS}

    target = ROOT / "checkpoints" / "tshsr-flickr8k"
    target.mkdir(parents=True, exist_ok=True)
    for f in SHIPPED:
        src = runs / "f8k-tshsr" / f
        if src.exists():
            shutil.copy2(src, target / f)
    ship_card(runs / "f8k-tshsr", target)

    body = [
        "## Default model and dual-encoder baseline (Flickr8k validation, 1,000 images / 5,000 captions)",
        "",
        f"Machine: {machine()}. Commit {git_commit()}. Written by `python benchmarks/flickr8k_default.py`.",
        "Frozen EfficientNet-Lite0 (7x7 grid of 1280-d cells) and all-MiniLM-L6-v2 token vectors, features cached "
        + ("once (MiniLM's hidden states below its last layer, which trains); " if "--text-finetune-layers"
           in RUNS["tshsr"] else "once; ")
        + ("the training photos also mirrored and cropped, each view cached once; " if "--augment-views"
           in RUNS["tshsr"] else "")
        + f"recipe `{DEFAULT_RECIPE}` ({RECIPES[DEFAULT_RECIPE][0]}), `{' '.join(budget_of(DEFAULT_RECIPE))}`, "
        "Adam 2e-4, seed 0; the "
        f"dual encoder trains with `{BASELINE_RECIPE}` ({RECIPES[BASELINE_RECIPE][0]}); the best epoch by validation "
        "RSUM is kept. Recalls in percent.",
        "",
        "| model | protocol | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Training wall time (features already cached, first to last log record, validation included): TSHSR "
        f"{wall['tshsr']} s"
        + _provenance(runs / "f8k-tshsr")
        + f", dual encoder {wall['dual']} s (while other runs shared the cores: a wall time, not a speed; "
        "`benchmarks/train_time.py` times the default recipe on an idle machine).",
        "",
        "Commands:",
        "",
        *[f"- `{c}`" for c in commands.values()],
    ]
    write_section("flickr8k_default", "\n".join(body))
    print("\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
