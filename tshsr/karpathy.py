"""Readers of the Karpathy splits of Flickr30K and COCO, from the Hub or a ``save_to_disk`` copy.

Flickr30K (``nlphuji/flickr30k``) keeps every row in one dataset split and the Karpathy split
in a ``split`` column; COCO (``yerevann/coco-karpathy``) has one dataset split per Karpathy
split, ``restval`` included, and its images on disk (``image_root``), in an ``image`` column or
behind a URL. This module owns both readers, the Hub ids they read by default, opening the Hub
or disk copy, and, when streaming, materialising only the rows a split needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .caption_split import ImageCaptionSplit, _as_caption_list, _from_groups
from .image_refs import _ArrowRow, _Url

__all__ = ["COCO_HUB_ID", "FLICKR30K_HUB_ID"]

FLICKR30K_HUB_ID = "nlphuji/flickr30k"
COCO_HUB_ID = "yerevann/coco-karpathy"


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
