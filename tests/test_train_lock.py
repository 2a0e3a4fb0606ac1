"""One trainer per output folder: train.py holds OUT/train.lock (its PID) while it runs, so a second
trainer started on the same folder (a restart whose old process survived) stops at once instead of
interleaving checkpoints and logs with the first; a lock left by a killed run is taken over."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.test_train import data, run, train_cmd  # noqa: F401  (the precomp fixture)
from tshsr_train.checkpoint import LOCK_NAME


def test_a_folder_held_by_a_running_trainer_is_refused_and_left_alone(data, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(str(os.getpid()))  # this test process: alive, not the new trainer
    result = run(train_cmd(data, out, "--epochs", "1"))
    assert result.returncode != 0
    assert "being written by another training process" in result.stderr and str(os.getpid()) in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written, the lock kept
    assert (out / LOCK_NAME).read_text() == str(os.getpid())


def test_a_stale_lock_is_taken_over_and_released_at_the_end(data, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its PID no longer runs
    (out / LOCK_NAME).write_text(str(gone.pid))
    result = run(train_cmd(data, out, "--epochs", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").exists()
    assert not (out / LOCK_NAME).exists()
