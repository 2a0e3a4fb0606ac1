"""Hugging Face Hub image-caption datasets that load with the installed ``datasets``.

Three things the plain ``datasets.load_dataset(repo)`` call does not do for us:

* **Loading-script repositories.** ``datasets`` 4 and later refuse dataset scripts
  ("Dataset scripts are no longer supported"); ``nlphuji/flickr30k`` is one. The Hub keeps a
  Parquet conversion of such repositories on the ``refs/convert/parquet`` branch, laid out as
  ``<config>/<split>/NNNN.parquet`` (``<config>/partial-<split>/`` when the converter stopped
  at its size limit), e.g. ``TEST/test/0000.parquet`` ... ``0008.parquet`` for Flickr30K. We
  detect a script repository (from its file list, or from the error ``datasets`` raises) and
  read that conversion instead, saying so in one line. The conversion's split folders are
  listed explicitly because ``datasets``' own inference only recognises train/validation/test
  folder names and silently drops others (COCO's ``restval``).
* **Any image-caption repository** (``--hf-dataset REPO --columns image=...,caption=...``), with
  captions either as a list per image or one per row grouped by an image-id column.
* **Streaming** for sets too large to download: rows are streamed and only the requested
  ``max_images`` are materialised.

Offline use and tests: the Hub is reached only through :func:`list_repo_files` and
:func:`repo_location`. With ``TSHSR_HUB_MIRROR=/some/dir`` they resolve a repository to
``/some/dir/<owner>/<name>`` (its default branch) and ``/some/dir/<owner>/<name>@<revision>``
(``/`` in the revision written as ``%2F``, e.g. ``flickr30k@refs%2Fconvert%2Fparquet``), so a
folder laid out like the Hub repository runs exactly the code path users run online.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MIRROR_ENV",
    "PARQUET_REVISION",
    "is_script_error",
    "is_script_repo",
    "list_repo_files",
    "load_hf_split",
    "load_hub_dataset",
    "materialise",
    "parquet_conversion_data_files",
    "parse_columns",
    "repo_location",
]

PARQUET_REVISION = "refs/convert/parquet"
MIRROR_ENV = "TSHSR_HUB_MIRROR"
SCRIPT_ERROR_MARKER = "Dataset scripts are no longer supported"

# Files that carry data; a repository with a top-level loader script and none of these is a
# script repository (its data lives on some other server the script downloads from).
_DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".tsv", ".txt", ".tar", ".zip",
                  ".jpg", ".jpeg", ".png", ".webp", ".gz", ".zst", ".h5", ".npy")
_COLUMN_KEYS = ("image", "caption", "split", "image_id")


# ----------------------------------------------------------------------------------------------
# The seam between this module and the Hub
# ----------------------------------------------------------------------------------------------
def _mirror_dir(repo: str, revision: str | None) -> Path | None:
    mirror = os.environ.get(MIRROR_ENV)
    if not mirror:
        return None
    base = Path(mirror).expanduser() / repo
    if revision and revision != "main":
        base = base.with_name(f"{base.name}@{revision.replace('/', '%2F')}")
    return base


def list_repo_files(repo: str, revision: str | None = None) -> list[str]:
    """Paths of every file in ``repo`` at ``revision`` (relative, ``/``-separated)."""
    local = _mirror_dir(repo, revision)
    if local is not None:
        if not local.is_dir():
            raise FileNotFoundError(f"{repo}@{revision or 'main'}: no mirror folder {local} (from ${MIRROR_ENV})")
        return sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    from huggingface_hub import HfApi

    return list(HfApi().list_repo_files(repo, repo_type="dataset", revision=revision))


def repo_location(repo: str, revision: str | None = None, path: str = "") -> str:
    """Where ``path`` of ``repo`` at ``revision`` is read from: the mirror folder or ``hf://``."""
    local = _mirror_dir(repo, revision)
    if local is not None:
        return str(local / path) if path else str(local)
    # huggingface_hub's file system resolves refs/convert/parquet and refs/pr/N unquoted.
    base = f"hf://datasets/{repo}@{revision}" if revision else f"hf://datasets/{repo}"
    return f"{base}/{path}" if path else base


# ----------------------------------------------------------------------------------------------
# Script repositories and the Parquet conversion
# ----------------------------------------------------------------------------------------------
def is_script_error(exc: BaseException) -> bool:
    """Whether ``exc`` is datasets' refusal to run a loading script."""
    return SCRIPT_ERROR_MARKER in str(exc)


def is_script_repo(files: Sequence[str], repo: str | None = None) -> bool:
    """Whether datasets >= 4 will refuse ``repo`` as a loading-script repository.

    datasets' rule: a top-level ``<name>.py`` for repository ``owner/<name>``, whatever else the
    repository holds (nlphuji/flickr30k keeps ``flickr30k-images.zip`` and a CSV beside its
    ``flickr30k.py``, and is still refused). Without ``repo``: a top-level ``*.py`` and no data.
    """
    if repo is not None:
        return f"{repo.rstrip('/').split('/')[-1]}.py" in files
    top_level_scripts = [f for f in files if "/" not in f and f.endswith(".py")]
    data_files = [f for f in files if f.lower().endswith(_DATA_SUFFIXES) and not f.startswith(".")]
    return bool(top_level_scripts) and not data_files


def parquet_conversion_data_files(files: Sequence[str], config: str | None = None) -> tuple[str, dict[str, list[str]]]:
    """``(config, {split: [paths]})`` of a ``refs/convert/parquet`` listing.

    Paths are ``<config>/<split>/NNNN.parquet`` or ``<config>/partial-<split>/NNNN.parquet``.
    ``config`` defaults to the only one, else ``default``; the others are named in the error.
    """
    by_config: dict[str, dict[str, list[str]]] = {}
    for path in files:
        parts = path.split("/")
        if len(parts) != 3 or not parts[2].endswith(".parquet"):
            continue  # .gitattributes, duckdb indexes, README
        name, split_dir, _ = parts
        split = split_dir[len("partial-"):] if split_dir.startswith("partial-") else split_dir
        by_config.setdefault(name, {}).setdefault(split, []).append(path)
    if not by_config:
        raise FileNotFoundError(f"No <config>/<split>/*.parquet files in the Parquet conversion (found {list(files)[:10]})")
    if config is None:
        if len(by_config) == 1:
            config = next(iter(by_config))
        elif "default" in by_config:
            config = "default"
        else:
            raise ValueError(f"The Parquet conversion has several configs {sorted(by_config)}; choose one")
    if config not in by_config:
        raise ValueError(f"No config {config!r} in the Parquet conversion; found {sorted(by_config)}")
    return config, {split: sorted(paths) for split, paths in sorted(by_config[config].items())}


def _announce_fallback(repo: str) -> None:
    import datasets

    print(f"{repo} is a loading-script dataset, which datasets {datasets.__version__} no longer runs; "
          f"reading the Hub's Parquet conversion ({PARQUET_REVISION}) instead.", file=sys.stderr, flush=True)


def _load_parquet_conversion(repo: str, config: str | None, streaming: bool) -> Any:
    import datasets

    files = list_repo_files(repo, PARQUET_REVISION)
    _, split_files = parquet_conversion_data_files(files, config)
    data_files = {split: [repo_location(repo, PARQUET_REVISION, p) for p in paths] for split, paths in split_files.items()}
    return datasets.load_dataset("parquet", data_files=data_files, streaming=streaming)


def load_hub_dataset(
    repo: str, revision: str | None = None, streaming: bool = False, config: str | None = None
) -> Any:
    """``repo`` as a ``DatasetDict`` (``IterableDatasetDict`` when streaming), every split.

    A loading-script repository is read from its Parquet conversion, with one line saying so;
    so is any repository when ``revision`` is ``refs/convert/parquet``.
    """
    import datasets

    if revision == PARQUET_REVISION:
        return _load_parquet_conversion(repo, config, streaming)
    try:
        files = list_repo_files(repo, revision)
    except FileNotFoundError:
        raise
    except Exception:  # noqa: BLE001 - listing is a shortcut; load_dataset's own error decides below
        files = None
    if files is not None and is_script_repo(files, repo):
        _announce_fallback(repo)
        return _load_parquet_conversion(repo, config, streaming)
    location = repo_location(repo, revision)
    try:
        if location.startswith("hf://"):
            return datasets.load_dataset(repo, revision=revision, streaming=streaming)
        return datasets.load_dataset(location, streaming=streaming)
    except RuntimeError as exc:
        if not is_script_error(exc):
            raise
        _announce_fallback(repo)
        return _load_parquet_conversion(repo, config, streaming)


# ----------------------------------------------------------------------------------------------
# Streaming: materialise only what is asked for
# ----------------------------------------------------------------------------------------------
def _undecoded(features: Any) -> Any:
    import datasets

    out = features.copy()
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            out[name] = datasets.Image(decode=False)
    return out


def materialise(
    iterable: Any,
    limit: int | None,
    keep: Callable[[dict], bool] | None = None,
    group_key: Callable[[dict], Any] | None = None,
) -> Any:
    """An in-memory ``datasets.Dataset`` of the first rows of a streamed split.

    ``keep`` filters rows (e.g. on a split column) before counting. ``limit`` counts rows, or
    distinct ``group_key`` values when captions come one per row (rows of one image are taken
    to be adjacent, as they are in every caption dataset we know; reading stops at the first
    row of image ``limit + 1``). Images are kept as undecoded bytes.
    """
    import datasets

    features = iterable.features
    if features is not None:
        features = _undecoded(features)
        for name, feature in features.items():
            if isinstance(feature, datasets.Image):
                iterable = iterable.cast_column(name, feature)
    rows: list[dict] = []
    seen: set[Any] = set()
    for row in iterable:
        if keep is not None and not keep(row):
            continue
        if limit is not None:
            key = group_key(row) if group_key is not None else len(rows)
            if key not in seen and len(seen) >= limit:
                break
            seen.add(key)
        rows.append(row)
    if features is not None:
        return datasets.Dataset.from_list(rows, features=features)
    return datasets.Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------------
# Any Hub image-caption dataset
# ----------------------------------------------------------------------------------------------
_AUTO_COLUMNS = {
    # Not "filepath": COCO Karpathy uses it for the folder (train2014), not the file.
    "image": ("image", "img", "jpg", "png", "url", "image_url", "image_path", "file_name", "path"),
    "caption": ("captions", "caption", "sentences", "text", "raw"),
    "image_id": ("image_id", "img_id", "cocoid", "imgid", "filename", "file_name", "id"),
}
_SPLIT_VALUES = {
    "train": ("train",),
    "validation": ("validation", "val", "valid", "dev"),
    "val": ("val", "validation", "valid", "dev"),
    "dev": ("dev", "val", "validation", "valid"),
    "test": ("test",),
}


def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """``"image=img,caption=sentences,split=split,image_id=cocoid"`` -> a dict (keys checked)."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        mapping = dict(spec)
    else:
        mapping = {}
        for item in str(spec).split(","):
            item = item.strip()
            if not item:
                continue
            if "=" not in item:
                raise ValueError(f"--columns: expected key=column, got {item!r} (keys: {', '.join(_COLUMN_KEYS)})")
            key, column = (s.strip() for s in item.split("=", 1))
            mapping[key] = column
    unknown = [k for k in mapping if k not in _COLUMN_KEYS]
    if unknown:
        raise ValueError(f"--columns: unknown key(s) {unknown}; use {', '.join(_COLUMN_KEYS)}")
    empty = [k for k, v in mapping.items() if not v]
    if empty:
        raise ValueError(f"--columns: no column given for {empty}")
    return mapping


def _resolve_columns(mapping: dict[str, str], column_names: Sequence[str], where: str) -> dict[str, str | None]:
    resolved: dict[str, str | None] = {}
    for key in ("image", "caption", "image_id"):
        if key in mapping:
            if mapping[key] not in column_names:
                raise ValueError(f"{where}: --columns {key}={mapping[key]} is not a column; found {list(column_names)}")
            resolved[key] = mapping[key]
        else:
            resolved[key] = next((c for c in _AUTO_COLUMNS[key] if c in column_names), None)
    if "split" in mapping and mapping["split"] not in column_names:
        raise ValueError(f"{where}: --columns split={mapping['split']} is not a column; found {list(column_names)}")
    resolved["split"] = mapping.get("split")
    for key in ("image", "caption"):
        if resolved[key] is None:
            raise ValueError(f"{where}: no {key} column found among {list(column_names)}; pass --columns {key}=NAME")
    return resolved


def _split_values(split: str) -> set[str]:
    return set(_SPLIT_VALUES.get(split, (split,)))


def load_hf_split(
    repo: str,
    split: str,
    revision: str | None = None,
    columns: str | dict | None = None,
    streaming: bool = False,
    max_images: int | None = None,
    image_root: str | None = None,
) -> Any:
    """One split of any Hub image-caption dataset as an :class:`~tshsr.data.ImageCaptionSplit`.

    ``columns`` maps ``image``, ``caption``, ``split`` and ``image_id`` to the dataset's columns
    (guessed when absent). The split is the dataset split of that name (``validation`` also
    matches ``val``/``valid``/``dev``), or, with ``split=COLUMN``, the rows whose column holds
    that name across all dataset splits (Flickr30K keeps all rows in one split and the Karpathy
    split in a column). Captions are a list per row, or one per row grouped by ``image_id``.
    Image columns may hold images (kept undecoded), file paths (under ``image_root``) or URLs.
    """
    from .caption_split import _from_groups

    mapping = parse_columns(columns)
    where = f"{repo}{'@' + revision if revision else ''}"
    loaded = load_hub_dataset(repo, revision=revision, streaming=streaming)
    first = loaded[list(loaded.keys())[0]]
    column_names = list(first.column_names or (first.features or {}).keys())
    resolved = _resolve_columns(mapping, column_names, where)
    parts, keep = _split_parts(loaded, split, resolved["split"], where)
    if streaming:
        parts, keep = _materialise_parts(parts, keep, resolved["image_id"], max_images), None
    root = Path(image_root).expanduser() if image_root else None
    image_ids, groups, refs = _collect_images(parts, split, resolved, filter_rows=keep is not None,
                                              max_images=max_images, root=root, where=where)
    if not image_ids:
        raise ValueError(f"{where}: split {split!r} has no rows")
    source = f"hf:{repo}" + (f"@{revision}" if revision else "")
    return _from_groups(f"{repo}/{split}", source, image_ids, groups, refs)


def _split_parts(
    loaded: Any, split: str, split_col: str | None, where: str
) -> tuple[list[Any], Callable[[dict], bool] | None]:
    """The dataset splits holding ``split``'s rows, and the row filter that picks them (if any).

    With a split column every dataset split may hold rows of ``split``; without one the split is
    the dataset split of that name.
    """
    names = list(loaded.keys())
    if split_col is not None:
        wanted = _split_values(split)
        return [loaded[n] for n in names], lambda row: str(row[split_col]) in wanted
    hf_split = next((c for c in _SPLIT_VALUES.get(split, (split,)) if c in names), None)
    if hf_split is None:
        raise ValueError(f"{where}: no split {split!r}; available: {names} (or map a split column with --columns split=NAME)")
    return [loaded[hf_split]], None


def _materialise_parts(
    parts: list[Any], keep: Callable[[dict], bool] | None, id_col: str | None, max_images: int | None
) -> list[Any]:
    """Streamed splits as in-memory datasets of their kept rows, ``max_images`` images in all."""
    group_key = (lambda row: row[id_col]) if id_col else None
    remaining = max_images
    materialised = []
    for part in parts:
        if remaining is not None and remaining <= 0:
            break
        ds = materialise(part, remaining, keep=keep, group_key=group_key)
        materialised.append(ds)
        if remaining is not None:
            remaining -= len(set(ds[id_col])) if id_col else len(ds)
    return materialised


def _image_ref_reader(part: Any, image_col: str, root: Path | None) -> Callable[[int], Any]:
    """Row -> image reference of one dataset split: an undecoded Arrow row for an image column,
    else the column's URL or file path (under ``root`` when given)."""
    import datasets

    from .image_refs import _ArrowRow, _Url

    if isinstance(part.features[image_col], datasets.Image):
        images = part.select_columns([image_col]).cast_column(image_col, datasets.Image(decode=False))
        return lambda r: _ArrowRow(images, r, image_col)
    image_values = part.select_columns([image_col])[:][image_col]

    def value_ref(r: int) -> Any:
        value = str(image_values[r])
        if value.startswith(("http://", "https://")):
            return _Url(value)
        return str(root / value) if root is not None else value

    return value_ref


def _collect_images(
    parts: list[Any], split: str, resolved: dict[str, str | None], *, filter_rows: bool,
    max_images: int | None, root: Path | None, where: str,
) -> tuple[list[str], list[list[str]], list[Any]]:
    """``(image_ids, caption groups, image refs)`` of the rows of ``parts``, in order.

    With an ``image_id`` column, rows sharing an id are one image (captions one per row);
    without one, every row is an image. ``filter_rows`` keeps only rows whose split column
    holds ``split``.
    """
    from .caption_split import _as_caption_list

    image_col, caption_col, id_col, split_col = (resolved[k] for k in ("image", "caption", "image_id", "split"))
    image_ids: list[str] = []
    groups: list[list[str]] = []
    refs: list[Any] = []
    index_of: dict[str, int] = {}
    for part in parts:
        table = part.select_columns([c for c in dict.fromkeys([caption_col, id_col, split_col]) if c])[:]
        rows: Iterable[int] = range(len(part))
        if filter_rows:
            rows = [r for r in rows if str(table[split_col][r]) in _split_values(split)]
        ref_of = _image_ref_reader(part, image_col, root)
        for r in rows:
            key = str(table[id_col][r]) if id_col else f"{len(image_ids)}"
            captions = _as_caption_list(table[caption_col][r], f"{where}, row {r}")
            if id_col and key in index_of:
                groups[index_of[key]].extend(captions)  # one caption per row: join the image's group
                continue
            if max_images is not None and len(image_ids) >= max_images:
                if id_col:
                    continue  # later rows may still add captions to images already taken
                break
            ref = ref_of(r)
            index_of[key] = len(image_ids)
            image_ids.append(key)
            groups.append(captions)
            refs.append(ref)
    return image_ids, groups, refs
