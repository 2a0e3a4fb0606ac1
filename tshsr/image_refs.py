"""Image references: what a split keeps instead of decoded images, and how they are decoded.

An :class:`~tshsr.data.ImageCaptionSplit` holds one cheap reference per image (a file path, a
row of an Arrow-backed dataset, a URL). This module owns those reference types, turns one into
an RGB image on demand (fetching a URL when that is all there is), and offers
:class:`LazyImages`, the read-only sequence over a split's images that decodes per item.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["LazyImages", "URL_TIMEOUT_S"]

# Seconds to wait for one COCO image fetched from its URL (only when no image_root is given).
URL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class _ArrowRow:
    """One row of an Arrow-backed ``datasets.Dataset`` whose image column is not decoded."""

    dataset: Any  # datasets.Dataset with the image column cast to Image(decode=False)
    row: int
    column: str


@dataclass(frozen=True)
class _Url:
    url: str


def _open_rgb(source: Any) -> Image.Image:
    """Decode a path / bytes / PIL image into a fully loaded RGB image (the model's loader: it
    composites transparency on white, rescales 16-bit images and refuses decompression bombs)."""
    from .processing import load_image

    if not isinstance(source, (Image.Image, bytes, bytearray)) and not Path(source).is_file():
        raise FileNotFoundError(f"Image file not found: {source}")
    return load_image(source)


def _fetch_url(url: str) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:  # noqa: S310 (http(s) only)
            return response.read()
    except OSError as exc:
        raise OSError(
            f"Could not download image {url}: {exc}. Pass image_root= (the folder holding the COCO "
            "'train2014'/'val2014' folders) to read images from disk instead."
        ) from exc


def _resolve_ref(ref: Any) -> Any:
    """What to hand to the model for one image: a path stays a path (the model opens it)."""
    if isinstance(ref, (str, os.PathLike)):
        return str(ref)
    return _decode_ref(ref)


def _decode_ref(ref: Any) -> Image.Image:
    if ref is None:
        raise ValueError("This split has no images (precomputed region features only)")
    if isinstance(ref, (str, os.PathLike, Image.Image, bytes, bytearray)):
        return _open_rgb(ref)
    if isinstance(ref, _ArrowRow):
        value = ref.dataset[ref.row][ref.column]
        if isinstance(value, Image.Image):
            return _open_rgb(value)
        if isinstance(value, dict):
            if value.get("bytes"):
                return _open_rgb(value["bytes"])
            if value.get("path"):
                return _open_rgb(value["path"])
        raise ValueError(f"Row {ref.row} of column {ref.column!r} holds no image (got {type(value).__name__})")
    if isinstance(ref, _Url):
        # Looked up on tshsr.data, the package's public data module, at call time: that is where
        # the download is replaced (offline tests patch tshsr.data._fetch_url), so a replacement
        # there must reach every URL reference wherever the split was built.
        from . import data

        return _open_rgb(data._fetch_url(ref.url))
    raise TypeError(f"Unknown image reference {type(ref).__name__}")


class LazyImages(Sequence):
    """A read-only sequence of a split's images, decoded only when an item is read.

    Items are file paths where the image is a file (the model opens those itself) and RGB PIL
    images otherwise. Slicing returns a plain list, so batching code can take
    ``images[start:stop]`` without decoding the whole split.
    """

    def __init__(self, refs: Sequence[Any]):
        self._refs = refs

    def __len__(self) -> int:
        return len(self._refs)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [_resolve_ref(ref) for ref in self._refs[index]]
        return _resolve_ref(self._refs[index])

    def __iter__(self) -> Iterator[Any]:
        for ref in self._refs:
            yield _resolve_ref(ref)
