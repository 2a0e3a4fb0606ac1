"""Several processes (``torchrun``): the process group, and the loss over the global batch.

Each rank encodes its own share of the batch; :class:`GlobalBatchLoss` gathers the encodings of
every rank (units, masks, pooled and contrastive vectors: what the contrastive loss, the mining
of candidates and the cross-attention hinge read), so every rank computes the loss of the whole
global batch, as one process with ``world x`` the batch would. Only the local part keeps its
graph (open_clip's ``gather_features`` with ``local_loss=False, gather_with_grad=False``).

Why the gradients equal those of one process with the big batch, L being the global loss:

* a rank's encoder and backbone parameters reach L only through its local encodings, so their
  gradient on rank r is the part ``dL/df_r df_r/dtheta``; summed over ranks that is dL/dtheta,
  but DDP takes the *mean*, so the local encodings pass ``world x`` their gradient back
  (:class:`_ScaleGrad`, identity forward);
* parameters used directly by the loss (the temperature, the similarity head scoring every
  candidate pair) get the full dL/dtheta on every rank; the mean of identical values is that.

The images of the global batch are deduplicated and sorted by index, and the captions keep the
trainer's order, so the matrices, the mined candidates and the random negatives (one generator
seed per step, the same on every rank) are those of the single process. The cost: the hinge's
pair scoring is repeated on every rank (as in one process with the big batch); the backbones and
per-side encoders, the bulk of a fine-tuning step, are split.
"""

from __future__ import annotations

import os
from dataclasses import fields
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tshsr.loss import matching_loss


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device: torch.device, timeout_min: float = 60.0) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); the timeout covers
    rank 0 building the feature cache while the others wait at a barrier."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_min), **kwargs)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (see the module doc)."""

    @staticmethod
    def forward(ctx, tensor, factor):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _pad_to(tensor: torch.Tensor, rows: int, dims: dict[int, int]) -> torch.Tensor:
    """Zero-pad ``tensor`` to ``rows`` on axis 0 and to ``dims[axis]`` on the other axes named."""
    pad = []
    for axis in range(tensor.dim() - 1, -1, -1):
        target = rows if axis == 0 else dims.get(axis, tensor.shape[axis])
        pad += [0, target - tensor.shape[axis]]
    return F.pad(tensor, pad) if any(pad) else tensor


def gather_rows(tensor: torch.Tensor, world: int, rank: int, width_axes: tuple[int, ...] = (),
                local_grad_scale: float | None = None) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated on axis 0 (rows may differ per rank; ``width_axes`` are
    padded with zeros to the widest rank). The local rows keep their graph, scaled in backward by
    ``local_grad_scale``; the others are plain values."""
    sizes = torch.tensor([tensor.shape[0], *[tensor.shape[a] for a in width_axes]], device=tensor.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    all_sizes = torch.stack(all_sizes).cpu()
    rows = int(all_sizes[:, 0].max())
    widths = {a: int(all_sizes[:, 1 + i].max()) for i, a in enumerate(width_axes)}
    local = _pad_to(tensor, tensor.shape[0], widths)
    buffers = [torch.empty((rows, *local.shape[1:]), dtype=local.dtype, device=local.device) for _ in range(world)]
    dist.all_gather(buffers, _pad_to(local.detach(), rows, widths).contiguous())
    if local_grad_scale is not None and local.requires_grad:
        local = _ScaleGrad.apply(local, local_grad_scale)
    parts = [local if r == rank else buffers[r][:int(all_sizes[r, 0])] for r in range(world)]
    return torch.cat(parts)


# Which axes of an Encoding field run over units (padded to the longest caption of any rank).
_UNIT_AXES = {"units": (1,), "mask": (1,), "membership": (2,)}


def gather_encoding(encoding, world: int, rank: int):
    values = {}
    for f in fields(encoding):
        value = getattr(encoding, f.name)
        if value is not None:
            is_mask = value.dtype == torch.bool
            value = gather_rows(value.to(torch.uint8) if is_mask else value, world, rank, _UNIT_AXES.get(f.name, ()),
                                local_grad_scale=float(world))
            value = value.bool() if is_mask else value
        values[f.name] = value
    return type(encoding)(**values)


class GlobalBatchLoss(nn.Module):
    """The module DDP wraps: encode the local share, gather the global batch, return the model's
    loss (:func:`tshsr.loss.matching_loss`) of the whole global batch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image_features, image_mask, text_features, text_mask, image_index, caption_image,
                settings, hardest: bool, generator: torch.Generator):
        rank, world = dist_info()
        model = self.model
        images = gather_encoding(model.encode_image_features(image_features, image_mask), world, rank)
        texts = gather_encoding(model.encode_text_features(text_features, text_mask), world, rank)
        image_index = gather_rows(image_index.to(image_mask.device), world, rank)
        caption_image = gather_rows(caption_image.to(image_mask.device), world, rank)
        # An image in two ranks' shares is one image of the global batch: keep its first copy
        # (rank order), in ascending index order as the single process has them.
        unique, inverse = torch.unique(image_index, return_inverse=True)
        order = torch.arange(len(image_index), device=image_index.device)
        first = torch.full((len(unique),), len(image_index), device=image_index.device, dtype=order.dtype)
        first = first.scatter_reduce(0, inverse, order, reduce="amin")
        images = images[first]
        positive = unique.unsqueeze(1) == caption_image.unsqueeze(0)
        return matching_loss(model, images, texts, positive, settings, hardest, generator)
