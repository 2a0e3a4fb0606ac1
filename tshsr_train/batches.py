"""Where a training step's backbone features come from: the feature cache (frozen backbones, with
augmented views when asked for), or the backbone itself run live with gradients (fine-tuning)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from tshsr.model import TSHSRModel

from .args import TrainArgs
from .distributed import dist_info


def _rank0_first(build, progress: bool):
    """``build(show_progress)`` of a cache: rank 0 writes it while the other processes wait, then
    they open the finished entry (a single process just builds it)."""
    rank, world = dist_info()
    result = None
    for turn in ([0, 1] if world > 1 else [0]):
        if (rank == 0) == (turn == 0):
            result = build(progress and rank == 0)
        if world > 1:
            dist.barrier()
    return result


class BatchSource:
    """Backbone features of a split for training: from the feature cache when the backbone is
    frozen, computed live (with gradients) when it is fine-tuned."""

    def __init__(self, model: TSHSRModel, split, cache_dir: str, progress: bool):
        self.model, self.split = model, split
        cfg = model.config
        self.live_images = cfg.finetune_image
        self.live_texts = cfg.finetune_text or cfg.text_encoder == "bigru"
        self.cached, self.views = None, None
        self.loader, self._batches = None, None
        if not (self.live_images and self.live_texts):
            from tshsr.features import cache_features

            images = split.regions if split.regions is not None else split.images()
            self.cached = _rank0_first(lambda show: cache_features(model, images, split.captions, split.image_ids,
                                                                   split.caption_image, cache_dir, progress=show),
                                       progress)

    def use_loader(self, args: TrainArgs) -> None:
        """Training images of a fine-tuned backbone come from DataLoader workers
        (:func:`tshsr.pipeline.image_batch_loader`), in the trainer's batch order."""
        if not self.live_images or self.split.regions is not None:
            return
        from tshsr.pipeline import image_batch_loader

        rank, world = dist_info()
        self.loader = image_batch_loader(self.split, self.model.processor, batch_size=args.batch_size, seed=args.seed,
                                         num_workers=args.num_workers, rank=rank, world=world)

    def use_views(self, args: TrainArgs, progress: bool) -> None:
        """``--augment-views``: cache the augmented views of the training images (a pass a view)."""
        if not args.augment_views:
            return
        if self.cached is None or self.live_images or self.split.regions is not None:
            raise SystemExit("--augment-views needs a frozen timm image backbone (not --finetune-image) and a dataset "
                             "of images (not precomputed region features)")
        from tshsr.views import ImageViews

        self.views = _rank0_first(lambda show: ImageViews.build(self.model, self.split, self.cached, args.augment_views,
                                                                args.cache_dir, progress=show), progress)

    def begin_epoch(self, epoch: int, start_step: int) -> None:
        if self.loader is not None:
            self.loader.batch_sampler.set_epoch(epoch, start_step=start_step)
            self._batches = iter(self.loader)

    def images(self, index, device, view_generator: torch.Generator | None = None):
        if self.views is not None and view_generator is not None:
            return self.views.batch(index, view_generator, device)
        if self.loader is not None and self._batches is not None:
            from tshsr.pipeline import normalize_pixels

            batch = next(self._batches)
            if not torch.equal(batch["index"], torch.as_tensor(np.asarray(index), dtype=torch.long)):
                raise RuntimeError(f"image loader out of step with the trainer at step {batch['step']}")
            pixels = normalize_pixels(batch["pixels"].to(self.model.device, non_blocking=True), self.model.config)
            return self.model.image_backbone(pixels)
        if self.live_images:
            if self.split.regions is not None:
                return self.model.image_features(self.split.regions[np.asarray(index)])
            return self.model.image_features(self.split.images(list(map(int, index))))
        return self.cached.image_batch(index, device)

    def texts(self, index, device):
        if self.live_texts:
            return self.model.text_features([self.split.captions[int(i)] for i in index])
        from tshsr.features import text_units_from_cache

        return text_units_from_cache(self.model, *self.cached.text_batch(index, device),
                                     context=self.cached.text_context_batch(index, device))


def drop_units(mask: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """``mask`` [N, n] with each valid unit hidden with probability ``p`` (``--unit-dropout``);
    an item that would lose every unit keeps its own mask. Drawn from the step's generator, so a
    resumed run hides the same units."""
    valid = mask.bool()
    kept = valid & (torch.rand(valid.shape, generator=generator) >= p).to(valid.device)
    empty = ~kept.any(dim=1)
    kept[empty] = valid[empty]
    return kept.to(mask.dtype)
