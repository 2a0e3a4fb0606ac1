"""On-disk cache of frozen backbone features, so training epochs never rerun the towers.

A cache entry is keyed by everything that changes its contents: the image backbone and its
preprocessing, the text encoder and its tokenisation, and the data (image ids and captions).
Change any of them and a new entry is built. Entries are memory-mapped ``.npy`` files in
float16, written in chunks with a progress file, so an interrupted caching run resumes where
it stopped, and readers never see a half-written entry (``complete`` is set last).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .encoders import compact_units
from .io import atomic_write

FEATURE_DTYPE = np.float16


def content_key(image_ids, captions, caption_image) -> str:
    h = hashlib.sha256()
    for value in image_ids:
        h.update(str(value).encode() + b"\0")
    h.update(b"\1")
    for caption, owner in zip(captions, caption_image):
        h.update(f"{int(owner)}\t{caption}".encode() + b"\0")
    return h.hexdigest()


def backbone_key(config) -> dict:
    """The parts of a config that determine backbone features (not the trainable head)."""
    key = {
        "image_encoder": config.image_encoder,
        "image_backbone": config.image_backbone if config.image_encoder == "timm" else None,
        "image_weights": config.image_weights,
        "image_size": config.image_size,
        "image_mean": list(config.image_mean or []),
        "image_std": list(config.image_std or []),
        "text_encoder": config.text_encoder,
        "text_model": config.text_model,
        "max_text_length": config.max_text_length,
        "format": 1,
    }
    if config.text_finetune_layers:  # hidden states below the trained top layers
        key["text_layers_left_out"] = config.text_finetune_layers
    if config.image_context_stage is not None:  # regions carry an earlier stage's features too
        key["image_context_stage"] = config.image_context_stage
    return key


def feature_key(model) -> dict:
    """:func:`backbone_key` of the model's config, plus the image backbone's memory layout when it runs
    channels-last (``set_channels_last``): its features differ from the default layout's by float rounding, so
    the two never share an entry of images."""
    key = backbone_key(model.config)
    if getattr(model.image_backbone, "channels_last", False):
        key["channels_last"] = True
    return key


@dataclass
class CachedFeatures:
    """Memory-mapped features of one split: image regions and caption tokens with masks."""

    images: np.ndarray  # [N, K, F] float16
    image_mask: np.ndarray  # [N, K] bool
    texts: np.ndarray  # [C, L, F] float16
    text_mask: np.ndarray  # [C, L] bool; int8 token kinds with text_finetune_layers (see cacheable_text_features)
    directory: Path
    # text_context_layer: that layer's hidden states of every token [C, T, F] and their int8 token
    # kinds [C, T], an entry of their own (:func:`cache_text_layer`)
    text_context: np.ndarray | None = None
    text_context_mask: np.ndarray | None = None

    def image_batch(self, index, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.asarray(index)
        return (torch.from_numpy(np.ascontiguousarray(self.images[index])).to(device, torch.float32),
                torch.from_numpy(np.ascontiguousarray(self.image_mask[index])).to(device))

    def text_batch(self, index, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return _caption_rows(self.texts, self.text_mask, index, device)

    def text_context_batch(self, index, device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The context layer's token states and kinds of captions ``index`` (None: not cached)."""
        if self.text_context is None:
            return None
        return _caption_rows(self.text_context, self.text_context_mask, index, device)


def _caption_rows(features: np.ndarray, masks: np.ndarray, index, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``index`` of cached caption features and their masks, cut to the batch's longest caption."""
    index = np.asarray(index)
    mask = masks[index]
    width = max(1, int(mask.any(0).nonzero()[0].max()) + 1) if mask.any() else 1
    return (torch.from_numpy(np.ascontiguousarray(features[index, :width])).to(device, torch.float32),
            torch.from_numpy(np.ascontiguousarray(mask[:, :width])).to(device))


def cacheable_text_features(model, texts) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache stores for captions: the model's ``text_features``; with
    ``text_finetune_layers``, the frozen lower layers' hidden states of every token [N, T, F] and
    a token mask [N, T] int8 (0 padding, 1 special token, 2 word), which :func:`text_units_from_cache`
    turns into word features through the trained top layers."""
    if not model.config.text_finetune_layers:  # the last layer's word features (a context layer is cached apart)
        feats, mask = model.text_features(texts)
        return feats[..., :model.config.text_feature_dim], mask
    return _token_states(model, texts, model.text_backbone.lower)


def _token_states(model, texts, states) -> tuple[torch.Tensor, torch.Tensor]:
    """``states(input_ids, attention_mask)`` [N, T, F] of the tokenised ``texts`` (every token) and
    their kinds [N, T] int8: 0 padding, 1 special token, 2 word."""
    tok = {k: v.to(model.device) for k, v in model.processor.tokenize(texts).items()}
    hidden = states(tok["input_ids"], tok["attention_mask"])
    return hidden, tok["attention_mask"].to(torch.int8) + tok["word_mask"].to(torch.int8)


def text_units_from_cache(model, features: torch.Tensor, mask: torch.Tensor,
                          context: tuple[torch.Tensor, torch.Tensor] | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached caption features to word features [N, L, F] and word mask: as cached, or through the
    trained top layers of the text encoder (``text_finetune_layers``), with gradients when enabled.
    A model with ``text_context_layer`` gets that layer's word states beside them ([N, L, 2F], as
    its ``text_features``), from ``context`` (:meth:`CachedFeatures.text_context_batch`)."""
    if model.config.text_finetune_layers:
        hidden = model.text_backbone.upper(features, (mask > 0).long())
        features, mask = compact_units(hidden, mask == 2)
    if model.config.text_context_layer is None:
        return features, mask
    if context is None:
        raise ValueError("this model's context level reads a layer of its text encoder "
                         f"(text_context_layer={model.config.text_context_layer}) that the feature cache was not given")
    words, _ = compact_units(context[0], context[1] == 2)
    if words.shape[:2] != features.shape[:2]:
        raise ValueError(f"cached context-layer states of {tuple(words.shape[:2])} words do not line up with "
                         f"the captions' {tuple(features.shape[:2])}")
    return torch.cat([features, words], -1), mask


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


@torch.no_grad()
def cache_features(model, images, captions, image_ids, caption_image, cache_dir: str | os.PathLike,
                   image_batch_size: int = 32, text_batch_size: int = 256, progress: bool = True) -> CachedFeatures:
    """Compute (or reuse) backbone features of a split. ``images``: list of PIL images or paths
    (for a precomputed-features model, an array [N, K, F] that is cached as is). A model with
    ``text_context_layer`` also gets that layer's states, from an entry of their own."""
    cached = _open(_cache_split(model, images, captions, image_ids, caption_image, cache_dir, image_batch_size,
                                text_batch_size, progress))
    if model.config.text_context_layer is not None:
        cached.text_context, cached.text_context_mask = cache_text_layer(model, captions, caption_image, cache_dir,
                                                                         text_batch_size, progress)
    return cached


def _cache_split(model, images, captions, image_ids, caption_image, cache_dir, image_batch_size: int,
                 text_batch_size: int, progress: bool) -> Path:
    """The folder of the split's entry (images and word features), filled where it is not yet."""
    config = model.config
    key_data = {"backbone": feature_key(model), "data": content_key(image_ids, captions, caption_image)}
    directory, state = _entry(cache_dir, key_data)
    if state.get("complete"):
        return directory
    n_images, n_texts = len(image_ids), len(captions)
    model_was_training = model.training
    model.eval()
    sides = (
        ("images", _image_shape(model, images, n_images), image_batch_size,
         lambda a, b: model.image_features(images[a:b]), "img", np.bool_),
        ("texts", (n_texts, config.max_text_length, config.text_feature_dim), text_batch_size,
         lambda a, b: cacheable_text_features(model, list(captions[a:b])), "cap",
         np.int8 if config.text_finetune_layers else np.bool_),  # token kinds below a trained top
    )
    for name, shape, batch_size, compute, unit, mask_dtype in sides:
        _fill(directory, state, name, shape, batch_size, compute, unit, mask_dtype, progress)
    state["complete"] = True
    _write_json(directory / "progress.json", state)
    model.train(model_was_training)
    return directory


@torch.no_grad()
def cache_text_layer(model, captions, caption_image, cache_dir: str | os.PathLike, batch_size: int = 256,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The hidden states after the text encoder's ``text_context_layer`` of every token [C, T, F]
    and their kinds [C, T] int8 (0 padding, 1 special token, 2 word), memory maps of a cache entry
    of their own: keyed like the split's features plus the layer, so the entry of the images and
    the other text features is shared with models that read no such layer."""
    config = model.config
    layer = config.text_context_layer
    key_data = {"backbone": backbone_key(config), "data": content_key([], captions, caption_image),
                "text_layer": layer}
    directory, state = _entry(cache_dir, key_data)
    if not state.get("complete"):
        was_training = model.training
        model.eval()
        _fill(directory, state, "texts", (len(captions), config.max_text_length, config.text_feature_dim), batch_size,
              lambda a, b: _token_states(model, list(captions[a:b]), model.text_backbone.context_hidden),
              f"cap (layer {layer})", np.int8, progress)
        state["complete"] = True
        _write_json(directory / "progress.json", state)
        model.train(was_training)
    return np.load(directory / "texts.npy", mmap_mode="r"), np.load(directory / "text_mask.npy", mmap_mode="r")


def _entry(cache_dir, key_data: dict) -> tuple[Path, dict]:
    """The folder of the cache entry ``key_data`` names, and its progress so far."""
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:20]
    directory = Path(cache_dir) / key
    directory.mkdir(parents=True, exist_ok=True)
    state_path = directory / "progress.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if not state.get("complete"):
        (directory / "key.json").write_text(json.dumps(key_data, indent=1, sort_keys=True))
    return directory, state


def _image_shape(model, images, n_images: int) -> tuple[int, int, int]:
    """[N, K, F] of the cached image features: the backbone's grid, or the precomputed regions'."""
    config = model.config
    if config.image_encoder == "timm":
        grid = model.image_grid()
        regions = grid[0] * grid[1] if grid else None
        if regions is None:
            probe, _ = model.image_features(images[:1])
            regions = probe.shape[1]
    else:
        regions = np.asarray(images[0]).shape[0]
    return n_images, regions, config.image_feature_dim + (config.image_context_dim or 0)


def _fill(directory: Path, state: dict, name: str, shape, batch_size: int, compute, unit: str, mask_dtype,
          progress: bool) -> None:
    """Compute the rows of ``name``.npy (and its mask) that ``state`` does not count as done yet."""
    state_path = directory / "progress.json"
    feats_out = _memmap(directory / f"{name}.npy", shape, FEATURE_DTYPE, state)
    mask_out = _memmap(directory / f"{name[:-1]}_mask.npy", shape[:2], mask_dtype, state)
    done = int(state.get(f"{name}_done", 0))
    bar = tqdm(total=shape[0], initial=done, desc=f"cache {name[:-1]} features", unit=unit, disable=not progress)
    while done < shape[0]:
        stop = min(done + batch_size, shape[0])
        feats, mask = compute(done, stop)
        width = feats.shape[1]  # captions come padded to their batch's longest
        feats_out[done:stop, :width] = feats.cpu().numpy().astype(FEATURE_DTYPE)
        feats_out[done:stop, width:] = 0
        mask_out[done:stop, :width] = mask.cpu().numpy()
        mask_out[done:stop, width:] = False
        feats_out.flush(), mask_out.flush()
        done = stop
        state[f"{name}_done"] = done  # progress is written after the data it counts
        _write_json(state_path, state)
        bar.update(stop - bar.n)
    bar.close()


def _memmap(path: Path, shape, dtype, state) -> np.ndarray:
    resuming = path.exists() and state.get(path.name) == list(shape)
    if resuming:
        return np.load(path, mmap_mode="r+")
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    state[path.name] = list(shape)
    return array


def _open(directory: Path) -> CachedFeatures:
    return CachedFeatures(
        images=np.load(directory / "images.npy", mmap_mode="r"),
        image_mask=np.load(directory / "image_mask.npy", mmap_mode="r"),
        texts=np.load(directory / "texts.npy", mmap_mode="r"),
        text_mask=np.load(directory / "text_mask.npy", mmap_mode="r"),
        directory=directory,
    )
