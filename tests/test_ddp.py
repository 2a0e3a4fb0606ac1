"""Several processes under torchrun (gloo on CPU): DistributedDataParallel over the global batch,
and kill -9 of one rank followed by --resume.

The runs use the tiny SCAN-style precomputed fixture of tests/test_train.py (random 16-d regions,
BiGRU text encoder), so each run takes seconds on one thread per process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tshsr.testing import make_precomp

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train.py", "--dataset", "precomp", "--data-dir", str(data), "--image-feature-dim", "16",
            "--text-encoder", "bigru", "--embed-dim", "32", "--sim-dim", "16", "--output-dir", str(out),
            "--cache-dir", str(out.parent / f"cache-{out.name}"), "--no-progress", "--val-rerank-k", "0",
            "--threads", "1", *extra]


def torchrun(n: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port()), *args]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def steps_logged(out: Path) -> list[int]:
    lines = (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").exists() else []
    return [r["step"] for r in map(json.loads, lines) if "step" in r]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint" / "weights.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_precomp(tmp_path_factory.mktemp("precomp"))


def test_two_ranks_of_batch_b_train_as_one_process_of_batch_2b(data, tmp_path):
    """2 processes x batch 8 reach the weights of 1 process x batch 16 (4 steps, full TSHSR preset).

    Equivalent in theory, not only approximately: the global batch of a step is the same
    captions in the same order (rank r takes the r-th B of the 2B the single process takes), the
    gathered images are deduplicated and sorted as the single process has them, the contrastive
    loss, the mining of hard negatives (on the gathered global vectors) and the random negatives
    (one generator seed per step on every rank) therefore pick the same candidates, and the
    cross-attention hinge scores the same pairs from the gathered units, each rank a share of
    them; gradients are scaled by the world size against DDP's mean where a rank holds only its
    part of them (tshsr_train/distributed.py).
    ``--warmup-epochs 0`` puts the hardest-negative hinge in play from the first step. What is not
    bit-equal is float summation order (gradients summed across ranks, padded caption widths per
    rank) and Adam's normalisation, which turns such 1e-7 differences of a near-zero gradient into
    up to a learning-rate-sized difference of one weight: hence the tolerance, which a batch-B
    single process (a different objective) exceeds by far.
    """
    common = ["--split-val", "", "--epochs", "1", "--max-steps", "4", "--warmup-epochs", "0",
              "--checkpoint-every", "100", "--log-every", "1"]
    single = tmp_path / "single_2b"
    result = run([sys.executable, *train_args(data, single, *common, "--batch-size", "16")])
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = tmp_path / "ddp_2x_b"
    result = run(torchrun(2, train_args(data, ddp, *common, "--batch-size", "8")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps_logged(ddp)[-1] == 4 and steps_logged(single)[-1] == 4
    small = tmp_path / "single_b"
    assert run([sys.executable, *train_args(data, small, *common, "--batch-size", "8")]).returncode == 0

    expected, got, other = weights(single), weights(ddp), weights(small)
    assert expected.keys() == got.keys()
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert worst < 5e-4, f"DDP differs from the big batch by {worst}"
    baseline = max(float((expected[k] - other[k]).abs().max()) for k in expected)
    assert baseline > 20 * worst, (baseline, worst)  # the check can tell batch sizes apart
    # Gradients match too: the per-step losses logged by rank 0 are the global batch's loss.
    def logged(out, key):
        return [r[key] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]

    # Gradients match before Adam (which hides a constant factor): the averaged gradient's norm
    # logged at every step is the big batch's. A hinge share without its x world scale or without
    # the sum over ranks shifts it by ~2 % here.
    assert len(logged(ddp, "loss")) == 4 and logged(ddp, "loss") == pytest.approx(logged(single, "loss"), abs=1e-4)
    assert logged(ddp, "grad_norm") == pytest.approx(logged(single, "grad_norm"), rel=2e-4)


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids += [int(k) for k in text]
    return kids


def test_kill_9_of_one_rank_then_resume_under_torchrun(data, tmp_path):
    """SIGKILL one of two ranks mid-run: torchrun stops the job; ``--resume`` under torchrun
    starts at the last checkpoint and finishes every remaining step and the final checkpoint."""
    out = tmp_path / "ddp"
    args = train_args(data, out, "--split-val", "", "--batch-size", "8", "--epochs", "3",
                      "--checkpoint-every", "4", "--log-every", "1")
    total = 3 * (48 * 5 // (8 * 2))
    proc = subprocess.Popen(torchrun(2, args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(s >= 10 for s in steps_logged(out)):
        time.sleep(0.02)
    ranks = _children(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    n_before = len(steps_logged(out))
    killed_at = max(steps_logged(out))
    assert killed_at < total, "the run finished before it could be killed"
    saved = torch.load(out / "checkpoint" / "training_state.pt", weights_only=True)["state"]["global_step"]
    assert 4 <= saved <= killed_at

    resumed = run(torchrun(2, [*args, "--resume"]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {out / 'checkpoint'}: epoch" in resumed.stdout
    assert f"step {saved}" in resumed.stdout
    logged = steps_logged(out)
    after = logged[n_before:]
    assert after == list(range(saved + 1, total + 1))  # it continued from the checkpoint, step by step
    final = torch.load(out / "checkpoint" / "training_state.pt", weights_only=True)["state"]
    assert final["global_step"] == total and final["epoch"] == 3
    assert (out / "model.safetensors").exists()
