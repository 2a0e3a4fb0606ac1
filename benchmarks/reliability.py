#!/usr/bin/env python
"""Reliability figures: training under kill -9, a NaN loss and a failed Hub push; the app under
bad input and concurrent load (benchmarks/app_reliability.py against a launched `python app.py`).

    python benchmarks/reliability.py [--kills 8] [--skip-app] [--write-results]

Training: a tiny run (synthetic precomputed features, BiGRU) checkpointing every 2 steps is
killed with SIGKILL at random moments (inside steps and inside checkpoint saves) and resumed
each time with --resume, until it finishes; its final weights are compared with an uninterrupted
run of the same seed. Steps lost per kill = last step reached - last checkpointed step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from tshsr.testing import make_precomp  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def train_cmd(data: Path, out: Path, *extra: str, epochs: int = 6) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--dataset", "precomp", "--data-dir", str(data),
            "--split-val", "dev", "--image-feature-dim", "16", "--text-encoder", "bigru", "--embed-dim", "32",
            "--sim-dim", "16", "--batch-size", "8", "--epochs", str(epochs), "--checkpoint-every", "2", "--log-every", "1",
            "--val-rerank-k", "0", "--threads", "1", "--no-progress", "--output-dir", str(out),
            "--cache-dir", str(out.parent / "cache"), *extra]


def last_step(out: Path) -> int:
    path = out / "log.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def checkpoint_step(out: Path) -> int:
    import torch

    from tshsr_train.checkpoint import find_checkpoint

    found = find_checkpoint(out)
    if found is None:
        return 0
    return torch.load(found / "training_state.pt", weights_only=True)["state"]["global_step"]


def training_kills(kills: int, seed: int) -> dict:
    from safetensors.torch import load_file

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_precomp(tmp / "data")
        reference = tmp / "reference"
        epochs = max(6, 2 * kills)  # long enough that every requested kill lands before the run ends
        subprocess.run(train_cmd(data, reference, epochs=epochs), env=ENV, check=True, capture_output=True)
        total = last_step(reference)
        out = tmp / "killed"
        survived, lost, attempts = 0, [], 0
        while attempts < kills * 3:
            attempts += 1
            resume = ["--resume"] if (out / "checkpoint").exists() or (out / "checkpoint.old").exists() else []
            proc = subprocess.Popen(train_cmd(data, out, *resume, epochs=epochs), env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            if survived < kills:
                time.sleep(rng.uniform(1.5, 6.0))  # start-up takes 1-3 s; then steps and saves interleave
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    reached, saved = last_step(out), checkpoint_step(out)
                    lost.append(max(0, reached - saved))
                    survived += 1
                    continue
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"resumed run failed: {err[-2000:]}")
            if last_step(out) >= total:
                break
        final = load_file(str(out / "checkpoint" / "weights.safetensors"))
        expected = load_file(str(reference / "checkpoint" / "weights.safetensors"))
        diff = max(float((final[k] - expected[k]).abs().max()) for k in expected)
        return {"kills_requested": kills, "kills": survived, "steps_total": total, "steps_lost_per_kill": lost,
                "max_steps_lost": max(lost, default=0), "checkpoint_interval": 2,
                "final_weights_max_abs_diff_vs_uninterrupted": diff, "finished": last_step(out) >= total}


def training_faults() -> dict:
    """A NaN loss mid-run and a Hub push with no network: exit codes, messages, what is kept."""
    import torch
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "nan-data"
        folder.mkdir()
        nan_data = make_precomp(folder, nan_image=30)  # one image's features are NaN
        out = tmp / "nan"
        proc = subprocess.run(train_cmd(nan_data, out, "--epochs", "2", "--checkpoint-every", "1"), env=ENV,
                              capture_output=True, text=True)
        weights = load_file(str(out / "checkpoint" / "weights.safetensors")) if (out / "checkpoint").exists() else {}
        nan = {"exit_code": proc.returncode, "stopped_with_message": "Loss became nan" in proc.stderr,
               "last_good_checkpoint_kept": bool(weights) and all(
                   bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())}
        data = make_precomp(tmp / "data")
        out = tmp / "push"
        proc = subprocess.run(train_cmd(data, out, "--max-steps", "2", "--push-to-hub", "nobody/tshsr-reliability"),
                              env=ENV, capture_output=True, text=True)
        push = {"exit_code": proc.returncode, "clear_message": "push to the Hub" in proc.stderr,
                "local_model_kept": (out / "model.safetensors").is_file() and (out / "config.json").is_file()}
    return {"nan_loss": nan, "failed_push": push}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-app", action="store_true")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args()
    report = {"training": training_kills(args.kills, args.seed), "faults": training_faults()}
    print(json.dumps(report["training"], indent=2), json.dumps(report["faults"], indent=2), flush=True)
    if not args.skip_app:
        try:
            from app_reliability import run_app_checks  # provided beside this script with the app
        except ImportError:
            report["app"] = None
        else:
            report["app"] = run_app_checks()
            print(json.dumps(report["app"], indent=2), flush=True)
    if args.write_results:
        from results_md import git_commit, machine, write_section

        t = report["training"]
        lines = ["## Reliability", "", f"Machine: {machine()}. Commit {git_commit()}. "
                 f"`python benchmarks/reliability.py --kills {args.kills} --write-results`.", "",
                 "Training under `kill -9` (tiny synthetic run, checkpoint every 2 steps, killed at random moments "
                 "inside steps and checkpoint saves, resumed with `--resume` each time):", "",
                 f"- kills: {t['kills']} of {t['kills_requested']} requested landed and were resumed from; run finished: {t['finished']} "
                 f"({t['steps_total']} steps)",
                 f"- steps lost per kill: {t['steps_lost_per_kill']} (at most {t['max_steps_lost']}; the checkpoint "
                 f"interval is {t['checkpoint_interval']})",
                 f"- final weights vs an uninterrupted run: max abs difference "
                 f"{t['final_weights_max_abs_diff_vs_uninterrupted']:.2e}"]
        f = report["faults"]
        lines += [f"- NaN loss mid-run: exit code {f['nan_loss']['exit_code']}, stopped with a message: "
                  f"{f['nan_loss']['stopped_with_message']}, last good (finite) checkpoint kept: "
                  f"{f['nan_loss']['last_good_checkpoint_kept']}",
                  f"- `--push-to-hub` with the Hub unreachable (offline mode): exit code {f['failed_push']['exit_code']}, clear message: "
                  f"{f['failed_push']['clear_message']}, local model kept: {f['failed_push']['local_model_kept']}"]
        if report.get("app"):
            a = report["app"]
            lines += ["", "App:", ""] + [f"- {k}: {v}" for k, v in a.items()]
        write_section("reliability", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
