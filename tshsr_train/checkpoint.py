"""Training checkpoints: OUT/checkpoint/{weights.safetensors, training_state.pt, config.json}
(and vocab.json for a BiGRU), written beside the old one and swapped in by renames, so a crash
at any moment leaves a complete checkpoint that ``--resume`` finds."""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from tshsr.model import TSHSRModel


def save_checkpoint(directory: Path, model: TSHSRModel, optimizer, state: dict) -> None:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    trainable = {k: v.cpu() for k, v in model.saved_state_dict().items()}
    save_file(trainable, str(tmp / "weights.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "state": state,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "numpy": _numpy_state()}},
               tmp / "training_state.pt")
    (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    if model.vocabulary is not None:
        model.vocabulary.save(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _numpy_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
            "has_gauss": has_gauss, "cached": cached}


def _set_numpy_state(s):
    np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))


def find_checkpoint(output_dir: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old survives a crash between the two renames
        candidate = output_dir / name
        if (candidate / "training_state.pt").is_file() and (candidate / "weights.safetensors").is_file():
            return candidate
    return None


def load_checkpoint(directory: Path, model: TSHSRModel, optimizer) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(directory / "weights.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    frozen = tuple(model.frozen_prefixes())
    missing = [k for k in missing if not k.startswith(frozen)]
    if missing or unexpected:
        raise RuntimeError(f"Checkpoint {directory} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    blob = torch.load(directory / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"]["torch"])
    random.setstate(_to_tuple(blob["rng"]["python"]))
    _set_numpy_state(blob["rng"]["numpy"])
    return blob["state"]


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


LOCK_NAME = "train.lock"


def claim_output_dir(out: Path) -> Path:
    """Take OUT/train.lock for this process (it holds the PID) until the process exits: two trainers
    writing to one folder interleave their checkpoints and logs, and each resumes from the other's
    snapshots. A lock whose process no longer runs (a killed run) is taken over."""
    lock = Path(out) / LOCK_NAME
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = _lock_pid(lock)
            if pid is None:  # just created by another process and not written yet, or empty: look again
                time.sleep(0.2)
                pid = _lock_pid(lock)
            if pid is not None and pid != os.getpid() and _running(pid):
                raise SystemExit(f"{out} is being written by another training process (pid {pid}); stop it or "
                                 f"choose another --output-dir (if no training runs there, delete {lock})")
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(_release, lock, os.getpid())
        return lock


def _lock_pid(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):  # vanished, empty or unreadable
        return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _release(lock: Path, pid: int) -> None:
    if _lock_pid(lock) == pid:
        lock.unlink(missing_ok=True)
