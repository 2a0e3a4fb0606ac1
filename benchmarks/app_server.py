"""Runs ``python app.py`` on a free port for the app tests and benchmarks, and finds a model for it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "checkpoints" / "tshsr-flickr8k"
# A development stand-in while the default checkpoint is being trained (never needed in CI).
FALLBACK_MODEL = Path("/tmp/appmodel")
STARTUP_TIMEOUT_S = 300


def find_model() -> tuple[Path | None, str]:
    """(model folder, "") or (None, the reason the app tests must skip)."""
    for candidate in (DEFAULT_MODEL, FALLBACK_MODEL):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate, ""
    return None, (f"no trained model for the demo: {DEFAULT_MODEL} (the bundled checkpoint) is missing "
                  f"and so is {FALLBACK_MODEL}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class AppProcess:
    """A running ``python app.py``: its URL, its process and the file its output goes to."""

    url: str
    process: subprocess.Popen
    log_path: Path


@contextlib.contextmanager
def app_process(model: Path, log_path: Path, extra_args: tuple[str, ...] = (),
                startup_timeout_s: float = STARTUP_TIMEOUT_S):
    """Start app.py as a separate process (exactly as a user would) on a free loopback port, wait
    until it answers, yield an :class:`AppProcess`; stop it (terminate, then kill) however the
    block ends."""
    port = free_port()
    env = dict(os.environ, TSHSR_THREADS=os.environ.get("TSHSR_THREADS", "1"), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("TSHSR_MODEL", None)
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--model", str(model), "--host", "127.0.0.1",
             "--port", str(port), *extra_args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + startup_timeout_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"app.py exited with {process.returncode} during start-up:\n"
                                       + log_path.read_text(errors="replace")[-3000:])
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"app.py did not answer within {startup_timeout_s:.0f} s:\n"
                                       + log_path.read_text(errors="replace")[-3000:])
                time.sleep(0.5)
            yield AppProcess(url, process, log_path)
        finally:
            stop_process(process)


def stop_process(process: subprocess.Popen) -> None:
    """Terminate, wait, kill if it does not exit."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextlib.contextmanager
def running_app(model: Path, log_path: Path, extra_args: tuple[str, ...] = ()):
    """Start app.py as a separate process (exactly as a user would), yield its URL, stop it."""
    with app_process(model, log_path, extra_args) as app:
        yield app.url
