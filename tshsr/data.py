"""Image-caption datasets, all read into one form: :class:`ImageCaptionSplit`.

Every source the project meets (a local Hugging Face ``imagefolder`` such as Flickr8k, the Hub's
Flickr30K and COCO Karpathy splits, the SCAN/SGRAF precomputed region features, any Hub
image-caption repository) becomes a flat list of captions plus ``caption_image``, the index of
each caption's image. Images are never decoded at load time: each split keeps one cheap
*reference* per image and decodes it on demand, so a 120K-image COCO split loads in seconds and
``subset`` is just an index operation.

This module is the public entry point: it owns :data:`DATASETS` and :func:`load_split` (which
reader handles which dataset name) and re-exports the names other code imports from it. The
work lives in:

* :mod:`tshsr.caption_split` - :class:`ImageCaptionSplit`, the split itself;
* :mod:`tshsr.image_refs` - image references, decoding them, :class:`LazyImages`;
* :mod:`tshsr.imagefolder` - local ``imagefolder`` datasets (Flickr8k);
* :mod:`tshsr.karpathy` - the Flickr30K and COCO Karpathy splits (Hub or ``save_to_disk``);
* :mod:`tshsr.precomp` - SCAN/SGRAF precomputed region features;
* :mod:`tshsr.hub_data` - any Hub image-caption dataset (``hf_dataset`` + ``columns``).

Two names are looked up here at call time by the modules above, so replacing them on this
module (as the offline tests do) takes effect everywhere: ``_fetch_url`` (downloading an image
referenced by URL) and ``load_imagefolder_with_datasets`` (the ``datasets``-builder fallback of
the imagefolder reader).
"""

from __future__ import annotations

from typing import Any

# Re-exported: the public names, and the private ones other tshsr modules import from here
# (download_coco, hub) or that are replaced here (_fetch_url, load_imagefolder_with_datasets).
from .caption_split import ImageCaptionSplit, _as_caption_list, _from_groups  # noqa: F401
from .image_refs import (  # noqa: F401
    URL_TIMEOUT_S,
    LazyImages,
    _ArrowRow,
    _decode_ref,
    _fetch_url,
    _open_rgb,
    _resolve_ref,
    _Url,
)
from .imagefolder import _load_imagefolder, load_imagefolder_with_datasets  # noqa: F401
from .karpathy import (  # noqa: F401
    COCO_HUB_ID,
    FLICKR30K_HUB_ID,
    _karpathy_split,
    _load_coco,
    _load_flickr30k,
    _open_hub_or_disk,
)
from .precomp import SCAN_CAPTIONS_PER_IMAGE, _load_precomp  # noqa: F401

__all__ = ["DATASETS", "ImageCaptionSplit", "LazyImages", "load_split", "load_split_from_args",
           "load_imagefolder_with_datasets"]

# Public names accepted by load_split (aliases map to the reader that handles them).
DATASETS = ("imagefolder", "flickr8k", "flickr30k", "coco", "precomp")


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
