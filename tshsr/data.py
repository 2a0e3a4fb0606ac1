"""Image-caption datasets, all read into one form: :class:`ImageCaptionSplit`.

Every source the project meets (a local Hugging Face ``imagefolder`` such as Flickr8k, the Hub's
Flickr30K and COCO Karpathy splits, the SCAN/SGRAF precomputed region features) becomes a flat
list of captions plus ``caption_image``, the index of each caption's image. Nothing assumes five
captions per image: the retrieval protocol in :mod:`tshsr.metrics` and every consumer work from
``caption_image`` alone.

Images are never decoded at load time. Each split keeps one cheap *reference* per image (a file
path, a row of an Arrow-backed dataset, a URL) and decodes it on demand, so a 120K-image COCO
split loads in seconds and ``subset`` is just an index operation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["DATASETS", "ImageCaptionSplit", "LazyImages", "load_split", "load_split_from_args",
           "load_imagefolder_with_datasets"]

# Public names accepted by load_split (aliases map to the reader that handles them).
DATASETS = ("imagefolder", "flickr8k", "flickr30k", "coco", "precomp")

FLICKR30K_HUB_ID = "nlphuji/flickr30k"
COCO_HUB_ID = "yerevann/coco-karpathy"

# Seconds to wait for one COCO image fetched from its URL (only when no image_root is given).
URL_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------------------------
# Image references: what a split keeps instead of decoded images
# ----------------------------------------------------------------------------------------------
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
        return _open_rgb(_fetch_url(ref.url))
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


# ----------------------------------------------------------------------------------------------
# The split
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# imagefolder (Flickr8k)
# ----------------------------------------------------------------------------------------------
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
        return load_imagefolder_with_datasets(root, split, max_images=max_images)
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


# ----------------------------------------------------------------------------------------------
# Hub datasets: Flickr30K (nlphuji/flickr30k) and COCO (yerevann/coco-karpathy)
# ----------------------------------------------------------------------------------------------
def _open_hub_or_disk(hub_id: str, data_dir: str | None, revision: str | None = None, streaming: bool = False) -> Any:
    """A save_to_disk folder when data_dir is given (offline), else the Hub dataset.

    The Hub path goes through :func:`tshsr.hub_data.load_hub_dataset`, which reads a
    loading-script repository (Flickr30K's) from its Parquet conversion; ``streaming`` returns
    an ``IterableDatasetDict`` that the callers materialise up to ``max_images``.
    """
    import datasets

    if data_dir:
        path = Path(data_dir).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{hub_id} data_dir not found: {path} (expected a save_to_disk folder)")
        try:
            return datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{path} is not a datasets save_to_disk folder (of {hub_id}): {exc}"
            ) from exc
    from .hub_data import load_hub_dataset

    return load_hub_dataset(hub_id, revision=revision, streaming=streaming)


def _require_columns(dataset: Any, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; found {dataset.column_names}")


def _karpathy_split(split: str, dataset_name: str) -> str:
    aliases = {"validation": "val", "valid": "val", "dev": "val", "val": "val", "train": "train", "test": "test",
               "restval": "restval"}
    if split not in aliases:
        raise ValueError(f"{dataset_name}: unknown split {split!r}; use train, validation (val) or test")
    return aliases[split]


def _filter_rows(values: Sequence[Any], wanted: set[str]) -> list[int]:
    return [i for i, v in enumerate(values) if str(v) in wanted]


def _load_flickr30k(
    data_dir: str | None, split: str, max_images: int | None, repo: str = FLICKR30K_HUB_ID,
    revision: str | None = None, streaming: bool = False,
) -> ImageCaptionSplit:
    import datasets

    karpathy = _karpathy_split(split, "flickr30k")
    streaming = streaming and not data_dir
    loaded = _open_hub_or_disk(repo, data_dir, revision, streaming)
    where = f"flickr30k ({data_dir or repo})"
    if streaming:
        from .hub_data import materialise

        part = loaded["test"] if "test" in loaded else next(iter(loaded.values()))
        loaded = materialise(part, max_images, keep=lambda row: str(row.get("split")) == karpathy)
    if isinstance(loaded, datasets.DatasetDict):
        # The Hub release has one split ("test") holding every row; the Karpathy split is a column.
        if "test" in loaded:
            loaded = loaded["test"]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise ValueError(f"{where}: expected one split holding all rows, found {list(loaded)}")
    _require_columns(loaded, ["image", "caption", "split"], where)
    id_column = "filename" if "filename" in loaded.column_names else ("img_id" if "img_id" in loaded.column_names else None)
    columns = ["caption", "split"] + ([id_column] if id_column else [])
    table = loaded.select_columns(columns)[:]
    rows = _filter_rows(table["split"], {karpathy})
    if max_images is not None:
        rows = rows[:max_images]
    if id_column == "filename":
        image_ids = [Path(str(table["filename"][r])).stem for r in rows]
    elif id_column:
        image_ids = [str(table[id_column][r]) for r in rows]
    else:
        image_ids = [str(r) for r in rows]
    groups = [_as_caption_list(table["caption"][r], f"{where}, row {r}") for r in rows]
    images = loaded.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    refs: list[Any] = [_ArrowRow(images, r, "image") for r in rows]
    return _from_groups(f"flickr30k/{karpathy}", "flickr30k", image_ids, groups, refs)


def _load_coco(
    data_dir: str | None, split: str, image_root: str | None, max_images: int | None, repo: str = COCO_HUB_ID,
    revision: str | None = None, streaming: bool = False,
) -> ImageCaptionSplit:
    import datasets

    karpathy = _karpathy_split(split, "coco")
    # Standard practice (SCAN, VSE++): the 5K "restval" images join the 113K training set.
    wanted = {"train", "restval"} if karpathy == "train" else {karpathy}
    hf_names = {"train": ("train",), "restval": ("restval",), "val": ("validation", "val"), "test": ("test",)}
    streaming = streaming and not data_dir
    loaded = _open_hub_or_disk(repo, data_dir, revision, streaming)
    where = f"coco ({data_dir or repo})"
    if streaming:
        loaded = _materialise_coco(loaded, wanted, max_images)
    parts: list[Any] = []
    if isinstance(loaded, datasets.DatasetDict):
        # Train before restval, so that max_images takes the canonical split's images first.
        for name in [n for n in ("train", "restval", "val", "test") if n in wanted]:
            found = [h for h in hf_names[name] if h in loaded]
            if not found:
                if name == "restval":
                    continue  # some exports fold restval into train already
                raise ValueError(f"{where}: no split {hf_names[name][0]!r}; available: {list(loaded)}")
            parts.append(loaded[found[0]])
    else:
        if "split" not in loaded.column_names:
            raise ValueError(f"{where}: a single dataset needs a 'split' column to select {split!r}")
        parts.append(loaded)
    image_ids: list[str] = []
    groups: list[list[str]] = []
    refs: list[Any] = []
    root = Path(image_root).expanduser() if image_root else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"coco image_root not found: {root}")
    for dataset in parts:
        _require_columns(dataset, ["filename", "sentences"], where)
        if root is None and "image" not in dataset.column_names and "url" not in dataset.column_names:
            raise ValueError(f"{where}: no image_root given and no 'url' or 'image' column to read images from")
        columns = [c for c in ("filepath", "filename", "sentences", "split", "cocoid", "url") if c in dataset.column_names]
        table = dataset.select_columns(columns)[:]
        rows = list(range(len(dataset)))
        if "split" in table and not isinstance(loaded, datasets.DatasetDict):
            rows = _filter_rows(table["split"], wanted)
        image_column = None
        if "image" in dataset.column_names:
            image_column = dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
        for r in rows:
            if max_images is not None and len(image_ids) >= max_images:
                break
            filename = str(table["filename"][r])
            image_ids.append(str(table["cocoid"][r]) if "cocoid" in table else Path(filename).stem)
            groups.append(_as_caption_list(table["sentences"][r], f"{where}, row {r}"))
            if root is not None:
                subdir = str(table["filepath"][r]) if "filepath" in table and table["filepath"][r] else ""
                refs.append(str(root / subdir / filename))
            elif image_column is not None:
                refs.append(_ArrowRow(image_column, r, "image"))
            else:
                refs.append(_Url(str(table["url"][r])))
    return _from_groups(f"coco/{karpathy}", "coco", image_ids, groups, refs)


def _materialise_coco(loaded: Any, wanted: set[str], max_images: int | None) -> Any:
    """Stream only the rows a COCO split needs (in the order _load_coco reads them)."""
    import datasets

    from .hub_data import materialise

    hf_names = {"train": ("train",), "restval": ("restval",), "val": ("validation", "val"), "test": ("test",)}
    if len(loaded) == 1 and "split" in (next(iter(loaded.values())).column_names or []):
        part = next(iter(loaded.values()))
        return materialise(part, max_images, keep=lambda row: str(row["split"]) in wanted)
    out, remaining = {}, max_images
    for name in [n for n in ("train", "restval", "val", "test") if n in wanted]:
        found = [h for h in hf_names[name] if h in loaded]
        if not found or (remaining is not None and remaining <= 0):
            continue
        out[found[0]] = materialise(loaded[found[0]], remaining)
        if remaining is not None:
            remaining -= len(out[found[0]])
    return datasets.DatasetDict(out)


# ----------------------------------------------------------------------------------------------
# SCAN / SGRAF precomputed region features
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
def load_split(
    dataset: str,
    split: str,
    data_dir: str | None = None,
    image_root: str | None = None,
    max_images: int | None = None,
    *,
    hf_dataset: str | None = None,
    hf_revision: str | None = None,
    columns: str | dict | None = None,
    streaming: bool = False,
) -> ImageCaptionSplit:
    """Read one split of a dataset into an :class:`ImageCaptionSplit`.

    ``dataset``: ``imagefolder`` (alias ``flickr8k``; ``data_dir`` required), ``flickr30k``,
    ``coco`` (``data_dir``: a ``save_to_disk`` folder, else the Hub; ``image_root``: the folder
    holding COCO's ``train2014``/``val2014``, else images are fetched from their URL when read) or
    ``precomp`` (SCAN/SGRAF region features). ``split``: ``train``, ``validation`` (``val``,
    ``dev``) or ``test``. ``max_images`` keeps the first images of the split.

    Hub datasets (:mod:`tshsr.hub_data`): ``hf_dataset`` names any Hub image-caption repository
    (at ``hf_revision``), read with the ``columns`` mapping (``"image=...,caption=...,split=..."``);
    with ``dataset`` ``flickr30k`` or ``coco`` and no ``columns`` it replaces the default
    repository of that reader (a fork or mirror with the same layout). ``streaming`` streams
    the Hub set and materialises only ``max_images`` images.
    """
    if max_images is not None and max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    name = dataset.lower()
    if hf_dataset and (columns or name not in ("flickr30k", "coco")):
        from .hub_data import load_hf_split

        return load_hf_split(hf_dataset, split, revision=hf_revision, columns=columns, streaming=streaming,
                             max_images=max_images, image_root=image_root)
    if name in ("imagefolder", "flickr8k"):
        return _load_imagefolder(data_dir, split, max_images)
    if name == "flickr30k":
        return _load_flickr30k(data_dir, split, max_images, repo=hf_dataset or FLICKR30K_HUB_ID,
                               revision=hf_revision, streaming=streaming)
    if name == "coco":
        return _load_coco(data_dir, split, image_root, max_images, repo=hf_dataset or COCO_HUB_ID,
                          revision=hf_revision, streaming=streaming)
    if name == "precomp":
        return _load_precomp(data_dir, split, max_images)
    raise ValueError(f"Unknown dataset {dataset!r}; choose one of {list(DATASETS)}")


def load_split_from_args(args: Any, split: str, max_images: int | None = None) -> ImageCaptionSplit:
    """:func:`load_split` with the data options of a parsed command line / ``TrainArgs``
    (``dataset``, ``data_dir``, ``image_root``, ``hf_dataset``, ``hf_revision``, ``columns``,
    ``streaming``; absent attributes take load_split's defaults)."""
    return load_split(
        getattr(args, "dataset", "imagefolder"), split, data_dir=getattr(args, "data_dir", None),
        image_root=getattr(args, "image_root", None), max_images=max_images,
        hf_dataset=getattr(args, "hf_dataset", None), hf_revision=getattr(args, "hf_revision", None),
        columns=getattr(args, "columns", None), streaming=bool(getattr(args, "streaming", False)),
    )
