"""Download the COCO images of the Karpathy splits into a local folder, once, in parallel.

``yerevann/coco-karpathy`` carries image URLs only. Fetching them one by one while a training
run reads its data wastes the run; this tool fills a local image cache instead, laid out as
COCO's own release (``train2014/``, ``val2014/``), so ``--image-root DIR`` then reads every
image from disk::

    python -m tshsr.download_coco --output data/coco_images [--split train|validation|test|all]
        [--workers 32] [--retries 3] [--max-images N] [--data-dir SAVE_TO_DISK_COPY]

* **parallel**: a thread pool (the work is network-bound);
* **resumable**: a file already listed in ``manifest.jsonl`` with its size is skipped; files are
  written to a temporary name and renamed, so an interrupted run never leaves half an image;
  an image found on disk but not in the manifest (an existing COCO copy) is verified and adopted;
* **verified**: the byte count must match ``Content-Length`` and the image must decode; where a
  checksum is known (``expected_sha256``, e.g. another machine's manifest) it must match, and
  the sha256 of every saved file is recorded in ``manifest.jsonl``;
* **failures** are retried (``--retries`` more rounds, with a pause), and what still fails is
  listed on screen and in ``failures.txt``; the exit status is 1 then.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DownloadReport", "coco_image_items", "download_images", "main"]

MANIFEST = "manifest.jsonl"
FAILURES = "failures.txt"
TIMEOUT_S = 30.0


@dataclass
class DownloadReport:
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # complete from an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # relative path -> last error
    retried: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


def _read_manifest(path: Path) -> dict[str, dict]:
    entries: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                entries[record["path"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a crash: that image is simply fetched again
    return entries


def _verify_image(data: bytes, where: str) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a full decode: a truncated JPEG passes verify() but fails here
    except Exception as exc:  # noqa: BLE001 - any decoder error means a bad file
        raise ValueError(f"{where}: not a readable image ({exc.__class__.__name__}: {exc})") from exc


def _fetch(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http(s) URLs from the dataset)
        data = response.read()
        expected = response.headers.get("Content-Length")
    if expected is not None and int(expected) != len(data):
        raise OSError(f"received {len(data)} of {expected} bytes")
    return data


def _download_one(root: Path, rel: str, url: str, timeout: float, expected_sha256: str | None) -> dict:
    data = _fetch(url, timeout)
    _verify_image(data, rel)
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise ValueError(f"{rel}: sha256 {digest[:12]}... does not match the expected {expected_sha256[:12]}...")
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return {"path": rel, "url": url, "size": len(data), "sha256": digest}


def _adopt_existing(root: Path, rel: str, url: str, expected_sha256: str | None) -> dict | None:
    """A file already on disk (e.g. an existing COCO copy) that decodes and matches is kept."""
    target = root / rel
    if not target.is_file() or target.stat().st_size == 0:
        return None
    data = target.read_bytes()
    try:
        _verify_image(data, rel)
    except ValueError:
        return None
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        return None
    return {"path": rel, "url": url, "size": len(data), "sha256": digest}


def download_images(
    items: Iterable[tuple[str, str]],
    output: str | os.PathLike,
    workers: int = 16,
    retries: int = 3,
    timeout: float = TIMEOUT_S,
    retry_wait: float = 2.0,
    expected_sha256: dict[str, str] | None = None,
    progress: bool = True,
) -> DownloadReport:
    """Fetch ``(relative_path, url)`` items into ``output``; see the module docstring."""
    from tqdm.auto import tqdm

    root = Path(output).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    expected_sha256 = expected_sha256 or {}
    manifest_path = root / MANIFEST
    manifest = _read_manifest(manifest_path)
    report = DownloadReport()
    todo: list[tuple[str, str]] = []
    seen: set[str] = set()
    with manifest_path.open("a", encoding="utf-8") as manifest_file:

        def record(entry: dict) -> None:
            manifest[entry["path"]] = entry
            manifest_file.write(json.dumps(entry) + "\n")
            manifest_file.flush()

        for rel, url in items:
            if rel in seen:
                continue
            seen.add(rel)
            entry = manifest.get(rel)
            target = root / rel
            if (entry and target.is_file() and target.stat().st_size == entry.get("size")
                    and (rel not in expected_sha256 or entry.get("sha256") == expected_sha256[rel])):
                report.skipped.append(rel)
                continue
            adopted = _adopt_existing(root, rel, url, expected_sha256.get(rel)) if entry is None else None
            if adopted is not None:
                record(adopted)
                report.skipped.append(rel)
                continue
            todo.append((rel, url))

        errors: dict[str, str] = {}
        for attempt in range(retries + 1):
            if not todo:
                break
            if attempt:
                report.retried += len(todo)
                time.sleep(retry_wait * attempt)
            failed: list[tuple[str, str]] = []
            bar = tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True,
                       desc="COCO images" if attempt == 0 else f"retry {attempt}/{retries}")
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                futures = {pool.submit(_download_one, root, rel, url, timeout, expected_sha256.get(rel)): (rel, url)
                           for rel, url in todo}
                for future in as_completed(futures):
                    rel, url = futures[future]
                    try:
                        record(future.result())
                        report.downloaded.append(rel)
                        errors.pop(rel, None)
                    except Exception as exc:  # noqa: BLE001 - listed and retried, never fatal mid-run
                        errors[rel] = f"{exc.__class__.__name__}: {exc}"
                        failed.append((rel, url))
                    bar.update(1)
            bar.close()
            todo = failed
    report.failed = {rel: errors[rel] for rel, _ in todo}
    failures_path = root / FAILURES
    if report.failed:
        failures_path.write_text("".join(f"{rel}\t{dict(todo)[rel]}\t{err}\n" for rel, err in report.failed.items()))
    elif failures_path.exists():
        failures_path.unlink()
    return report


def coco_image_items(
    split: str = "all",
    data_dir: str | None = None,
    repo: str | None = None,
    revision: str | None = None,
    max_images: int | None = None,
) -> list[tuple[str, str]]:
    """``(filepath/filename, url)`` of the COCO Karpathy images of ``split`` (``all``: every
    split), read from the Hub dataset (or a ``save_to_disk`` copy in ``data_dir``)."""
    import datasets

    from .data import COCO_HUB_ID, _karpathy_split, _open_hub_or_disk

    loaded = _open_hub_or_disk(repo or COCO_HUB_ID, data_dir, revision)
    parts = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    wanted = None
    if split != "all":
        karpathy = _karpathy_split(split, "coco")
        wanted = {"train", "restval"} if karpathy == "train" else {karpathy}
    items: list[tuple[str, str]] = []
    for part in parts:
        missing = [c for c in ("filepath", "filename", "url", "split") if c not in part.column_names]
        if missing:
            raise ValueError(f"COCO dataset {repo or data_dir or COCO_HUB_ID}: missing column(s) {missing}")
        table = part.select_columns(["filepath", "filename", "url", "split"])[:]
        for filepath, filename, url, row_split in zip(table["filepath"], table["filename"], table["url"], table["split"]):
            if wanted is not None and str(row_split) not in wanted:
                continue
            items.append((f"{filepath}/{filename}" if filepath else str(filename), str(url)))
            if max_images is not None and len(items) >= max_images:
                return items
    return items


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tshsr.download_coco", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="image cache folder (pass it as --image-root afterwards)")
    parser.add_argument("--split", default="all", help="train (with restval), validation, test or all")
    parser.add_argument("--data-dir", default=None, help="a save_to_disk copy of the dataset instead of the Hub")
    parser.add_argument("--hf-dataset", default=None, help="another repository with the coco-karpathy columns")
    parser.add_argument("--hf-revision", default=None)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S)
    parser.add_argument("--checksums", default=None,
                        help="a manifest.jsonl from another download: its sha256 values must match")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)

    items = coco_image_items(args.split, args.data_dir, args.hf_dataset, args.hf_revision, args.max_images)
    expected = None
    if args.checksums:
        expected = {rel: e["sha256"] for rel, e in _read_manifest(Path(args.checksums)).items() if e.get("sha256")}
    report = download_images(items, args.output, workers=args.workers, retries=args.retries, timeout=args.timeout,
                             expected_sha256=expected, progress=args.progress)
    print(f"{len(report.downloaded)} downloaded, {len(report.skipped)} already complete, "
          f"{len(report.failed)} failed (of {len(items)}) in {args.output}")
    if report.failed:
        for rel, error in list(report.failed.items())[:20]:
            print(f"  FAILED {rel}: {error}")
        if len(report.failed) > 20:
            print(f"  ... and {len(report.failed) - 20} more")
        print(f"The list is in {Path(args.output) / FAILURES}; run the same command again to retry them.")
        return 1
    print(f"Read the images from disk with --image-root {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
