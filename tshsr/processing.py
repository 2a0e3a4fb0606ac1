"""Preprocessing: PIL images / file paths and strings -> model inputs.

One :class:`TSHSRProcessor` per model, rebuilt from its config (image size, mean, std from the
backbone's own data config; the text model's tokenizer or the BiGRU vocabulary saved with the
model), so what was used in training is what is used at inference.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import TSHSRConfig
from .encoders import resolve_text_model

# Refuse absurd images before decoding them (decompression bombs): 8x the pixels of a 8K photo.
# Checked by load_image on each image's header, whatever Pillow's global settings are: importing
# tshsr leaves Image.MAX_IMAGE_PIXELS and ImageFile.LOAD_TRUNCATED_IMAGES as the application set them.
MAX_IMAGE_PIXELS = 89_478_485


class InvalidInputError(ValueError):
    """An image or text the model cannot use; the message says why, for a person to read."""


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB.

    Transparent pixels are composited on white, as a viewer shows them; high-bit-depth images
    are rescaled to 0-255 instead of being clipped (a 16-bit PNG would otherwise turn white).
    """
    if getattr(image, "is_animated", False):
        image.seek(0)  # first frame of an animated GIF/PNG/WebP
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        if hi > lo:
            scaled = (array - lo) / (hi - lo) * 255.0
        else:  # a flat image has no range to stretch: keep its level (a white 16-bit image is white)
            full = 65535.0 if mode.startswith("I;16") else 255.0
            scaled = np.full_like(array, min(max(lo, 0.0), full) / full * 255.0)
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source) -> Image.Image:
    """A PIL image from a PIL image, a path or raw bytes; a clear error for anything unusable."""
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            if isinstance(source, (bytes, bytearray)):
                import io

                image = Image.open(io.BytesIO(source))
            else:
                path = Path(source)
                if not path.is_file():
                    raise InvalidInputError(f"Image file not found: {source}")
                if path.stat().st_size == 0:
                    raise InvalidInputError(f"Image file is empty (0 bytes): {path.name}")
                image = Image.open(path)
            # Pillow only warns between 1x and 2x its limit; refuse from the header, before decoding.
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels")
            image.load()
        except InvalidInputError:
            raise
        except Image.DecompressionBombError as exc:
            raise InvalidInputError(
                f"Image is too large to process safely (limit {MAX_IMAGE_PIXELS:,} pixels)"
            ) from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InvalidInputError(f"Not a readable image ({exc.__class__.__name__}: {exc})") from exc
    if image.width < 1 or image.height < 1:
        raise InvalidInputError("Image has no pixels")
    return to_rgb(image)


# ----------------------------------------------------------------------------------------------
# BiGRU vocabulary (the SGRAF setting)
# ----------------------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"


def word_tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Vocabulary:
    """Word-level vocabulary for the BiGRU text encoder; saved as ``vocab.json`` with the model."""

    def __init__(self, words: Sequence[str]):
        specials = [PAD, UNK, START, END]
        self.itos = specials + [w for w in words if w not in specials]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 4) -> "Vocabulary":
        counts = Counter(w for c in captions for w in word_tokenize(c))
        return cls(sorted(w for w, n in counts.items() if n >= min_count))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        unk = self.stoi[UNK]
        return [self.stoi[START]] + [self.stoi.get(w, unk) for w in word_tokenize(text)] + [self.stoi[END]]

    def to_json(self) -> str:
        return json.dumps(self.itos)

    def save(self, directory: str | Path) -> None:
        (Path(directory) / "vocab.json").write_text(self.to_json())

    @classmethod
    def load(cls, directory: str | Path) -> "Vocabulary":
        path = Path(directory) / "vocab.json"
        if not path.is_file():
            raise FileNotFoundError(f"The BiGRU text encoder needs its vocabulary: {path} is missing")
        itos = json.loads(path.read_text())
        return cls(itos[4:])


# ----------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------
class TSHSRProcessor:
    """Turns images and captions into the tensors a :class:`~tshsr.TSHSRModel` takes.

    Images are resized to a square of the backbone's input size without cropping (a caption may
    talk about anything in the photo, so nothing is cut off), then normalised with the
    backbone's mean and std.
    """

    def __init__(self, config: TSHSRConfig, vocabulary: Vocabulary | None = None):
        self.config = config
        self.vocabulary = vocabulary
        self._tokenizer = None
        if config.text_encoder == "bigru" and vocabulary is None:
            raise ValueError("A BiGRU text encoder needs a Vocabulary")

    # -- images --------------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence) -> torch.Tensor:
        cfg = self.config
        if cfg.image_encoder != "timm":
            raise ValueError("This model takes precomputed region features, not images")
        size = cfg.image_size
        mean = torch.tensor(cfg.image_mean).view(3, 1, 1)
        std = torch.tensor(cfg.image_std).view(3, 1, 1)
        batch = []
        for index, source in enumerate(images):
            try:
                image = load_image(source)
            except InvalidInputError as exc:
                raise InvalidInputError(f"Image #{index}: {exc}") from exc
            image = image.resize((size, size), Image.BICUBIC)
            array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
            batch.append((array - mean) / std)
        return torch.stack(batch)

    # -- texts ---------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None and self.config.text_encoder == "transformers":
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(self.config.text_model))
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and word_mask (real tokens, not [CLS]/[SEP]/padding)."""
        texts = [validate_text(t, i) for i, t in enumerate(texts)]
        max_len = self.config.max_text_length
        if self.config.text_encoder == "bigru":
            rows = [self.vocabulary.encode(t)[:max_len] for t in texts]
            length = max(len(r) for r in rows)
            ids = torch.zeros(len(rows), length, dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row)
            attention = ids != 0
            return {"input_ids": ids, "attention_mask": attention.long(), "word_mask": attention}
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_len,
            return_tensors="pt", return_special_tokens_mask=True,
        )
        word_mask = enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()
        # A caption of special tokens only (cannot happen after validation) keeps [CLS] as a unit.
        empty = ~word_mask.any(1)
        word_mask[empty, 0] = True
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "word_mask": word_mask}

    def tokens(self, text: str) -> list[str]:
        """The word units of a caption, in the order of the model's local text nodes."""
        text = validate_text(text, 0)
        if self.config.text_encoder == "bigru":
            ids = self.vocabulary.encode(text)[: self.config.max_text_length]
            return [self.vocabulary.itos[i] for i in ids]
        enc = self.tokenizer(text, truncation=True, max_length=self.config.max_text_length,
                             return_special_tokens_mask=True)
        pieces = self.tokenizer.convert_ids_to_tokens(enc["input_ids"])
        words = [p for p, special in zip(pieces, enc["special_tokens_mask"]) if not special]
        return words or pieces[:1]


MAX_TEXT_CHARS = 2000


def validate_text(text, index: int = 0) -> str:
    if not isinstance(text, str):
        raise InvalidInputError(f"Text #{index} is a {type(text).__name__}, not a string")
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    if not cleaned:
        raise InvalidInputError(f"Text #{index} is empty")
    # Tokenizers truncate anyway; cutting first keeps a 1 MB paste from costing seconds.
    return cleaned[:MAX_TEXT_CHARS]
