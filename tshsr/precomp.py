"""Reader of SCAN / SGRAF precomputed region features (``{split}_ims.npy`` + ``{split}_caps.txt``).

The region features are memory-mapped, not read: a split of them is an
:class:`~tshsr.data.ImageCaptionSplit` with ``regions`` and no images. This module owns the
SCAN file layout, its split names (``dev`` for validation) and its one-row-per-caption variant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .caption_split import ImageCaptionSplit, _from_groups

__all__ = ["SCAN_CAPTIONS_PER_IMAGE"]

_PRECOMP_SPLITS = {"validation": ("dev", "val", "validation"), "val": ("dev", "val", "validation"),
                   "dev": ("dev", "val", "validation")}
SCAN_CAPTIONS_PER_IMAGE = 5


def _load_precomp(data_dir: str | None, split: str, max_images: int | None) -> ImageCaptionSplit:
    if not data_dir:
        raise ValueError("dataset 'precomp' needs data_dir (the folder with {split}_ims.npy and {split}_caps.txt)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"precomp data_dir not found: {root}")
    stem = next((s for s in _PRECOMP_SPLITS.get(split, (split,)) if (root / f"{s}_ims.npy").is_file()), None)
    if stem is None:
        raise FileNotFoundError(f"No {split}_ims.npy in {root} (SCAN names: train, dev, test, testall)")
    ims_path, caps_path = root / f"{stem}_ims.npy", root / f"{stem}_caps.txt"
    if not caps_path.is_file():
        raise FileNotFoundError(f"Missing captions file {caps_path}")
    with caps_path.open(encoding="utf-8") as handle:
        captions = [line.rstrip("\n").strip() for line in handle]
    while captions and not captions[-1]:
        captions.pop()  # a trailing newline is not a caption
    regions = np.load(ims_path, mmap_mode="r")
    if regions.ndim != 3:
        raise ValueError(f"{ims_path}: expected [images, regions, features], got shape {regions.shape}")
    rows, n_caps = len(regions), len(captions)
    if rows == 0 or n_caps == 0:
        raise ValueError(f"{root}: empty split {stem!r} ({rows} feature rows, {n_caps} captions)")
    if rows == n_caps and n_caps % SCAN_CAPTIONS_PER_IMAGE == 0 and n_caps > 1:
        # SCAN's im_div: some releases repeat each image's features once per caption.
        regions = regions[::SCAN_CAPTIONS_PER_IMAGE]
        per_image = SCAN_CAPTIONS_PER_IMAGE
    elif n_caps % rows == 0:
        per_image = n_caps // rows
    else:
        raise ValueError(f"{root}: {n_caps} captions in {caps_path.name} do not divide over {rows} feature rows")
    n_images = len(regions)
    image_ids = [f"{stem}/{i}" for i in range(n_images)]
    ids_path = root / f"{stem}_ids.txt"
    if ids_path.is_file():
        ids = [line.strip() for line in ids_path.read_text().splitlines() if line.strip()]
        if len(ids) == n_images:
            image_ids = ids
        elif len(ids) == n_caps:
            image_ids = ids[::per_image]
    groups = [captions[i * per_image : (i + 1) * per_image] for i in range(n_images)]
    if max_images is not None:
        groups, image_ids, regions = groups[:max_images], image_ids[:max_images], regions[:max_images]
    return _from_groups(f"{root.name}/{stem}", "precomp", image_ids, groups, None, regions=regions)
