"""The demo's engine: the model, the built-in gallery and caption pool, ranking and explanation.

No web code here (the page is :mod:`tshsr_app.page`); tests and benchmarks use it as is. Both
sides of the demo are :class:`~tshsr.retrieval.GalleryIndex` objects encoded once at start-up:
the example photos (searched with a caption) and the caption pool (searched with a photo).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tshsr import InvalidInputError, TSHSRModel
from tshsr.explain import key_label, pair_attention, region_top_words, region_words_figure, word_heatmaps
from tshsr.processing import MAX_TEXT_CHARS, load_image, validate_text
from tshsr.retrieval import GalleryIndex

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = ROOT / "examples"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}

# Limits, stated in the UI and docs/APP.md. Requests beyond them are refused with a message
# (the upload size limit is a server setting: app.py).
MAX_TOP_K = 50
MAX_USER_CAPTIONS = 1000          # pasted lines per request (encoding 1,000 lines takes seconds)
MAX_PASTE_CHARS = 500_000         # total pasted text per request
MAX_SESSION_UPLOADS = 32          # photos a browser session may add to its gallery
EXPLAIN_MAX_WORDS = 16            # word heatmaps drawn for one match


def _print(message: str) -> None:
    print(f"[tshsr-app] {message}", flush=True)


def _short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
    if not math.isfinite(value) or value != int(value) or not 1 <= value <= MAX_TOP_K:
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
    try:
        cleaned = validate_text(text)
    except InvalidInputError:
        raise InvalidInputError("The caption has no printable characters") from None
    notes = []
    if len(text.strip()) > MAX_TEXT_CHARS:
        notes.append(f"The caption was {len(text):,} characters long; only its start was used "
                     "(the model reads at most a few dozen words)")
    return cleaned, notes


def open_photo(source) -> Image.Image:
    """A PIL RGB image from an upload (path, FileData dict or PIL), or InvalidInputError saying what
    is wrong. The library's ``load_image`` is the one check: it refuses an image over the pixel
    limit from its header, before decoding anything."""
    if source is None or (isinstance(source, str) and not source.strip()):
        raise InvalidInputError("Upload a photo (or pick an example) first")
    if isinstance(source, dict):  # a FileData payload
        source = source.get("path")
    try:
        return load_image(source)
    except InvalidInputError as exc:  # name the file, not the server's temporary folder
        if isinstance(source, Image.Image):
            raise
        raise InvalidInputError(str(exc).replace(str(source), Path(str(source)).name)) from None


def read_examples(examples_dir: Path | None) -> tuple[list[Path], list[str]]:
    """Example photos that open, and the caption pool (every photo's captions, then the pool)."""
    if examples_dir is None or not Path(examples_dir).is_dir():
        _print(f"no example folder at {examples_dir}: starting with an empty gallery and pool")
        return [], []
    folder = Path(examples_dir) / "images"
    photos = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            load_image(path)
            photos.append(path)
        except InvalidInputError as exc:
            _print(f"skipping example {path.name}: {exc}")
    captions: list = []
    captions_file = Path(examples_dir) / "captions.json"
    if captions_file.is_file():
        try:
            data = json.loads(captions_file.read_text())
            captions = [c for caps in data.get("images", {}).values() for c in caps] + list(data.get("pool", []))
        except (ValueError, AttributeError, TypeError) as exc:
            _print(f"ignoring {captions_file}: {exc}")
    pool = [validate_text(c) for c in captions if isinstance(c, str) and c.strip()]
    return photos, list(dict.fromkeys(pool))


# ----------------------------------------------------------------------------------------------
# A browser session's own photos, and the explanation of one match
# ----------------------------------------------------------------------------------------------
@dataclass
class SessionGallery:
    """The photos one browser session added: encoded once, searched with the built-in ones."""

    index: GalleryIndex
    paths: dict[str, str] = field(default_factory=dict)
    folder: str = ""

    def __len__(self) -> int:
        return len(self.index)

    def add(self, files) -> tuple[list[str], list[str]]:
        """Check, encode once and keep uploaded photos (a thumbnail is kept to show them);
        returns (added names, problems). A photo already in the gallery is not added twice."""
        added, problems = [], []
        for item in files:
            path = item.get("path") if isinstance(item, dict) else getattr(item, "name", item)
            name = Path(str(path)).name
            if len(self) >= MAX_SESSION_UPLOADS:
                problems.append(f"{name}: this session already has {MAX_SESSION_UPLOADS} photos (the limit)")
                continue
            try:
                photo = open_photo(str(path))
            except InvalidInputError as exc:
                problems.append(f"{name}: {exc}")
                continue
            photo_id = "upload-" + hashlib.sha256(photo.tobytes() + repr(photo.size).encode()).hexdigest()[:12]
            if photo_id in self.index:
                problems.append(f"{name}: already in your gallery")
                continue
            self.index.add([photo], ids=[photo_id])
            shown = photo.copy()
            shown.thumbnail((768, 768))
            self.paths[photo_id] = str(Path(self.folder) / f"{photo_id}.jpg")
            shown.save(self.paths[photo_id], quality=90)
            added.append(name)
        return added, problems


@dataclass
class Explanation:
    summary: str
    word_maps: list
    region_figure: object
    region_rows: list
    score: float
    contributions: dict


def explain_match(model: TSHSRModel, photo: Image.Image, caption: str) -> Explanation:
    """The score of one pair, its parts, and the attention maps behind it, ready to show."""
    out = model.score([photo], [caption], return_attention=True)
    score = float(out.scores[0, 0])
    contributions = {key: float(out.contributions[key][0, 0]) for key in model.contribution_keys}
    streams: dict[str, float] = {}
    for key, value in contributions.items():
        streams[key.split("/")[0]] = streams.get(key.split("/")[0], 0.0) + value
    lines = [f"**Score {score:.4f}** for “{_short(caption, 120)}” = "
             + " + ".join(f"{value:.4f} ({key_label(key)})" for key, value in contributions.items()),
             "By stream: " + ", ".join(f"{key_label(s)} {v:.4f}" for s, v in streams.items())]
    word_maps, figure, rows = [], None, []
    if out.attentions:
        attention = pair_attention(out)
        word_maps = word_heatmaps(photo, attention, max_words=EXPLAIN_MAX_WORDS)
        figure = region_words_figure(photo, attention, title=None)  # the plot's label says it
        for row in region_top_words(attention, k=3)[:12]:
            cell = "" if row["cell"] is None else f"row {row['cell'][0] + 1}, col {row['cell'][1] + 1}"
            weight = None if row["weight"] is None else round(row["weight"], 4)
            match = None if row["match"] is None else round(row["match"], 3)
            rows.append([cell, match, weight, ", ".join(f"{w} ({p:.2f})" for w, p in row["words"])])
        if len(attention.tokens) > EXPLAIN_MAX_WORDS:
            lines.append(f"(heatmaps for the first {EXPLAIN_MAX_WORDS} of {len(attention.tokens)} words)")
    else:
        lines.append("This model returns no attention maps (a dual encoder), so only the breakdown is shown.")
    return Explanation(summary="\n\n".join(lines), word_maps=word_maps, region_figure=figure,
                       region_rows=rows, score=score, contributions=contributions)


# ----------------------------------------------------------------------------------------------
# The engine: model, built-in gallery and caption pool, ranking (no UI here; tests use it as is)
# ----------------------------------------------------------------------------------------------
class DemoEngine:
    """Everything the app computes, usable without a web server (tests, benchmarks)."""

    def __init__(self, model: TSHSRModel, model_name: str = "", examples_dir: Path | None = EXAMPLES_DIR,
                 extra_pool: list[str] | None = None, progress: bool = True):
        self.model = model.eval()
        self.model_name = model_name
        self.keys = list(model.contribution_keys)
        self.upload_root = Path(tempfile.mkdtemp(prefix="tshsr-app-"))
        atexit.register(shutil.rmtree, self.upload_root, True)
        photos, pool = read_examples(examples_dir)
        pool = list(dict.fromkeys(pool + [validate_text(t) for t in extra_pool or [] if isinstance(t, str) and t.strip()]))
        started = time.perf_counter()
        self.gallery = GalleryIndex(model, kind="images")
        self.captions = GalleryIndex(model, kind="texts")  # the caption pool; a caption is its own id
        _print(f"encoding {len(photos)} example photos and {len(pool)} pool captions ...")
        self.gallery.add([str(p) for p in photos], ids=[p.name for p in photos], progress=progress)
        self.captions.add(pool, ids=pool, progress=progress)
        self.startup_encode_s = time.perf_counter() - started
        self.photo_paths = {p.name: str(p) for p in photos}
        self.example_photos = [str(p) for p in photos]

    @property
    def pool(self) -> list[str]:
        return self.captions.ids

    def _ranked(self, searches, query, k: int, item: str) -> list[dict]:
        """Search each (index, source) for ``query`` and merge: the top ``k`` overall, best first
        (stable: on equal scores the earlier index's hit comes first)."""
        hits = [(hit, source) for index, source in searches if len(index) for hit in index.search(query, top_k=k)]
        hits.sort(key=lambda pair: -pair[0].score)
        return [{"rank": rank, item: hit.id, "source": source, "score": float(hit.score),
                 "contributions": {key: float(hit.contributions[key]) for key in self.keys}}
                for rank, (hit, source) in enumerate(hits[:k], start=1)]

    def rank_captions(self, image, captions: str | None = "", top_k=5, use_pool: bool = True) -> dict:
        """Rank the caption pool (if ``use_pool``) plus pasted captions for one photo."""
        k = check_top_k(top_k)
        photo = open_photo(image)
        in_pool = set(self.pool) if use_pool else set()
        pasted = [line for line in parse_caption_lines(captions) if line not in in_pool]
        searches = [(self.captions, "built-in")] if use_pool else []
        if pasted:  # encoded for this request only, scored exactly as the pool is
            yours = GalleryIndex(self.model, kind="texts")
            yours.add(pasted, ids=pasted)
            searches.append((yours, "yours"))
        total = len(in_pool) + len(pasted)
        if not total:
            raise InvalidInputError("No captions to rank: paste some (one a line) or include the built-in pool")
        notes = [f"Only {total} caption(s) to rank, so only {total} result(s)"] if k > total else []
        return {"query": {"kind": "image", "width": photo.width, "height": photo.height}, "top_k": k,
                "candidates": total, "keys": self.keys, "weights": self.model.mixing_weights(),
                "results": self._ranked(searches, photo, k, "caption"), "notes": notes, "model": self.model_name}

    def rank_images(self, text, top_k=5, session: SessionGallery | None = None) -> dict:
        """Rank the built-in gallery (plus this session's uploads) for a caption."""
        k = check_top_k(top_k)
        query, notes = check_query_text(text)
        searches = [(self.gallery, "built-in")] + ([(session.index, "upload")] if session is not None else [])
        total = sum(len(index) for index, _ in searches)
        if total == 0:
            raise InvalidInputError("The gallery is empty: add some photos first")
        if k > total:
            notes.append(f"Only {total} photo(s) in the gallery, so only {total} result(s)")
        return {"query": {"kind": "text", "text": query}, "top_k": k, "candidates": total, "keys": self.keys,
                "results": self._ranked(searches, query, k, "image"), "notes": notes, "model": self.model_name}

    def new_session_gallery(self) -> SessionGallery:
        folder = tempfile.mkdtemp(prefix="session-", dir=self.upload_root)
        return SessionGallery(index=GalleryIndex(self.model, kind="images"), folder=folder)

    def add_photos(self, session: SessionGallery | None, files) -> tuple[SessionGallery, list[str], list[str]]:
        """Add uploads to a session's gallery (a new one if None); returns (session, added, problems)."""
        files = [f for f in (files or []) if f]
        if not files:
            raise InvalidInputError("Choose one or more photos to add")
        session = session if session is not None else self.new_session_gallery()
        return (session, *session.add(files))

    def image_path(self, photo_id: str, session: SessionGallery | None = None) -> str:
        return self.photo_paths[photo_id] if photo_id in self.photo_paths else session.paths[photo_id]

    def explain(self, image, caption: str) -> Explanation:
        return explain_match(self.model, open_photo(image), check_query_text(caption)[0])


