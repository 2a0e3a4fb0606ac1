"""Reader of local Hugging Face ``imagefolder`` datasets (Flickr8k and the like).

A folder of split folders (``train``, ``val``/``validation``/``dev``, ``test``), each with its
images and a metadata file naming each image's ``file_name`` and captions. ``metadata.jsonl``
is read directly (fast, no ``datasets`` cache); CSV / Parquet metadata and other layouts go
through ``datasets``' own imagefolder builder (:func:`load_imagefolder_with_datasets`). Both
give the same split.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .caption_split import ImageCaptionSplit, _as_caption_list, _from_groups
from .image_refs import _ArrowRow

__all__ = ["load_imagefolder_with_datasets"]

_CAPTION_COLUMNS = ("captions", "caption", "sentences", "text")
_SPLIT_FOLDER_ALIASES = {
    "validation": ("validation", "val", "valid", "dev"),
    "val": ("val", "validation", "valid", "dev"),
    "dev": ("dev", "val", "validation", "valid"),
    "test": ("test",),
    "train": ("train",),
}


def _imagefolder_split_dir(root: Path, split: str) -> Path:
    for candidate in _SPLIT_FOLDER_ALIASES.get(split, (split,)):
        if (root / candidate).is_dir():
            return root / candidate
    if (root / "metadata.jsonl").is_file() or (root / "metadata.csv").is_file():
        return root  # data_dir is the split folder itself
    available = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise FileNotFoundError(f"No split folder {split!r} in {root} (found: {available or 'none'})")


def _caption_column(columns: Sequence[str], where: str) -> str:
    for name in _CAPTION_COLUMNS:
        if name in columns:
            return name
    raise ValueError(f"{where}: no caption column; expected one of {list(_CAPTION_COLUMNS)}, found {list(columns)}")


def _load_imagefolder(data_dir: str | None, split: str, max_images: int | None) -> ImageCaptionSplit:
    if not data_dir:
        raise ValueError("dataset 'imagefolder' needs data_dir (a folder with split folders and metadata.jsonl)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder data_dir not found: {root}")
    folder = _imagefolder_split_dir(root, split)
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        # CSV / Parquet metadata and other layouts: let datasets' own imagefolder builder read it.
        # Called through tshsr.data, the public data module, at call time: that is where the
        # builder is replaced (tests patch tshsr.data.load_imagefolder_with_datasets to give it
        # a private cache_dir), so a replacement there must reach this fallback.
        from . import data

        return data.load_imagefolder_with_datasets(root, split, max_images=max_images)
    image_ids, groups, refs = [], [], []
    with metadata.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if max_images is not None and len(image_ids) >= max_images:
                break
            where = f"{metadata}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc})") from exc
            if "file_name" not in row:
                raise ValueError(f"{where}: missing column 'file_name'")
            column = _caption_column(list(row), where)
            file_name = row["file_name"]
            image_ids.append(row.get("image_id", Path(file_name).stem))
            groups.append(_as_caption_list(row[column], where))
            refs.append(str(folder / file_name))
    return _from_groups(_imagefolder_name(root, folder, split), "imagefolder", image_ids, groups, refs)


def _imagefolder_name(root: Path, folder: Path, split: str) -> str:
    # Name the split by its folder, so "val" and "validation" of one folder are the same split.
    return f"{root.name}/{folder.name if folder != root else split}"


def load_imagefolder_with_datasets(
    data_dir: str | os.PathLike, split: str, max_images: int | None = None, cache_dir: str | None = None
) -> ImageCaptionSplit:
    """Read an imagefolder through ``datasets.load_dataset("imagefolder", ...)``.

    The JSONL fast path in :func:`load_split` gives the same split; this one also reads
    ``metadata.csv`` / Parquet metadata and whatever else the datasets builder understands.
    """
    import datasets

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder data_dir not found: {root}")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache_dir)
    folder = _imagefolder_split_dir(root, split)
    # A split folder passed as data_dir loads as datasets' single default split.
    hf_split = next(iter(loaded)) if folder == root and len(loaded) == 1 else _pick_hf_split(loaded, split, str(root))
    dataset = loaded[hf_split]
    where = f"imagefolder {root}"
    if "image" not in dataset.column_names:
        raise ValueError(f"{where}: missing column 'image'")
    column = _caption_column(dataset.column_names, where)
    if max_images is not None:
        dataset = dataset.select(range(min(max_images, len(dataset))))
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    table = dataset.select_columns([c for c in (column, "image_id", "image") if c in dataset.column_names])[:]
    refs: list[Any] = []
    for row, value in enumerate(table["image"]):
        path = value.get("path") if isinstance(value, dict) else None
        refs.append(path if path and Path(path).is_file() else _ArrowRow(dataset, row, "image"))
    if "image_id" in table:
        image_ids = table["image_id"]
    else:
        image_ids = [Path(v["path"]).stem if v.get("path") else str(i) for i, v in enumerate(table["image"])]
    groups = [_as_caption_list(v, f"{where}, row {i}") for i, v in enumerate(table[column])]
    return _from_groups(_imagefolder_name(root, folder, split), "imagefolder", image_ids, groups, refs)


def _pick_hf_split(loaded: Any, split: str, where: str) -> str:
    names = list(loaded.keys())
    for candidate in _SPLIT_FOLDER_ALIASES.get(split, (split,)):
        if candidate in names:
            return candidate
    raise ValueError(f"{where}: no split {split!r}; available: {names}")
