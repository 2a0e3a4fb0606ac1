#!/usr/bin/env python
"""The demo app under bad input and concurrent load, driven over HTTP as a user would drive it.

    python benchmarks/app_reliability.py [--clients 16] [--requests 20] [--timeout 600]

Starts ``python app.py --model checkpoints/tshsr-flickr8k --host 127.0.0.1 --port <free>`` in a
subprocess (``benchmarks/app_server.py``), waits until it answers, then:

1. **Bad input** through the API (gradio_client, ``/rank_captions`` and ``/rank_images``): broken,
   empty, odd and oversized files, empty / huge / unusual text, 20,000 pasted captions, bad
   ``top_k``. Each counts as *handled* when it comes back as a result or as an error carrying a
   readable message (not Gradio's generic "raised an exception" text, not the app's
   "Something went wrong" for an internal error, no traceback or server path in it), within a time
   limit, and the server logged no traceback other than the ones Gradio prints for the app's own
   ``gr.Error`` refusals. After each one a good request must succeed.
2. **Load**: N concurrent clients (threads, each its own ``gradio_client.Client``) x M requests,
   alternating ``/rank_images`` (a caption) and ``/rank_captions`` (an example photo), bounded by
   a total timeout: served / failed, p50 / p95 latency per endpoint, and the server's resident
   memory (psutil, children included) after a warm-up (10 requests submitted at once, so the
   concurrent path has run) and after the load; the issue's target is a change within 10%.
3. The server is stopped (terminate, wait, kill) however the run ends.

``run_app_checks()`` returns short human-readable values (``benchmarks/reliability.py`` writes
them into docs/RESULTS.md); ``measure()`` returns the raw figures (used by the tests).
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import re
import statistics
import struct
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
try:  # imported as benchmarks.app_reliability (by the tests, or python -m benchmarks.app_reliability)
    from .app_server import DEFAULT_MODEL, app_process
except ImportError:  # run as python benchmarks/app_reliability.py: this folder is importable
    from app_server import DEFAULT_MODEL, app_process

EXAMPLES = ROOT / "examples" / "images"
REQUEST_TIMEOUT_S = 120       # one bad-input request (or the good one after it) must answer within this
GOOD_TEXT = "a dog running on the grass"
GOOD_TOP_K = 5
LOAD_TEXTS = ["a dog running on the grass", "two people on a beach", "a red bus in the city",
              "a bird sitting on a branch", "musicians playing on a stage", "a cup of coffee on a table",
              "mountains under a blue sky", "a cat looking at the camera"]
GENERIC_ERROR = "has raised an exception but has not enabled verbose error reporting"
# Exceptions the server log may show: Gradio prints a traceback for every gr.Error it returns.
EXPECTED_LOGGED = ("gradio.exceptions.Error", "InvalidInputError")
GRADIO_REFUSALS = ("gradio.exceptions.InvalidPathError",)  # a file the user did not upload: never read


def expected_refusal(match: re.Match) -> bool:
    """An exception the server logs while refusing bad input as designed: the app's own readable
    errors, Gradio refusing a path that was not uploaded, or a payload that is not valid FileData."""
    name, line = match.group(1), match.group(0)
    return (name.endswith(EXPECTED_LOGGED) or name.endswith(GRADIO_REFUSALS)
            or (name.endswith("ValidationError") and "for FileData" in line))


EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?::.*)?$", re.M)


def _say(message: str) -> None:
    print(f"[app-reliability] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def example_photos() -> list[Path]:
    return sorted(p for p in EXAMPLES.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def write_png_bomb(path: Path, side: int) -> Path:
    """A 1-bit black PNG of side x side pixels, written row by row through zlib (never held in
    memory decoded): 30,000 x 30,000 is ~110 kB on disk and 900 million pixels once decoded."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + one row of zero bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def _image_file(folder: Path, name: str, make: Callable[[Path], None]) -> Path:
    path = folder / name
    if not path.exists():
        make(path)
    return path


def _jpeg_bytes(size=(64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, "JPEG")
    return buf.getvalue()


def _save(mode: str, size, colour, fmt: str | None = None):
    from PIL import Image

    return lambda p: Image.new(mode, size, colour).save(p, fmt)


def _sixteen_bit(path: Path) -> None:
    import numpy as np
    from PIL import Image

    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(path)


def _animated(path: Path) -> None:
    from PIL import Image

    frames = [Image.new("P", (40, 30), i * 40) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


@dataclass
class Case:
    """One bad (or odd) request: ``args(folder)`` builds the endpoint's arguments."""

    name: str
    endpoint: str                  # "/rank_captions", "/rank_images", "raw:/rank_captions" (plain HTTP
                                   # API, no gradio_client) or "upload" (a raw HTTP upload)
    args: Callable[[Path], tuple]
    expect: str                    # what docs/APP.md promises: "result" or "error"


def _photo_case(name: str, make: Callable[[Path], Path], expect: str, captions: str = "",
                top_k=GOOD_TOP_K) -> Case:
    from gradio_client import handle_file

    return Case(name, "/rank_captions", lambda d: (handle_file(str(make(d))), captions, top_k), expect)


def _pasted_case(name: str, captions: Callable[[], str], expect: str, top_k=GOOD_TOP_K) -> Case:
    from gradio_client import handle_file

    return Case(name, "/rank_captions",
                lambda d: (handle_file(str(example_photos()[0])), captions(), top_k), expect)


def _text_case(name: str, text, expect: str, top_k=GOOD_TOP_K) -> Case:
    return Case(name, "/rank_images", lambda d: (text, top_k), expect)


def bad_input_cases() -> list[Case]:
    f = _image_file
    return [
        _photo_case("corrupt bytes", lambda d: f(d, "corrupt.jpg", lambda p: p.write_bytes(
            b"\xff\xd8\xff\xe0" + bytes((i * 7919) % 251 for i in range(4000)))), "error"),
        _photo_case("truncated JPEG", lambda d: f(d, "truncated.jpg", lambda p: p.write_bytes(
            _jpeg_bytes()[: len(_jpeg_bytes()) // 2])), "error"),
        _photo_case("zero-byte file", lambda d: f(d, "empty.jpg", lambda p: p.write_bytes(b"")), "error"),
        _photo_case("non-image renamed .jpg", lambda d: f(d, "report.jpg", lambda p: p.write_bytes(
            b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")), "error"),
        _photo_case("1x1 image", lambda d: f(d, "one.png", _save("RGB", (1, 1), (200, 10, 10))), "result"),
        _photo_case("decompression bomb (30000 x 30000 PNG)",
                    lambda d: f(d, "bomb.png", lambda p: write_png_bomb(p, 30_000)), "error"),
        _photo_case("16-bit PNG", lambda d: f(d, "deep.png", _sixteen_bit), "result"),
        _photo_case("CMYK JPEG", lambda d: f(d, "cmyk.jpg", _save("CMYK", (80, 60), (0, 255, 255, 0), "JPEG")),
                    "result"),
        _photo_case("animated GIF", lambda d: f(d, "anim.gif", _animated), "result"),
        Case("upload over the 10 MB limit", "upload",
             lambda d: (f(d, "big.png", lambda p: p.write_bytes(b"\x89PNG" + bytes(11 * 1024 * 1024))),), "error"),
        Case("no file", "/rank_captions", lambda d: (None, "", GOOD_TOP_K), "error"),
        Case("a bare server path instead of an uploaded file", "/rank_captions",
             lambda d: ("/etc/hostname", "", GOOD_TOP_K), "error"),
        Case("a server file outside the uploads, as FileData (raw HTTP)", "raw:/rank_captions",
             lambda d: ({"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}, "", GOOD_TOP_K), "error"),
        _text_case("empty text", "", "error"),
        _text_case("whitespace-only text", "  \n\t  ", "error"),
        _text_case("10,000-character caption", ("a dog runs on the grass " * 500)[:10_000], "result"),
        _text_case("emoji caption", "🐶🐕 on the 🏖️ 🌊", "result"),
        _text_case("CJK caption", "一只狗在草地上奔跑", "result"),
        _text_case("caption with control characters", "a\u200bdog\ton\x07the\x1bgrass\r\n", "result"),
        _text_case("only control characters", "\x00\x01\x02\x7f", "error"),
        _text_case("top_k 0 (/rank_images)", GOOD_TEXT, "error", top_k=0),
        _text_case("top_k negative (/rank_images)", GOOD_TEXT, "error", top_k=-5),
        _text_case("top_k huge (/rank_images)", GOOD_TEXT, "error", top_k=10**12),
        _text_case("top_k not a number (/rank_images)", GOOD_TEXT, "error", top_k="five"),
        _pasted_case("pasted 10,000-character caption", lambda: ("a cat sits on a mat " * 500)[:10_000], "result"),
        _pasted_case("pasted emoji / CJK / control-character captions",
                     lambda: "🐶🐕🦴\n一只狗在草地上奔跑\na\u200bdog\x07barks\n\x00\x01\x02", "result"),
        _pasted_case("pasted pool of 20,000 captions",
                     lambda: "\n".join(f"caption number {i}: a dog runs" for i in range(20_000)), "error"),
        _pasted_case("top_k 0 (/rank_captions)", lambda: "", "error", top_k=0),
        _pasted_case("top_k negative (/rank_captions)", lambda: "", "error", top_k=-1),
        _pasted_case("top_k huge (/rank_captions)", lambda: "", "error", top_k=10**9),
    ]


# ----------------------------------------------------------------------------------------------
# One request, judged
# ----------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    name: str
    expect: str
    got: str = ""                  # "result", "error", "timeout", "client error"
    message: str = ""
    handled: bool = False
    why_not: str = ""
    as_documented: bool = False
    good_after: bool = False
    seconds: float = 0.0


def call(client, endpoint: str, args: tuple, timeout: float):
    job = client.submit(*args, api_name=endpoint)
    try:
        return job.result(timeout=timeout)
    except TimeoutError:
        job.cancel()
        raise


def valid_ranking(result, top_k: int | None = None) -> bool:
    if not isinstance(result, dict) or not isinstance(result.get("results"), list) or not result["results"]:
        return False
    rows = result["results"]
    scores = [r.get("score") for r in rows]
    return ((top_k is None or len(rows) == min(top_k, result.get("candidates", top_k)))
            and [r.get("rank") for r in rows] == list(range(1, len(rows) + 1))
            and all(isinstance(s, float) for s in scores) and all(a >= b for a, b in zip(scores, scores[1:])))


def unreadable(message: str, title: str = "") -> str:
    """Why an error message is not one a person can act on ("" when it is fine)."""
    if not message.strip():
        return "empty error message"
    if GENERIC_ERROR in message:
        return "Gradio's generic error (an exception outside the app's checks)"
    if title == "Internal error" or "Something went wrong" in message:
        return f"the app's internal-error message: {message[:120]}"
    if "Traceback" in message or re.search(r"/tmp/|gradio/[0-9a-f]{20,}", message):
        return "traceback or server path in the message"
    return ""


class LogWatch:
    """New lines of the server's log since the last look: exceptions other than the expected ones."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_problems(self) -> list[str]:
        text = self.path.read_text(errors="replace")
        new, self.offset = text[self.offset:], len(text)
        problems = [m.group(0)[:160] for m in EXC_LINE.finditer(new) if not expected_refusal(m)]
        for marker in ("request failed", "Exception in ASGI application", "500 Internal Server Error"):
            if marker in new:
                problems.append(marker)
        return problems


def raw_upload(url: str, data: bytes, name: str) -> tuple[int, str]:
    """POST one file to Gradio's upload route as a browser does: (HTTP status, body start)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, response.read(300).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(300).decode(errors="replace")


def raw_call(url: str, endpoint: str, data: list, timeout: float = REQUEST_TIMEOUT_S) -> tuple[str, object]:
    """Gradio's plain-HTTP API (submit, then read the server-sent events), bypassing gradio_client's
    own file handling: ("result", output) or ("error", message or None)."""
    request = urllib.request.Request(url + f"gradio_api/call{endpoint}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            event_id = json.loads(response.read())["event_id"]
        with urllib.request.urlopen(url + f"gradio_api/call{endpoint}/{event_id}", timeout=timeout) as response:
            stream = response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return "error", f"HTTP {exc.code} {exc.read(200).decode(errors='replace')}"
    event, payload = "", None
    for line in stream.splitlines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            payload = json.loads(line.split(":", 1)[1])
    if event == "complete":
        return "result", payload[0] if isinstance(payload, list) and payload else payload
    return "error", payload.get("error") if isinstance(payload, dict) else payload


def good_request(client, endpoint: str, timeout: float = REQUEST_TIMEOUT_S) -> bool:
    from gradio_client import handle_file

    try:
        if endpoint == "/rank_images":
            result = call(client, "/rank_images", (GOOD_TEXT, GOOD_TOP_K), timeout)
        else:
            result = call(client, "/rank_captions", (handle_file(str(example_photos()[0])), "", GOOD_TOP_K), timeout)
    except Exception:
        return False
    return valid_ranking(result, GOOD_TOP_K)


def try_case(case: Case, client, url: str, folder: Path, log: LogWatch) -> Outcome:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    out = Outcome(case.name, case.expect)
    args = case.args(folder)
    started = time.perf_counter()
    if case.endpoint == "upload":
        path = args[0]
        status, body = raw_upload(url, path.read_bytes(), path.name)
        out.got, out.message = ("error" if status >= 400 else "result"), f"HTTP {status} {body[:100]}"
        out.handled = status == 413
        if not out.handled:
            out.why_not = f"expected HTTP 413, got {status}"
        try:  # gradio_client reads the limit from the app and refuses before sending
            call(client, "/rank_captions", (handle_file(str(path)), "", GOOD_TOP_K), REQUEST_TIMEOUT_S)
            out.handled, out.why_not = False, "gradio_client sent it and got a result"
        except Exception as exc:  # noqa: BLE001 - judged by its message
            out.message += f"; gradio_client: {str(exc)[:100]}"
            if "maximum file size" not in str(exc):
                out.handled, out.why_not = False, f"gradio_client: {type(exc).__name__}: {str(exc)[:100]}"
    elif case.endpoint.startswith("raw:"):
        out.got, payload = raw_call(url, case.endpoint[4:], list(args))
        if out.got == "error":
            out.message = str(payload or "")
            out.why_not = ("Gradio's generic error (an exception outside the app's checks)" if payload is None
                           else unreadable(out.message))
            out.handled = not out.why_not
        else:
            out.message, out.handled = "ranked", valid_ranking(payload)
            out.why_not = "" if out.handled else f"malformed result: {str(payload)[:120]}"
    else:
        try:
            result = call(client, case.endpoint, args, REQUEST_TIMEOUT_S)
        except AppError as exc:
            out.got, out.message = "error", str(exc.message)
            out.why_not = unreadable(out.message, getattr(exc, "title", ""))
            out.handled = not out.why_not
        except TimeoutError:
            out.got, out.why_not = "timeout", f"no answer within {REQUEST_TIMEOUT_S} s"
        except Exception as exc:  # noqa: BLE001 - a transport or client failure
            out.got, out.message = "client error", f"{type(exc).__name__}: {str(exc)[:200]}"
            out.why_not = out.message
        else:
            out.got = "result"
            notes = result.get("notes") if isinstance(result, dict) else None
            out.message = "; ".join(notes)[:200] if notes else "ranked"
            out.handled = valid_ranking(result)
            if not out.handled:
                out.why_not = f"malformed result: {str(result)[:120]}"
    out.seconds = time.perf_counter() - started
    out.good_after = good_request(client, "/rank_images" if case.endpoint.endswith("/rank_images") else "/rank_captions")
    problems = log.new_problems()
    if problems:
        out.handled = False
        out.why_not = (out.why_not + "; " if out.why_not else "") + "server logged " + " | ".join(problems[:3])
    out.as_documented = out.handled and out.got == case.expect
    return out


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------
def server_rss(pid: int) -> int:
    """Resident memory of a process and all its children, in bytes."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def load_request(client, n: int, photos: list[Path], timeout: float) -> tuple[str, dict]:
    from gradio_client import handle_file

    if n % 2 == 0:
        return "/rank_images", call(client, "/rank_images", (LOAD_TEXTS[n // 2 % len(LOAD_TEXTS)], GOOD_TOP_K), timeout)
    photo = photos[n // 2 % len(photos)]
    return "/rank_captions", call(client, "/rank_captions", (handle_file(str(photo)), "", GOOD_TOP_K), timeout)


@dataclass
class LoadResult:
    clients: int
    requests_per_client: int
    timeout_s: float
    served: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latency_s: dict[str, list[float]] = field(default_factory=dict)
    wall_s: float = 0.0
    peak_rss: int = 0


def run_warmup(client, n: int) -> int:
    """``n`` requests submitted at once from one client (both endpoints, so the app's concurrent
    path runs too) before the memory baseline is taken; how many came back well-formed."""
    from gradio_client import handle_file

    photos = example_photos()
    jobs = []
    for i in range(n):
        if i % 2 == 0:
            jobs.append(client.submit(LOAD_TEXTS[i % len(LOAD_TEXTS)], GOOD_TOP_K, api_name="/rank_images"))
        else:
            jobs.append(client.submit(handle_file(str(photos[i % len(photos)])), "", GOOD_TOP_K,
                                      api_name="/rank_captions"))
    served = 0
    for job in jobs:
        try:
            served += valid_ranking(job.result(timeout=REQUEST_TIMEOUT_S), GOOD_TOP_K)
        except Exception:  # noqa: BLE001 - counted as not served
            pass
    return served


def run_load(url: str, pid: int, clients: int, per_client: int, timeout_s: float) -> LoadResult:
    from gradio_client import Client

    photos = example_photos()
    result = LoadResult(clients, per_client, timeout_s)
    lock = threading.Lock()
    ready = threading.Semaphore(0)
    go = threading.Event()
    deadline = [0.0]

    def record(endpoint: str | None, ok: bool, seconds: float = 0.0, error: str = "") -> None:
        with lock:
            if ok:
                result.served += 1
                result.latency_s.setdefault(endpoint, []).append(seconds)
            else:
                result.failed += 1
                if len(result.errors) < 20:
                    result.errors.append(error)

    def worker(c: int) -> None:
        try:
            client = Client(url, verbose=False)
        except Exception as exc:  # noqa: BLE001
            client, error = None, f"client {c} could not connect: {type(exc).__name__}: {str(exc)[:100]}"
        ready.release()
        go.wait()
        for i in range(per_client):
            if client is None:
                record(None, False, error=error)
                continue
            left = deadline[0] - time.monotonic()
            if left <= 0:
                record(None, False, error=f"not sent: the total timeout ({timeout_s:.0f} s) ran out")
                continue
            started = time.perf_counter()
            try:
                endpoint, answer = load_request(client, c + i, photos, left)
            except Exception as exc:  # noqa: BLE001
                record(None, False, error=f"{type(exc).__name__}: {str(exc)[:160]}")
                continue
            if valid_ranking(answer, GOOD_TOP_K):
                record(endpoint, True, time.perf_counter() - started)
            else:
                record(endpoint, False, error=f"malformed result: {str(answer)[:120]}")

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    connect_deadline = time.monotonic() + min(120.0, timeout_s)
    for _ in threads:
        ready.acquire(timeout=max(0.0, connect_deadline - time.monotonic()))
    started = time.monotonic()
    deadline[0] = started + timeout_s
    go.set()

    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            result.peak_rss = max(result.peak_rss, server_rss(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for t in threads:
        t.join(timeout=max(1.0, deadline[0] + 30 - time.monotonic()))
    stop.set()
    sampler.join(timeout=5)
    result.wall_s = time.monotonic() - started
    with lock:  # threads still stuck past the deadline (+30 s): their requests count as failed
        missing = clients * per_client - result.served - result.failed
        if missing > 0:
            result.failed += missing
            result.errors.append(f"{missing} request(s) still unanswered {timeout_s + 30:.0f} s after the start")
    return result


# ----------------------------------------------------------------------------------------------
# The whole check
# ----------------------------------------------------------------------------------------------
def app_queue_settings() -> dict:
    """The queue settings app.py uses when started without options (read from its source)."""
    tree = ast.parse((ROOT / "app.py").read_text())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args:
            flag = getattr(node.args[0], "value", None)
            for kw in node.keywords:
                if kw.arg == "default" and flag in ("--concurrency", "--queue-size"):
                    found[flag] = ast.literal_eval(kw.value)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "MAX_UPLOAD_SIZE" for t in node.targets):
            found["max_upload"] = ast.literal_eval(node.value)
    return found


def measure(clients: int = 16, requests_per_client: int = 20, total_timeout_s: float = 600.0,
            warmup: int = 10, case_names: list[str] | None = None, model: Path = DEFAULT_MODEL) -> dict:
    """Run the checks against a fresh ``python app.py``; the raw figures."""
    from gradio_client import Client

    cases = bad_input_cases()
    if case_names is not None:
        unknown = set(case_names) - {c.name for c in cases}
        if unknown:
            raise ValueError(f"unknown bad-input cases: {sorted(unknown)}")
        cases = [c for c in cases if c.name in case_names]
    report: dict = {"model": str(model), "queue": app_queue_settings()}
    with tempfile.TemporaryDirectory(prefix="tshsr-app-reliability-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        with app_process(model, tmp / "app.log") as app:
            report["startup_s"] = time.perf_counter() - started
            _say(f"app ready at {app.url} in {report['startup_s']:.0f} s (pid {app.process.pid})")
            log = LogWatch(app.log_path)
            log.new_problems()  # start-up output is not a request's
            client = Client(app.url, verbose=False)
            inputs = tmp / "inputs"
            inputs.mkdir()
            outcomes = []
            for case in cases:
                outcome = try_case(case, client, app.url, inputs, log)
                outcomes.append(outcome)
                _say(f"{case.name}: {outcome.got} ({outcome.message[:90]!r})"
                     + ("" if outcome.handled else f" NOT HANDLED: {outcome.why_not}")
                     + ("" if outcome.good_after else " [good request after it FAILED]"))
            report["bad_inputs"] = [asdict(o) for o in outcomes]

            report["warmup_requests"] = warmup
            report["warmup_served"] = run_warmup(client, warmup)
            report["rss_after_warmup"] = server_rss(app.process.pid)
            _say(f"load: {clients} clients x {requests_per_client} requests ...")
            load = run_load(app.url, app.process.pid, clients, requests_per_client, total_timeout_s)
            time.sleep(1.0)
            report["rss_after_load"] = server_rss(app.process.pid)
            report["load"] = asdict(load)
            report["load_log_problems"] = log.new_problems()
            report["alive_after_load"] = app.process.poll() is None and good_request(client, "/rank_images")
            _say(f"load: {load.served} served, {load.failed} failed in {load.wall_s:.0f} s")
    return report


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


def summarize(report: dict) -> dict[str, str]:
    """Short human-readable values, one line each in docs/RESULTS.md."""
    bad = report["bad_inputs"]
    n = len(bad)
    load = report["load"]
    total = load["clients"] * load["requests_per_client"]
    mb = 1024 * 1024
    before, after = report["rss_after_warmup"], report["rss_after_load"]
    change = (after - before) / before * 100 if before else float("nan")
    lat = {k: v for k, v in load["latency_s"].items() if v}
    every = [x for v in lat.values() for x in v]

    def p50_p95(values):
        return f"p50 {_pct(values, 50):.2f} s, p95 {_pct(values, 95):.2f} s"

    q = report["queue"]
    not_handled = [f"{o['name']} ({o['why_not']})" for o in bad if not o["handled"]]
    undocumented = [f"{o['name']} (expected {o['expect']}, got {o['got']})" for o in bad
                    if o["handled"] and not o["as_documented"]]
    out = {
        "bad inputs tried": f"{n} ({sum(o['expect'] == 'result' for o in bad)} odd but valid, "
                            f"{sum(o['expect'] == 'error' for o in bad)} invalid), one request each via "
                            "gradio_client (`/rank_captions`, `/rank_images`); the oversized upload also as a raw "
                            "HTTP upload, a server path as FileData over plain HTTP",
        "handled (a result or a readable error, no server traceback)": f"{sum(o['handled'] for o in bad)} of {n}",
        "not handled": "; ".join(not_handled) or "none",
        "outcome as docs/APP.md states (result vs error)": f"{sum(o['as_documented'] for o in bad)} of {n}"
        + (f" (differs: {'; '.join(undocumented)})" if undocumented else ""),
        "good requests after bad ones succeeded": f"{sum(o['good_after'] for o in bad)} of {n}",
        "load": f"{load['clients']} concurrent clients x {load['requests_per_client']} requests "
                f"(alternating `/rank_images` with a caption and `/rank_captions` with an example photo), "
                f"total timeout {load['timeout_s']:.0f} s",
        "load requests": f"{load['served']} served, {load['failed']} failed of {total} "
                         f"in {load['wall_s']:.0f} s ({load['served'] / max(load['wall_s'], 1e-9):.1f} requests/s)"
                         + (f"; first errors: {' | '.join(load['errors'][:2])}" if load["errors"] else ""),
        "load latency (client-side, queueing included)": "; ".join(
            [f"{k} {p50_p95(v)}" for k, v in sorted(lat.items())] + ([f"all {p50_p95(every)}"] if every else []))
        or "no request served",
        "server errors logged during load": (" | ".join(report["load_log_problems"][:3])
                                             if report["load_log_problems"] else "none"),
        "server memory (RSS, children included)": (
            f"{before / mb:,.0f} MB after a warm-up of {report['warmup_requests']} requests submitted at once "
            f"({report['warmup_served']} served), {after / mb:,.0f} MB after "
            f"the load ({change:+.1f}%; target within 10%: {'met' if abs(change) <= 10 else 'NOT met'}); "
            f"peak during the load {load['peak_rss'] / mb:,.0f} MB"),
        "still serving after the load": "yes" if report["alive_after_load"] else "NO",
        "queue settings": f"{q.get('--concurrency', '?')} requests computed at once (default_concurrency_limit), "
                          f"at most {q.get('--queue-size', '?')} waiting (max_size), uploads up to "
                          f"{q.get('max_upload', '?')}; app.py's defaults, 1 torch thread",
    }
    return out


def run_app_checks(clients: int = 16, requests_per_client: int = 20, total_timeout_s: float = 600.0,
                   case_names: list[str] | None = None) -> dict[str, str]:
    """Bad input and concurrent load against ``python app.py``; short human-readable figures."""
    model = DEFAULT_MODEL
    if not ((model / "config.json").is_file() and (model / "model.safetensors").is_file()):
        return {"app checks": f"skipped: no model at {model.relative_to(ROOT)}"}
    return summarize(measure(clients, requests_per_client, total_timeout_s, case_names=case_names, model=model))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--timeout", type=float, default=600.0, help="total timeout of the load, seconds")
    parser.add_argument("--raw", action="store_true", help="print the raw figures too")
    args = parser.parse_args(argv)
    if args.raw:
        report = measure(args.clients, args.requests, args.timeout)
        print(json.dumps(report, indent=2, ensure_ascii=False, default=str))
        print(json.dumps(summarize(report), indent=2, ensure_ascii=False))
    else:
        print(json.dumps(run_app_checks(args.clients, args.requests, args.timeout), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
