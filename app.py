#!/usr/bin/env python
"""TSHSR demo: rank captions for a photo and photos for a caption, and show why.

    python app.py [--model PATH_OR_HUB_ID] [--port 7860] [--host 127.0.0.1] [--device auto|cpu|cuda]

The entry point (also the ``tshsr-app`` command, and what a Hugging Face Space runs): options,
start-up and the web server. The engine (model, built-in gallery and caption pool, ranking,
explanation) is :mod:`tshsr_app.engine`; the page and its API are :mod:`tshsr_app.page`.

``demo``, the ``gr.Blocks`` page, is a module attribute, as Spaces and ``gradio app.py`` expect.
``python app.py`` builds it from its options and launches it. Elsewhere, reading ``app.demo``
builds it on first use with the defaults of ``python app.py`` (so ``$TSHSR_MODEL``,
``$TSHSR_DEVICE`` and ``$TSHSR_THREADS`` apply); merely importing ``app`` (tests, benchmarks)
loads no model. Either way ``demo.launch()`` applies the app's upload limit and allowed paths.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import logging
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from tshsr import CheckpointError, TSHSRModel  # noqa: E402
from tshsr_app.engine import (  # noqa: E402,F401  (re-exported: tests and benchmarks use app.X)
    EXAMPLES_DIR,
    MAX_SESSION_UPLOADS,
    MAX_TOP_K,
    DemoEngine,
    read_examples,
)
from tshsr_app.page import Handlers, build_demo  # noqa: E402,F401

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "checkpoints" / "tshsr-flickr8k"
MAX_UPLOAD_SIZE = "10mb"  # per uploaded file, enforced by Gradio before our code runs
DEVICES = ("auto", "cpu", "cuda")


def load_model(reference: str) -> TSHSRModel:
    """Load a local folder or Hub id; a missing model is a clear error, not a traceback."""
    path = Path(reference).expanduser()
    looks_local = path.is_absolute() or reference.startswith(".") or path.exists() or reference.count("/") != 1
    if looks_local and not path.is_dir():
        raise FileNotFoundError(
            f"Model folder not found: {reference}\n"
            f"  Pass --model PATH_OR_HUB_ID (or set TSHSR_MODEL) to a folder with config.json and "
            f"model.safetensors, e.g. one written by train.py.")
    return TSHSRModel.from_pretrained(str(path) if path.is_dir() else reference)


def resolve_device(name: str) -> torch.device:
    """``auto``: a CUDA GPU when there is one, else the CPU. Asking for ``cuda`` without one is an
    error (a demo silently on the CPU would be many times slower than its owner expects)."""
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                         "use --device cpu or --device auto")
    return torch.device(name)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("TSHSR_MODEL") or str(DEFAULT_MODEL),
                        help="model folder or Hugging Face Hub id (default: $TSHSR_MODEL or %(default)s)")
    parser.add_argument("--device", choices=DEVICES, default=os.environ.get("TSHSR_DEVICE", "auto"),
                        help="where the model runs; on a GPU scoring runs in bf16 (default: $TSHSR_DEVICE or auto: "
                             "cuda when available)")
    parser.add_argument("--host", default=None, help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--examples", default=str(EXAMPLES_DIR), help="folder with images/ and captions.json")
    parser.add_argument("--concurrency", type=int, default=2, help="requests computed at the same time")
    parser.add_argument("--queue-size", type=int, default=32, help="requests waiting at most; more are refused")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("TSHSR_THREADS", "0")) or None,
                        help="torch threads (default: $TSHSR_THREADS or CPU cores / concurrency)")
    return parser.parse_args(argv)


def default_threads(concurrency: int) -> int:
    # Each concurrent request gets its share of the cores: oversubscribed intra-op threads spin
    # against each other and run many times slower than one thread each.
    return max(1, (os.cpu_count() or 1) // max(1, concurrency))


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX`` would) unless that variable is set.

    Gradio runs each request on one of many worker threads; glibc gives threads their own arena,
    and the model's short-lived tensors left the server's memory ~25% larger after 320 concurrent
    requests and still growing (fragmentation, not a leak). With two arenas it levels off."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return bool(mallopt(-8, arenas))  # -8 = M_ARENA_MAX


def create_demo(args: argparse.Namespace) -> tuple[gr.Blocks, DemoEngine]:
    """Load the model on its device, encode the examples, build the page with its queue; its
    ``launch`` defaults to the app's upload limit and the folders the page shows files from."""
    limit_malloc_arenas(max(2, args.concurrency))
    torch.set_num_threads(args.threads or default_threads(args.concurrency))
    device = resolve_device(args.device)
    _say(f"loading model {args.model} on {device} ({torch.get_num_threads()} torch threads) ...")
    model = load_model(args.model).to(device)
    engine = DemoEngine(model, model_name=args.model, examples_dir=Path(args.examples))
    demo = build_demo(engine, MAX_UPLOAD_SIZE)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
    allowed = [str(Path(args.examples).resolve()), str(engine.upload_root)]
    # show_error: Gradio's own refusals (paths not uploaded, malformed FileData) reach the client
    # with their reason; the app's handlers raise readable errors themselves.
    demo.launch = functools.partial(demo.launch, max_file_size=MAX_UPLOAD_SIZE, allowed_paths=allowed,
                                    show_error=True)
    return demo, engine


def _say(message: str) -> None:
    print(f"[tshsr-app] {message}", flush=True)


_demo_lock = threading.Lock()


def __getattr__(name: str):
    """``app.demo`` on first use (PEP 562): built with ``python app.py``'s defaults, then kept."""
    if name != "demo":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _demo_lock:
        if "demo" not in globals():
            globals()["demo"] = create_demo(parse_args([]))[0]
    return globals()["demo"]


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        demo, engine = create_demo(args)
    except (FileNotFoundError, CheckpointError, OSError, ValueError) as exc:
        print(f"error: could not start the demo.\n  {exc}", file=sys.stderr)
        return 2
    globals()["demo"] = demo  # the module-level demo that Spaces' reloader looks for
    _say(f"ready in {time.perf_counter() - started:.1f} s ({len(engine.gallery)} photos, "
         f"{len(engine.pool)} captions encoded); starting the web server")
    demo.launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
