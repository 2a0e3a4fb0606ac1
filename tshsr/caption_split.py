"""The one form every dataset is read into: :class:`ImageCaptionSplit`.

A split is a flat list of captions plus ``caption_image``, the index of each caption's image.
Nothing assumes five captions per image: the retrieval protocol in :mod:`tshsr.metrics` and
every consumer work from ``caption_image`` alone. This module owns the split itself (checks,
captions per image, fingerprint, subsets) and the two helpers every reader builds one with:
:func:`_from_groups` (captions grouped per image -> a split) and :func:`_as_caption_list` (one
image's captions as a dataset stores them -> a list of strings).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .image_refs import LazyImages, _decode_ref

__all__ = ["ImageCaptionSplit"]


@dataclass
class ImageCaptionSplit:
    """Images, their captions, and which caption belongs to which image.

    ``caption_image[j]`` is the index of caption ``j``'s image; captions of one image need not be
    contiguous and their count may differ between images (including zero: such an image is a
    distractor for text-to-image retrieval and is left out of image-to-text recall).
    """

    name: str
    image_ids: list[str]
    captions: list[str]
    caption_image: np.ndarray
    regions: np.ndarray | None = None
    # One reference per image (path, Arrow row, URL) or None for precomputed-only splits.
    image_refs: list[Any] | None = field(default=None, repr=False)
    # What the data is, independent of where it lies on disk (part of the fingerprint).
    source: str = ""
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)
    _caption_index: list[np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.image_ids = [str(i) for i in self.image_ids]
        self.captions = list(self.captions)
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64).reshape(-1)
        n_images = len(self.image_ids)
        if len(self.caption_image) != len(self.captions):
            raise ValueError(
                f"{self.name}: {len(self.captions)} captions but {len(self.caption_image)} caption_image entries"
            )
        if len(self.caption_image) and (self.caption_image.min() < 0 or self.caption_image.max() >= n_images):
            raise ValueError(f"{self.name}: caption_image must index the {n_images} images")
        if self.regions is not None and len(self.regions) != n_images:
            raise ValueError(f"{self.name}: {len(self.regions)} region rows for {n_images} images")
        if self.image_refs is not None and len(self.image_refs) != n_images:
            raise ValueError(f"{self.name}: {len(self.image_refs)} image references for {n_images} images")
        if self.regions is None and self.image_refs is None:
            raise ValueError(f"{self.name}: a split needs images or precomputed regions")

    # ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def __repr__(self) -> str:
        kind = "regions" if self.regions is not None else "images"
        return f"ImageCaptionSplit({self.name!r}, {len(self)} {kind}, {self.n_captions} captions)"

    # ------------------------------------------------------------------------------------------
    def image(self, i: int) -> Image.Image:
        """Image ``i`` as RGB; a ValueError for splits that only hold precomputed regions."""
        if self.image_refs is None:
            raise ValueError(f"{self.name} holds precomputed region features, not images")
        return _decode_ref(self.image_refs[int(i)])

    def images(self, indices: Sequence[int] | None = None) -> LazyImages:
        """The images (all, or ``indices``) as a lazy sequence of file paths / PIL images."""
        if self.image_refs is None:
            raise ValueError(f"{self.name} holds precomputed region features, not images")
        refs = self.image_refs if indices is None else [self.image_refs[int(i)] for i in indices]
        return LazyImages(refs)

    def caption_indices(self, i: int) -> np.ndarray:
        """Indices into ``captions`` of image ``i``'s captions, in their original order."""
        if self._caption_index is None:
            order = np.argsort(self.caption_image, kind="stable")
            bounds = np.searchsorted(self.caption_image[order], np.arange(len(self) + 1))
            self._caption_index = [order[bounds[k] : bounds[k + 1]] for k in range(len(self))]
        return self._caption_index[int(i)]

    def captions_of(self, i: int) -> list[str]:
        return [self.captions[j] for j in self.caption_indices(i)]

    # ------------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A stable hash of what the split *is* (source, name, ids, captions, features).

        It keys feature caches, so it ignores where the files lie but changes with any id,
        caption or caption-to-image link. Precomputed regions enter by shape, dtype and a sample
        of rows: hashing gigabytes of features on every load would defeat the cache.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            header = {"source": self.source, "name": self.name, "n_images": len(self), "n_captions": self.n_captions}
            digest.update(json.dumps(header, sort_keys=True).encode())
            for image_id in self.image_ids:
                digest.update(image_id.encode() + b"\0")
            for caption in self.captions:
                digest.update(caption.encode() + b"\0")
            digest.update(self.caption_image.astype("<i8").tobytes())
            if self.regions is not None:
                digest.update(json.dumps([list(self.regions.shape), str(self.regions.dtype)]).encode())
                rows = np.unique(np.linspace(0, len(self.regions) - 1, num=min(len(self.regions), 8)).astype(int))
                for row in rows:
                    digest.update(np.ascontiguousarray(self.regions[row]).tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def subset(self, n_images: int | None = None, indices: Sequence[int] | None = None) -> "ImageCaptionSplit":
        """The first ``n_images`` images, or those at ``indices`` (in that order), with their captions."""
        if (n_images is None) == (indices is None):
            raise ValueError("subset() takes exactly one of n_images or indices")
        if n_images is not None:
            if n_images < 0:
                raise ValueError(f"n_images must be >= 0, got {n_images}")
            chosen = np.arange(min(int(n_images), len(self)), dtype=np.int64)
        else:
            chosen = np.asarray(list(indices), dtype=np.int64).reshape(-1)
            if len(chosen) and (chosen.min() < -len(self) or chosen.max() >= len(self)):
                raise IndexError(f"subset indices out of range for {len(self)} images")
            chosen = chosen % max(len(self), 1)
            if len(np.unique(chosen)) != len(chosen):
                raise ValueError("subset indices must not repeat (a caption cannot belong to two images)")
        caption_rows = [self.caption_indices(i) for i in chosen]
        flat = np.concatenate(caption_rows) if caption_rows else np.zeros(0, dtype=np.int64)
        caption_image = np.repeat(np.arange(len(chosen), dtype=np.int64), [len(r) for r in caption_rows])
        regions = None
        if self.regions is not None:
            is_prefix = np.array_equal(chosen, np.arange(len(chosen)))
            # A prefix keeps a memmap a memmap; fancy indexing would read the rows into memory.
            regions = self.regions[: len(chosen)] if is_prefix else self.regions[chosen]
        return ImageCaptionSplit(
            name=self.name,
            image_ids=[self.image_ids[i] for i in chosen],
            captions=[self.captions[j] for j in flat],
            caption_image=caption_image,
            regions=regions,
            image_refs=None if self.image_refs is None else [self.image_refs[i] for i in chosen],
            source=self.source,
        )


def _from_groups(
    name: str,
    source: str,
    image_ids: Sequence[Any],
    caption_groups: Sequence[Sequence[str]],
    image_refs: list[Any] | None,
    regions: np.ndarray | None = None,
) -> ImageCaptionSplit:
    captions = [str(c) for group in caption_groups for c in group]
    caption_image = np.repeat(np.arange(len(caption_groups), dtype=np.int64), [len(g) for g in caption_groups])
    return ImageCaptionSplit(
        name=name,
        image_ids=[str(i) for i in image_ids],
        captions=captions,
        caption_image=caption_image,
        regions=regions,
        image_refs=image_refs,
        source=source,
    )


def _as_caption_list(value: Any, where: str) -> list[str]:
    """Captions of one image from a string or a list (datasets store both)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            # COCO Karpathy rows hold sentence dicts ({"raw": ..., "tokens": ...}) in some exports.
            if isinstance(item, dict):
                item = item.get("raw", item.get("sentence", item.get("caption")))
            if not isinstance(item, str):
                raise ValueError(f"{where}: captions must be strings, got {type(item).__name__}")
            out.append(item)
        return out
    raise ValueError(f"{where}: captions must be a string or a list of strings, got {type(value).__name__}")
