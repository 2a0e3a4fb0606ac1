"""Input pipeline for live (fine-tuned) image batches: decode and preprocess in DataLoader workers.

With a fine-tuned image backbone the training step needs pixels, not cached features. Decoding
and resizing them in the training process leaves the accelerator waiting on the CPU, so this
module moves that work into ``torch.utils.data.DataLoader`` workers, with pinned memory and
prefetching, while keeping the batches the trainer already draws:

* :class:`StepBatchSampler` reproduces the trainer's caption order exactly
  (``randperm(n_captions)`` seeded by ``seed * 1000 + epoch``; rank ``r`` of ``world`` takes
  captions ``[(step * world + r) * B, ... + B)``) and yields, per step, the sorted unique images of
  that step's captions, so batch ``k`` depends only on ``(seed, epoch, k, rank, world)``: the
  same with 0 or N workers, and resumable at step ``k`` of an epoch by simply not yielding the
  first ``k`` steps (nothing of them is read or decoded).
* :class:`SplitImageDataset` turns an image index of an :class:`~tshsr.data.ImageCaptionSplit`
  into ``(index, pixels)``, with the model's own preprocessing
  (:meth:`tshsr.processing.TSHSRProcessor.preprocess_images`: ``load_image`` + resize +
  normalise), so pixels are identical to what ``model.image_features(images)`` computes inline.
* :func:`image_batch_loader` builds the DataLoader. By default workers hand over the resized
  image as ``uint8`` and :func:`normalize_pixels` turns it into the model's input on the
  device: a quarter of the bytes through shared memory and over PCIe (the float transfer alone
  capped 2 workers at ~700 images/s on the 2-core development machine), with results
  bit-identical to ``processor.preprocess_images``.

How the trainer uses it (one loader per split, built once)::

    loader = image_batch_loader(split, model.processor, batch_size=args.batch_size, seed=args.seed,
                                num_workers=4, rank=rank, world=world)
    for epoch in range(start_epoch, args.epochs):
        loader.batch_sampler.set_epoch(epoch, start_step=resume_step if epoch == start_epoch else 0)
        for batch in loader:                      # batch["step"], batch["index"], batch["pixels"]
            captions = loader.batch_sampler.captions(batch["step"])   # the step's caption indices
            pixels = normalize_pixels(batch["pixels"].to(device, non_blocking=True), model.config)
            regions, mask = model.image_backbone(pixels)
            # batch["index"] == torch.unique(split.caption_image[captions]), in that order
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["SplitImageDataset", "StepBatchSampler", "epoch_caption_order", "image_batch_loader", "normalize_pixels",
           "resized_uint8"]


def epoch_caption_order(n_captions: int, seed: int, epoch: int) -> torch.Tensor:
    """The trainer's caption order for ``epoch``: a function of ``(seed, epoch)`` only."""
    return torch.randperm(n_captions, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


class StepBatchSampler(Sampler[list[int]]):
    """Per training step, the image indices (sorted, unique) of that step's captions.

    Yields lists of ``(step, image_index)`` pairs so that each collated batch knows its step;
    :meth:`captions` gives the step's caption indices without touching any image.
    """

    def __init__(self, caption_image: Sequence[int] | np.ndarray, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.caption_image = torch.as_tensor(np.asarray(caption_image, dtype=np.int64))
        self.batch_size, self.seed, self.rank, self.world = int(batch_size), int(seed), int(rank), int(world)
        self.epoch, self.start_step = 0, 0
        self._order: torch.Tensor | None = None

    @property
    def steps_per_epoch(self) -> int:
        # As the trainer counts them: every rank takes the same number of full batches.
        return max(1, len(self.caption_image) // (self.batch_size * self.world))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate ``epoch`` from step ``start_step`` (resume in the middle of an epoch)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps_per_epoch}")
        self.epoch, self.start_step, self._order = int(epoch), int(start_step), None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            self._order = epoch_caption_order(len(self.caption_image), self.seed, self.epoch)
        return self._order

    def captions(self, step: int) -> torch.Tensor:
        start = (int(step) * self.world + self.rank) * self.batch_size
        return self._epoch_order()[start:start + self.batch_size]

    def images(self, step: int) -> torch.Tensor:
        return torch.unique(self.caption_image[self.captions(step)])

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.steps_per_epoch):
            yield [(step, int(i)) for i in self.images(step)]


def resized_uint8(source: Any, size: int) -> torch.Tensor:
    """``[3, size, size]`` uint8: the model's loader and resize, before normalisation (the first
    half of :meth:`~tshsr.processing.TSHSRProcessor.preprocess_images`)."""
    from PIL import Image

    from .processing import load_image

    image = load_image(source).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize_pixels(pixels: torch.Tensor, config: Any) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` -> the backbone's normalised float input, on ``pixels``' device
    (the second half of ``preprocess_images``; float pixels pass through unchanged)."""
    if pixels.dtype != torch.uint8:
        return pixels
    config = getattr(config, "config", config)  # a processor or a model works too
    mean = torch.tensor(config.image_mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


class _ResizeOnly:
    """Picklable per-image preprocessing that stops before normalisation."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, images: list) -> torch.Tensor:
        return torch.stack([resized_uint8(image, self.size) for image in images])


class SplitImageDataset(Dataset):
    """``(step, index)`` -> ``(step, index, pixels [3, S, S])`` for an ImageCaptionSplit's images.

    ``preprocess`` maps a list of images (paths / PIL images) to a ``[N, 3, S, S]`` tensor; by
    default the processor's ``preprocess_images``. Only picklable state is kept (the split's
    image references and the processor), so workers can be forked or spawned.
    """

    def __init__(self, split: Any, processor: Any = None, preprocess: Callable[[list], torch.Tensor] | None = None,
                 uint8: bool = False):
        if getattr(split, "image_refs", None) is None:
            raise ValueError(f"{getattr(split, 'name', 'split')} holds precomputed region features, not images")
        if preprocess is None:
            if processor is None:
                raise ValueError("SplitImageDataset needs a processor (model.processor) or a preprocess function")
            if getattr(processor.config, "image_encoder", "timm") != "timm":
                raise ValueError("This model takes precomputed region features, not images")
            preprocess = _ResizeOnly(processor.config.image_size) if uint8 else processor.preprocess_images
        self.images = split.images()
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int] | int) -> tuple[int, int, torch.Tensor]:
        step, index = item if isinstance(item, tuple) else (-1, item)
        return step, int(index), self.preprocess([self.images[int(index)]])[0]


def _collate(samples: list[tuple[int, int, torch.Tensor]]) -> dict[str, Any]:
    steps = {s for s, _, _ in samples}
    if len(steps) != 1:
        raise RuntimeError(f"a batch mixes steps {sorted(steps)}")
    pixels = [p for _, _, p in samples]
    out = None
    if torch.utils.data.get_worker_info() is not None:
        # Stack straight into shared memory, as default_collate does, instead of copying after.
        first = pixels[0]
        storage = first._typed_storage()._new_shared(len(pixels) * first.numel(), device=first.device)
        out = first.new(storage).resize_(len(pixels), *first.shape)
    return {"step": samples[0][0], "index": torch.tensor([i for _, i, _ in samples], dtype=torch.long),
            "pixels": torch.stack(pixels, out=out)}


def _seed_worker(worker_id: int) -> None:
    # Any randomness a preprocess function adds (augmentation) follows the loader's generator.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def image_batch_loader(
    split: Any,
    processor: Any = None,
    *,
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    start_step: int = 0,
    num_workers: int = 2,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = 2,
    persistent_workers: bool | None = None,
    rank: int = 0,
    world: int = 1,
    preprocess: Callable[[list], torch.Tensor] | None = None,
    uint8: bool = True,
    multiprocessing_context: str | None = None,
) -> DataLoader:
    """A DataLoader of the live image batches of ``split``, one batch per training step.

    Each batch is ``{"step": int, "index": LongTensor[U], "pixels": Tensor[U, 3, S, S]}``, pixels
    resized ``uint8`` (``uint8=True``, the default: pass them through :func:`normalize_pixels`
    on the device) or already normalised floats (``uint8=False`` or a custom ``preprocess``).
    ``pin_memory`` defaults to CUDA being available; ``persistent_workers`` to having workers.
    Change epochs (and resume) with ``loader.batch_sampler.set_epoch(epoch, start_step)``.
    """
    sampler = StepBatchSampler(split.caption_image, batch_size, seed=seed, rank=rank, world=world)
    sampler.set_epoch(epoch, start_step)
    dataset = SplitImageDataset(split, processor, preprocess, uint8=uint8 and preprocess is None)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra["prefetch_factor"] = prefetch_factor
        extra["persistent_workers"] = True if persistent_workers is None else persistent_workers
        extra["worker_init_fn"] = _seed_worker
        if multiprocessing_context:
            extra["multiprocessing_context"] = multiprocessing_context
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed), **extra)
