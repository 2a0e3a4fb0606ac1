"""Augmented views of the training images, cached like the images themselves (``--augment-views``).

A frozen backbone's features are cached once per image, so a training run sees every image the
same way in every epoch. Augmented views give it other real looks at each photo at the price of
one more caching pass per view, and none per step: view 1 is the photo mirrored left to right,
views 2 and up are crops (a random box of 50-100 % of the area, aspect 3:4 to 4:3, resized to
the backbone's input like the photo itself). A crop's box is drawn from the image id and the
view's name, so a cache entry and a resumed run always hold the same crops.

Each view is a cache entry of its own (:func:`tshsr.features.cache_features`' format: float16
memory maps written in chunks, resumable, complete last), keyed by the backbone, the image ids
and the view, so that a run with more views reuses the entries of a run with fewer.

A mirrored photo no longer matches a caption that says "left" or "right"; rather than rewrite
cached captions, an image any of whose captions says either word is never shown mirrored.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .features import _entry, _fill, _image_shape, _write_json, content_key, feature_key
from .processing import load_image

CROP_SCALE = (0.5, 1.0)  # fraction of the photo's area a crop keeps
CROP_RATIO = (3 / 4, 4 / 3)  # its width / height
_SIDE_WORD = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def view_names(count: int) -> list[str]:
    """The names of the first ``count`` augmented views: ``hflip``, then ``crop1``, ``crop2``, ..."""
    if count < 0:
        raise ValueError(f"the number of augmented views must be at least 0, got {count}")
    return ["hflip", *(f"crop{k}" for k in range(1, count))][:count]


def crop_box(size: tuple[int, int], image_id: str, view: str) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of view ``view``'s crop of a photo of ``size`` (width, height),
    the same for the same image id and view on every machine."""
    width, height = size
    seed = int.from_bytes(hashlib.sha256(f"{view}\0{image_id}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    for _ in range(10):
        area = width * height * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    # a very long photo: the largest centred box of the smallest scale that fits
    w = min(width, max(1, round(math.sqrt(width * height * CROP_SCALE[0]))))
    h = min(height, max(1, round(width * height * CROP_SCALE[0] / w)))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def view_image(image: Image.Image, view: str, image_id: str) -> Image.Image:
    """Photo ``image`` as view ``view`` sees it."""
    if view == "hflip":
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if re.fullmatch(r"crop\d+", view):
        return image.crop(crop_box(image.size, image_id, view))
    raise ValueError(f"unknown image view {view!r} (views: hflip, crop1, crop2, ...)")


class ViewImages(Sequence):
    """A split's images (paths or PIL images, decoded when read) as one view sees them."""

    def __init__(self, images: Sequence, image_ids: Sequence[str], view: str):
        if len(images) != len(image_ids):
            raise ValueError(f"{len(images)} images but {len(image_ids)} image ids")
        self.images, self.image_ids, self.view = images, list(image_ids), view

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return view_image(load_image(self.images[index]), self.view, self.image_ids[index])


@torch.no_grad()
def cache_image_view(model, images: Sequence, image_ids: Sequence[str], view: str, cache_dir: str | os.PathLike,
                     batch_size: int = 32, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, K, F] and mask [N, K] of view ``view`` of every image (memory maps), computed
    once and reused; an interrupted pass resumes where it stopped."""
    if model.config.image_encoder != "timm":
        raise ValueError("augmented views need images and a timm backbone, not precomputed region features")
    key_data = {"backbone": feature_key(model), "data": content_key(image_ids, [], []), "view": view}
    directory, state = _entry(cache_dir, key_data)
    if not state.get("complete"):
        seen = ViewImages(images, image_ids, view)
        was_training = model.training
        model.eval()
        _fill(directory, state, "images", _image_shape(model, seen, len(seen)), batch_size,
              lambda a, b: model.image_features(seen[a:b]), f"img ({view})", np.bool_, progress)
        state["complete"] = True
        _write_json(directory / "progress.json", state)
        model.train(was_training)
    return np.load(directory / "images.npy", mmap_mode="r"), np.load(directory / "image_mask.npy", mmap_mode="r")


def mirror_safe(captions: Sequence[str], caption_image: Sequence[int], n_images: int) -> np.ndarray:
    """[n_images] bool: True where no caption of the image says "left" or "right"."""
    safe = np.ones(n_images, dtype=bool)
    for caption, owner in zip(captions, caption_image):
        if _SIDE_WORD.search(caption):
            safe[int(owner)] = False
    return safe


class ImageViews:
    """The augmented views of a cached training split, and one view per image per step."""

    def __init__(self, base: np.ndarray, base_mask: np.ndarray, views: dict[str, tuple[np.ndarray, np.ndarray]],
                 mirror_ok: np.ndarray):
        self.sources = [(base, base_mask), *views.values()]
        self.mirror_view = 1 + list(views).index("hflip") if "hflip" in views else -1  # -1: no mirror
        self.mirror_ok = mirror_ok

    @classmethod
    def build(cls, model, split, cached, count: int, cache_dir, progress: bool = True) -> "ImageViews":
        images = split.images()
        views = {name: cache_image_view(model, images, split.image_ids, name, cache_dir, progress=progress)
                 for name in view_names(count)}
        return cls(cached.images, cached.image_mask, views,
                   mirror_safe(split.captions, split.caption_image, len(split.image_ids)))

    def choose(self, index: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """One view per image of ``index`` (0 is the photo as cached), uniformly, never a mirror of
        an image whose captions say left or right."""
        choice = torch.randint(0, len(self.sources), (len(index),), generator=generator).numpy()
        choice[(choice == self.mirror_view) & ~self.mirror_ok[index]] = 0
        return choice

    def batch(self, index, generator: torch.Generator, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.asarray(index)
        choice = self.choose(index, generator)
        feats = np.empty((len(index), *self.sources[0][0].shape[1:]), dtype=np.float32)
        mask = np.empty((len(index), self.sources[0][1].shape[1]), dtype=bool)
        for view in np.unique(choice):
            rows = choice == view
            source, source_mask = self.sources[view]
            order = index[rows]
            feats[rows] = source[order]
            mask[rows] = source_mask[order]
        return torch.from_numpy(feats).to(device), torch.from_numpy(mask).to(device)
