#!/usr/bin/env python
"""TSHSR demo: rank captions for a photo and photos for a caption, and show why.

    python app.py [--model PATH_OR_HUB_ID] [--port 7860] [--host 127.0.0.1]

A thin front end over the ``tshsr`` library. Everything heavy happens once at start-up: the model
is loaded, the built-in example photos are encoded into a :class:`~tshsr.retrieval.GalleryIndex`
and the built-in caption pool is encoded; a request then encodes only its query (and any new
pasted captions, which are cached). Every score shown is the model's own, with its exact
breakdown per stream and level (``TSHSROutput.contributions``); the app never recomputes one.

Named API endpoints (see docs/APP.md): ``/rank_captions`` and ``/rank_images``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tshsr import CheckpointError, InvalidInputError, TSHSRModel  # noqa: E402
from tshsr.explain import (  # noqa: E402
    contribution_figure,
    key_label,
    pair_attention,
    region_top_words,
    region_words_figure,
    word_heatmaps,
)
from tshsr.io import glibc  # noqa: E402
from tshsr.model import TextEncoding  # noqa: E402
from tshsr.processing import MAX_IMAGE_PIXELS, MAX_TEXT_CHARS, load_image, validate_text  # noqa: E402
from tshsr.retrieval import GalleryIndex  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "checkpoints" / "tshsr-flickr8k"
EXAMPLES_DIR = ROOT / "examples"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}

# Limits, stated in the UI and docs/APP.md. Requests beyond them are refused with a message.
MAX_TOP_K = 50
MAX_USER_CAPTIONS = 1000          # pasted lines per request (encoding 1,000 lines takes seconds)
MAX_PASTE_CHARS = 500_000         # total pasted text per request
MAX_UPLOAD_SIZE = "10mb"          # per uploaded file, enforced by Gradio before our code runs
MAX_SESSION_UPLOADS = 32          # photos a browser session may add to its gallery
TEXT_CACHE_SIZE = 4096            # encodings of pasted captions kept for later requests
EXPLAIN_MAX_WORDS = 16            # word heatmaps drawn for one match
SESSION_TTL_S = 3600

log = logging.getLogger("tshsr.app")


def _print(message: str) -> None:
    print(f"[tshsr-app] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Input checks (InvalidInputError carries a message for a person; the UI shows it verbatim)
# ----------------------------------------------------------------------------------------------
def check_top_k(top_k) -> int:
    wanted = f"top_k must be a whole number from 1 to {MAX_TOP_K}"
    if top_k is None or isinstance(top_k, bool):
        raise InvalidInputError(wanted)
    try:
        value = float(top_k)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{wanted}, got {str(top_k)[:40]!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise InvalidInputError(f"{wanted}, got {value:g}")
    if not 1 <= value <= MAX_TOP_K:
        raise InvalidInputError(f"{wanted}, got {value:g}")
    return int(value)


def parse_caption_lines(text: str | None) -> list[str]:
    """Pasted captions, one a line: cleaned, blank lines dropped, duplicates removed (in order)."""
    if text is None:
        return []
    if not isinstance(text, str):
        raise InvalidInputError("Captions must be text, one caption a line")
    if len(text) > MAX_PASTE_CHARS:
        raise InvalidInputError(
            f"The pasted captions are {len(text):,} characters long; the limit is {MAX_PASTE_CHARS:,}")
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > MAX_USER_CAPTIONS:
        raise InvalidInputError(
            f"You pasted {len(lines):,} captions; the limit is {MAX_USER_CAPTIONS:,} a request "
            "(the built-in pool can be included on top of them)")
    cleaned = []
    for line in lines:
        try:
            cleaned.append(validate_text(line))
        except InvalidInputError:
            continue  # only unprintable characters: nothing to rank
    return list(dict.fromkeys(cleaned))


def check_query_text(text) -> tuple[str, list[str]]:
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError("Type a caption to search for")
    notes = []
    try:
        cleaned = validate_text(text)
    except InvalidInputError:
        raise InvalidInputError("The caption has no printable characters") from None
    if len(text.strip()) > MAX_TEXT_CHARS:
        notes.append(f"The caption was {len(text):,} characters long; only its start was used "
                     "(the model reads at most a few dozen words)")
    return cleaned, notes


def open_photo(source):
    """A PIL RGB image from an upload (path or PIL), or InvalidInputError saying what is wrong."""
    if source is None or (isinstance(source, str) and not source.strip()):
        raise InvalidInputError("Upload a photo (or pick an example) first")
    if isinstance(source, dict):  # a FileData payload
        source = source.get("path")
    if isinstance(source, Image.Image):
        return load_image(source)
    _check_pixel_count(source)
    try:
        return load_image(source)
    except InvalidInputError as exc:  # name the file, not the server's temporary folder
        raise InvalidInputError(str(exc).replace(str(source), Path(str(source)).name)) from None


def _check_pixel_count(path) -> None:
    """Refuse images over the pixel limit from their header, before decoding anything.

    PIL only warns (and then decodes) between one and two times ``Image.MAX_IMAGE_PIXELS``."""
    too_large = f"The image is too large to process safely (limit {MAX_IMAGE_PIXELS:,} pixels)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        raise InvalidInputError(too_large) from None
    except Exception:
        return  # unreadable: load_image says why
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidInputError(f"{too_large[:-1]}; this one is {width:,} x {height:,})")


def _short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------------------------
# The engine: model, built-in gallery and caption pool, ranking and explanation (no UI here)
# ----------------------------------------------------------------------------------------------
@dataclass
class SessionGallery:
    """The photos one browser session added: encoded once, searched with the built-in ones."""

    index: GalleryIndex
    paths: dict[str, str] = field(default_factory=dict)
    folder: str = ""

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class Explanation:
    summary: str
    word_maps: list
    region_figure: object
    region_rows: list
    score: float
    contributions: dict


class DemoEngine:
    """Everything the app computes, usable without a web server (tests, benchmarks)."""

    def __init__(self, model: TSHSRModel, model_name: str = "", examples_dir: Path | None = EXAMPLES_DIR,
                 extra_pool: list[str] | None = None, progress: bool = True):
        self.model = model.eval()
        self.model_name = model_name
        self.keys = list(model.contribution_keys)
        self._lock = threading.Lock()
        self._text_cache: OrderedDict[str, TextEncoding] = OrderedDict()
        self.upload_root = Path(tempfile.mkdtemp(prefix="tshsr-app-"))
        photos, pool = self._read_examples(examples_dir)

        started = time.perf_counter()
        self.gallery = GalleryIndex(model, kind="images")
        self.photo_paths: dict[str, str] = {}
        if photos:
            _print(f"encoding {len(photos)} example photos ...")
            self.gallery.add([str(p) for p in photos], ids=[p.name for p in photos], progress=progress)
            self.photo_paths = {p.name: str(p) for p in photos}
        pool = pool + [validate_text(t) for t in (extra_pool or []) if isinstance(t, str) and t.strip()]
        self.pool = list(dict.fromkeys(pool))
        self._pool_set = set(self.pool)
        self.pool_encoding = None
        if self.pool:
            _print(f"encoding the caption pool ({len(self.pool)} captions) ...")
            self.pool_encoding = model.encode_texts(self.pool, progress=progress)
        self.startup_encode_s = time.perf_counter() - started
        self.example_photos = [str(p) for p in photos]

    # -- start-up ---------------------------------------------------------------------------------
    @staticmethod
    def _read_examples(examples_dir: Path | None) -> tuple[list[Path], list[str]]:
        """Example photos that open, and the caption pool (pool + every photo's captions)."""
        if examples_dir is None or not Path(examples_dir).is_dir():
            _print(f"no example folder at {examples_dir}: starting with an empty gallery and pool")
            return [], []
        examples_dir = Path(examples_dir)
        photos = []
        folder = examples_dir / "images"
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                load_image(path)
            except InvalidInputError as exc:
                _print(f"skipping example {path.name}: {exc}")
                continue
            photos.append(path)
        captions: list[str] = []
        captions_file = examples_dir / "captions.json"
        if captions_file.is_file():
            try:
                data = json.loads(captions_file.read_text())
                captions = [c for caps in data.get("images", {}).values() for c in caps] + list(data.get("pool", []))
            except (ValueError, AttributeError, TypeError) as exc:
                _print(f"ignoring {captions_file}: {exc}")
        pool = []
        for caption in captions:
            if isinstance(caption, str) and caption.strip():
                pool.append(validate_text(caption))
        return photos, list(dict.fromkeys(pool))

    # -- text encodings of pasted captions, cached ------------------------------------------------
    def _encode_cached(self, texts: list[str]) -> TextEncoding:
        with self._lock:
            missing = [t for t in texts if t not in self._text_cache]
        fresh: dict[str, TextEncoding] = {}
        if missing:
            encoded = self.model.encode_texts(missing)
            for i, text in enumerate(missing):
                fresh[text] = _trim_row(encoded, i)
        with self._lock:
            rows = []
            for text in texts:
                row = fresh.get(text)
                if row is None:
                    row = self._text_cache[text]
                    self._text_cache.move_to_end(text)
                rows.append(row)
            for text, row in fresh.items():
                self._text_cache[text] = row
            while len(self._text_cache) > TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return TextEncoding.cat(rows)

    # -- image -> captions ------------------------------------------------------------------------
    def rank_captions(self, image, captions: str | None = "", top_k=5, use_pool: bool = True) -> dict:
        """Rank the caption pool (if ``use_pool``) plus pasted captions for one photo."""
        k = check_top_k(top_k)
        photo = open_photo(image)
        lines = parse_caption_lines(captions)
        texts, sources, parts = [], [], []
        if use_pool and self.pool:
            texts += self.pool
            sources += ["built-in"] * len(self.pool)
            parts.append(self.pool_encoding)
        extra = [t for t in lines if not (use_pool and t in self._pool_set)]
        if extra:
            texts += extra
            sources += ["yours"] * len(extra)
            parts.append(self._encode_cached(extra))
        if not texts:
            raise InvalidInputError("No captions to rank: paste some (one a line) or include the built-in pool")
        notes = []
        if k > len(texts):
            notes.append(f"Only {len(texts)} caption(s) to rank, so only {len(texts)} result(s)")
        text_encoding = parts[0] if len(parts) == 1 else TextEncoding.cat(parts)
        image_encoding = self.model.encode_images([photo])
        # Small blocks stay in cache: for one image against ~1,000 captions, 128-pair blocks
        # score about 1.8x faster than one big block on a 2-core CPU.
        out = self.model.score_encoded(image_encoding, text_encoding, block_pairs=128)
        scores = out.scores[0].double().cpu()
        order = torch.sort(-scores, stable=True).indices[:k].tolist()
        contributions = {key: out.contributions[key][0].double().cpu() for key in self.keys}
        results = [
            {"rank": rank, "caption": texts[j], "source": sources[j], "score": float(scores[j]),
             "contributions": {key: float(contributions[key][j]) for key in self.keys}}
            for rank, j in enumerate(order, start=1)
        ]
        return {
            "query": {"kind": "image", "width": photo.width, "height": photo.height},
            "top_k": k, "candidates": len(texts), "keys": self.keys, "weights": dict(out.weights),
            "results": results, "notes": notes, "model": self.model_name,
        }

    # -- caption -> images ------------------------------------------------------------------------
    def new_session_gallery(self) -> SessionGallery:
        folder = tempfile.mkdtemp(prefix="session-", dir=self.upload_root)
        return SessionGallery(index=GalleryIndex(self.model, kind="images"), folder=folder)

    def add_photos(self, session: SessionGallery | None, files) -> tuple[SessionGallery, list[str], list[str]]:
        """Validate, encode once and keep uploaded photos; returns (session, added names, problems)."""
        session = session if session is not None else self.new_session_gallery()
        files = [f for f in (files or []) if f]
        if not files:
            raise InvalidInputError("Choose one or more photos to add")
        added, problems = [], []
        for item in files:
            path = item.get("path") if isinstance(item, dict) else getattr(item, "name", item)
            name = Path(str(path)).name
            if len(session) >= MAX_SESSION_UPLOADS:
                problems.append(f"{name}: this session already has {MAX_SESSION_UPLOADS} photos (the limit)")
                continue
            try:
                photo = open_photo(str(path))
            except InvalidInputError as exc:
                problems.append(f"{name}: {exc}")
                continue
            digest = hashlib.sha256(photo.tobytes() + repr(photo.size).encode()).hexdigest()[:12]
            photo_id = f"upload-{digest}"
            if photo_id in session.index:
                problems.append(f"{name}: already in your gallery")
                continue
            session.index.add([photo], ids=[photo_id])
            shown = photo.copy()
            shown.thumbnail((768, 768))
            target = Path(session.folder) / f"{photo_id}.jpg"
            shown.save(target, quality=90)
            session.paths[photo_id] = str(target)
            added.append(name)
        return session, added, problems

    def image_path(self, photo_id: str, session: SessionGallery | None = None) -> str:
        if photo_id in self.photo_paths:
            return self.photo_paths[photo_id]
        return session.paths[photo_id]

    def rank_images(self, text, top_k=5, session: SessionGallery | None = None) -> dict:
        """Rank the built-in gallery (plus this session's uploads) for a caption."""
        k = check_top_k(top_k)
        query, notes = check_query_text(text)
        total = len(self.gallery) + (len(session) if session is not None else 0)
        if total == 0:
            raise InvalidInputError("The gallery is empty: add some photos first")
        hits = [(h, "built-in") for h in self.gallery.search(query, top_k=k)] if len(self.gallery) else []
        if session is not None and len(session):
            hits += [(h, "upload") for h in session.index.search(query, top_k=k)]
        hits.sort(key=lambda pair: -pair[0].score)  # stable: built-in first on equal scores
        if k > total:
            notes.append(f"Only {total} photo(s) in the gallery, so only {total} result(s)")
        results = [
            {"rank": rank, "image": hit.id, "source": source, "score": float(hit.score),
             "contributions": {key: float(hit.contributions[key]) for key in self.keys}}
            for rank, (hit, source) in enumerate(hits[:k], start=1)
        ]
        return {"query": {"kind": "text", "text": query}, "top_k": k, "candidates": total, "keys": self.keys,
                "results": results, "notes": notes, "model": self.model_name}

    # -- explanation of one match -----------------------------------------------------------------
    def explain(self, image, caption: str) -> Explanation:
        photo = open_photo(image)
        caption, _ = check_query_text(caption)
        out = self.model.score([photo], [caption], return_attention=True)
        score = float(out.scores[0, 0])
        contributions = {key: float(out.contributions[key][0, 0]) for key in self.keys}
        streams: dict[str, float] = {}
        for key, value in contributions.items():
            stream = key.split("/")[0]
            streams[stream] = streams.get(stream, 0.0) + value
        lines = [f"**Score {score:.4f}** for “{_short(caption, 120)}” = "
                 + " + ".join(f"{value:.4f} ({key_label(key)})" for key, value in contributions.items())]
        lines.append("By stream: " + ", ".join(f"{key_label(s)} {v:.4f}" for s, v in streams.items()))
        word_maps, figure, rows = [], None, []
        if out.attentions:
            attention = pair_attention(out)
            word_maps = word_heatmaps(photo, attention, max_words=EXPLAIN_MAX_WORDS)
            figure = region_words_figure(photo, attention, title=None)  # the plot's label says it
            for row in region_top_words(attention, k=3)[:12]:
                cell = "" if row["cell"] is None else f"row {row['cell'][0] + 1}, col {row['cell'][1] + 1}"
                weight = None if row["weight"] is None else round(row["weight"], 4)
                rows.append([cell, weight, ", ".join(f"{w} ({p:.2f})" for w, p in row["words"])])
            if len(attention.tokens) > EXPLAIN_MAX_WORDS:
                lines.append(f"(heatmaps for the first {EXPLAIN_MAX_WORDS} of {len(attention.tokens)} words)")
        else:
            lines.append("This model returns no attention maps (a dual encoder), so only the breakdown is shown.")
        return Explanation(summary="\n\n".join(lines), word_maps=word_maps, region_figure=figure,
                           region_rows=rows, score=score, contributions=contributions)


def _trim_row(encoding: TextEncoding, i: int) -> TextEncoding:
    """Row ``i`` of a batch encoding, cut to its own words (rows are cached one by one)."""
    n = max(int(encoding.mask[i].sum()), 1)
    membership = encoding.membership
    return TextEncoding(
        units=encoding.units[i:i + 1, :n].clone(), mask=encoding.mask[i:i + 1, :n].clone(),
        pooled=encoding.pooled[i:i + 1].clone(), embedding=encoding.embedding[i:i + 1].clone(),
        membership=None if membership is None else membership[i:i + 1, :, :n].clone(),
    )


# ----------------------------------------------------------------------------------------------
# Handlers: what the UI and the API call. Bad input becomes gr.Error (a message, not a crash).
# ----------------------------------------------------------------------------------------------
def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except InvalidInputError as exc:
            raise gr.Error(str(exc), title="Cannot use this input") from exc
        except Exception as exc:  # a bug must not take the app down; log it, tell the user
            log.error("request failed:\n%s", traceback.format_exc())
            raise gr.Error(f"Something went wrong ({type(exc).__name__}); the app is still running, "
                           "try another input", title="Internal error") from exc
    return wrapper


class Handlers:
    """The functions behind every UI event and API endpoint, bound to one engine."""

    def __init__(self, engine: DemoEngine):
        self.engine = engine

    # ---- API (JSON in, JSON out) ----
    def api_rank_captions(self, image_file, captions, top_k):
        result = user_errors(self.engine.rank_captions)(image_file, captions or "", top_k, True)
        return result

    def api_rank_images(self, text, top_k):
        return user_errors(self.engine.rank_images)(text, top_k, None)

    # ---- UI ----
    def _explain_outputs(self, image, caption):
        ex = self.engine.explain(image, caption)
        return ex.summary, ex.word_maps, ex.region_figure, ex.region_rows

    def ui_rank_captions(self, image, captions, use_pool, top_k):
        @user_errors
        def run():
            result = self.engine.rank_captions(image, captions, top_k, bool(use_pool))
            for note in result["notes"]:
                gr.Warning(note)
            rows = result["results"]
            table = [[r["rank"], round(r["score"], 4), r["caption"], r["source"]] for r in rows]
            figure = contribution_figure(
                [r["contributions"] for r in rows], [f"#{r['rank']} {r['caption']}" for r in rows],
                scores=[r["score"] for r in rows], keys=result["keys"],
                title=f"Top {len(rows)} of {result['candidates']} captions: score = sum of the parts")
            choices = [f"#{r['rank']}  {_short(r['caption'], 80)}" for r in rows]
            state = {"image": image, "captions": [r["caption"] for r in rows]}
            explanation = self._explain_outputs(image, rows[0]["caption"])
            return (table, figure, gr.update(choices=choices, value=choices[0], interactive=True), state,
                    *explanation)
        return run()

    def ui_explain_caption(self, state, choice):
        @user_errors
        def run():
            if not state or not choice:
                raise InvalidInputError("Rank some captions first")
            index = int(str(choice).split()[0].lstrip("#")) - 1
            return self._explain_outputs(state["image"], state["captions"][index])
        return run()

    def ui_add_photos(self, files, session):
        @user_errors
        def run():
            new_session, added, problems = self.engine.add_photos(session, files)
            for problem in problems:
                gr.Warning(problem)
            if not added and problems:
                raise InvalidInputError("No photo was added: " + "; ".join(problems[:3]))
            status = (f"Added {len(added)} photo(s); the gallery now has {len(self.engine.gallery)} built-in + "
                      f"{len(new_session)} of yours (limit {MAX_SESSION_UPLOADS}).")
            return new_session, status, None
        return run()

    def ui_rank_images(self, text, top_k, session):
        @user_errors
        def run():
            result = self.engine.rank_images(text, top_k, session)
            for note in result["notes"]:
                gr.Warning(note)
            rows = result["results"]
            paths = [self.engine.image_path(r["image"], session) for r in rows]
            gallery = [(p, f"#{r['rank']}  {r['score']:.3f}  {r['image']}") for p, r in zip(paths, rows)]
            figure = contribution_figure(
                [r["contributions"] for r in rows], [f"#{r['rank']} {r['image']}" for r in rows],
                scores=[r["score"] for r in rows], keys=result["keys"],
                title=f"Top {len(rows)} of {result['candidates']} photos: score = sum of the parts")
            query = result["query"]["text"]
            state = {"text": query, "images": paths, "names": [r["image"] for r in rows]}
            explanation = self._explain_outputs(paths[0], query)
            header = (f"Explaining **#1 {rows[0]['image']}** of {result['candidates']} photos ranked "
                      "(click another photo to explain it)")
            return (gallery, figure, state, header, *explanation)
        return run()

    def ui_explain_image(self, state, evt: gr.SelectData):
        @user_errors
        def run():
            if not state:
                raise InvalidInputError("Search for a caption first")
            index = evt.index if isinstance(evt.index, int) else evt.index[0]
            header = f"Explaining **#{index + 1} {state['names'][index]}**"
            return (header, *self._explain_outputs(state["images"][index], state["text"]))
        return run()


def friendly_image_errors(component: gr.Image) -> gr.Image:
    """Make an unreadable upload to ``component`` a clear message instead of a decoder traceback.

    gr.Image opens the upload with PIL before our handler runs. This wraps that one instance's
    preprocess (a subclass would make Gradio write an ``app.pyi`` stub next to this file)."""
    original = component.preprocess

    @functools.wraps(original)
    def preprocess(payload):
        try:
            return original(payload)
        except gr.Error:
            raise
        except Exception as exc:  # PIL could not even read the header
            if "DecompressionBomb" in type(exc).__name__:
                message = f"The image is too large to process safely (limit {MAX_IMAGE_PIXELS:,} pixels)"
            else:
                message = f"Not a readable image ({type(exc).__name__})"
            raise gr.Error(message, title="Cannot use this input") from exc

    component.preprocess = preprocess
    return component


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------
INTRO = """# TSHSR image–text matching
Two-stream Hierarchical Similarity Reasoning: every score is the sum of six parts, two **streams**
(image→text: each image region looks for words; text→image: each word looks for regions) times three
**levels** (local words/regions, context phrases/neighbourhoods, global whole image/sentence).
The bars show these parts exactly as the model returned them; the heatmaps show the attention behind one match."""


def build_demo(engine: DemoEngine) -> gr.Blocks:
    handlers = Handlers(engine)
    limits = (f"Limits: top K up to {MAX_TOP_K}; up to {MAX_USER_CAPTIONS:,} pasted captions; uploads up to "
              f"{MAX_UPLOAD_SIZE} and {MAX_IMAGE_PIXELS:,} pixels; {MAX_SESSION_UPLOADS} added photos a session.")
    with gr.Blocks(title="TSHSR image-text matching") as demo:
        gr.Markdown(INTRO)
        gr.Markdown(f"Model: `{engine.model_name}` · gallery: {len(engine.gallery)} photos · caption pool: "
                    f"{len(engine.pool)} captions. {limits}")

        with gr.Tab("Image → captions"):
            with gr.Row():
                with gr.Column(scale=1):
                    photo = friendly_image_errors(gr.Image(
                        type="filepath", label="Photo", sources=["upload", "clipboard"], height=300,
                        elem_id="photo-input"))
                    if engine.example_photos:
                        gr.Examples(engine.example_photos, inputs=photo, label="Example photos",
                                    examples_per_page=12)
                    extra = gr.Textbox(label="Your captions (optional, one a line)", lines=4,
                                       placeholder="a dog runs on the beach\ntwo people ride bicycles",
                                       elem_id="extra-captions")
                    use_pool = gr.Checkbox(value=bool(engine.pool),
                                           label=f"Also rank the built-in pool ({len(engine.pool)} captions)")
                    top_k_c = gr.Slider(1, MAX_TOP_K, value=5, step=1, label="Top K")
                    rank_captions_btn = gr.Button("Rank captions", variant="primary", elem_id="rank-captions")
                with gr.Column(scale=2):
                    captions_table = gr.Dataframe(headers=["rank", "score", "caption", "source"],
                                                  label="Ranked captions", interactive=False, wrap=True,
                                                  column_widths=["9%", "11%", "64%", "16%"],
                                                  elem_id="ranked-captions")
                    captions_plot = gr.Plot(label="Score breakdown by stream and level", elem_id="captions-plot")
            gr.Markdown("### Why this caption? The attention behind one match")
            match_choice = gr.Dropdown(label="Match to explain", choices=[], interactive=True)
            captions_summary = gr.Markdown()
            with gr.Row():
                captions_words = gr.Gallery(label="Where each word looked (text→image attention)", columns=4,
                                            height=360, elem_id="captions-word-maps")
                captions_regions = gr.Plot(label="Most-attended word of each region (image→text)")
            captions_region_table = gr.Dataframe(headers=["region", "weight", "top words (attention)"],
                                                 label="Regions that count most (image→text local weights)",
                                                 interactive=False)
            captions_state = gr.State(None)

        with gr.Tab("Caption → images"):
            with gr.Row():
                with gr.Column(scale=1):
                    query = gr.Textbox(label="Caption", placeholder="a dog running through the snow",
                                       elem_id="query-caption")
                    top_k_i = gr.Slider(1, MAX_TOP_K, value=8, step=1, label="Top K", elem_id="top-k-images")
                    rank_images_btn = gr.Button("Find photos", variant="primary", elem_id="rank-images")
                    uploads = gr.File(label=f"Add your photos to the gallery (up to {MAX_SESSION_UPLOADS}, only "
                                      "you see them)", file_count="multiple", file_types=["image"], elem_id="add-photos-files")
                    add_btn = gr.Button("Add photos", elem_id="add-photos")
                    upload_status = gr.Markdown(elem_id="upload-status")
                with gr.Column(scale=2):
                    images_gallery = gr.Gallery(label="Ranked photos", columns=4, height=420,
                                                elem_id="ranked-images")
                    images_plot = gr.Plot(label="Score breakdown by stream and level", elem_id="images-plot")
            images_header = gr.Markdown("### Why this photo?", elem_id="explain-header")
            images_summary = gr.Markdown()
            with gr.Row():
                images_words = gr.Gallery(label="Where each word looked (text→image attention)", columns=4,
                                          height=360)
                images_regions = gr.Plot(label="Most-attended word of each region (image→text)")
            images_region_table = gr.Dataframe(headers=["region", "weight", "top words (attention)"],
                                               label="Regions that count most (image→text local weights)",
                                               interactive=False)
            images_state = gr.State(None)
            session_gallery = gr.State(None, time_to_live=SESSION_TTL_S,
                                       delete_callback=lambda s: s is not None and shutil.rmtree(s.folder, True))

        caption_explain = [captions_summary, captions_words, captions_regions, captions_region_table]
        image_explain = [images_summary, images_words, images_regions, images_region_table]
        rank_captions_btn.click(handlers.ui_rank_captions, [photo, extra, use_pool, top_k_c],
                                [captions_table, captions_plot, match_choice, captions_state, *caption_explain],
                                api_visibility="private")
        match_choice.input(handlers.ui_explain_caption, [captions_state, match_choice], caption_explain,
                           api_visibility="private")
        gr.on([rank_images_btn.click, query.submit], handlers.ui_rank_images, [query, top_k_i, session_gallery],
              [images_gallery, images_plot, images_state, images_header, *image_explain],
              api_visibility="private")
        images_gallery.select(handlers.ui_explain_image, [images_state], [images_header, *image_explain],
                              api_visibility="private")
        add_btn.click(handlers.ui_add_photos, [uploads, session_gallery], [session_gallery, upload_status, uploads],
                      api_visibility="private")

        # Named API endpoints: hidden components, JSON out (docs/APP.md).
        with gr.Group(visible=False):
            api_image = gr.File(label="image", type="filepath")
            api_captions = gr.Textbox(label="captions", value="")
            api_top_k_c = gr.Number(label="top_k", value=5)
            api_text = gr.Textbox(label="text")
            api_top_k_i = gr.Number(label="top_k", value=5)
            api_out_c = gr.JSON(label="ranked_captions")
            api_out_i = gr.JSON(label="ranked_images")
            api_btn_c = gr.Button()
            api_btn_i = gr.Button()
        api_btn_c.click(handlers.api_rank_captions, [api_image, api_captions, api_top_k_c], api_out_c,
                        api_name="rank_captions",
                        api_description="Rank the built-in caption pool plus newline-separated `captions` for an "
                                        "image file; returns the top_k with score and per-stream/level parts.")
        api_btn_i.click(handlers.api_rank_images, [api_text, api_top_k_i], api_out_i, api_name="rank_images",
                        api_description="Rank the built-in photo gallery for a caption; returns the top_k with "
                                        "score and per-stream/level parts.")
    return demo


# ----------------------------------------------------------------------------------------------
# Start-up
# ----------------------------------------------------------------------------------------------
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("TSHSR_MODEL") or str(DEFAULT_MODEL),
                        help="model folder or Hugging Face Hub id (default: $TSHSR_MODEL or %(default)s)")
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
    libc = glibc()
    if os.environ.get("MALLOC_ARENA_MAX") or libc is None:
        return False
    return bool(libc.mallopt(-8, arenas))  # -8 = M_ARENA_MAX


def main(argv=None) -> int:
    args = parse_args(argv)
    limit_malloc_arenas(max(2, args.concurrency))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads or default_threads(args.concurrency))
    started = time.perf_counter()
    _print(f"loading model {args.model} ({torch.get_num_threads()} torch threads) ...")
    try:
        model = load_model(args.model)
    except (FileNotFoundError, CheckpointError, OSError, ValueError) as exc:
        print(f"error: could not load the model.\n  {exc}", file=sys.stderr)
        return 2
    engine = DemoEngine(model, model_name=args.model, examples_dir=Path(args.examples))
    demo = build_demo(engine)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
    _print(f"ready in {time.perf_counter() - started:.1f} s ({len(engine.gallery)} photos, "
           f"{len(engine.pool)} captions encoded); starting the web server")
    allowed = [str(Path(args.examples).resolve()), str(engine.upload_root)]
    try:
        demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_UPLOAD_SIZE,
                    allowed_paths=allowed, show_error=True)  # Gradio's own refusals (paths not uploaded,
        # malformed FileData) reach the client with their reason; the app's handlers raise readable errors
    finally:
        shutil.rmtree(engine.upload_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
