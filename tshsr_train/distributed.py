"""Several processes (``torchrun``): the process group, and the loss over the global batch.

Each rank encodes its own share of the batch; :class:`GlobalBatchLoss` gathers the encodings of
every rank (units, masks, pooled and contrastive vectors: what the contrastive loss, the mining
of candidates and the cross-attention hinge read), so every rank computes the loss of the whole
global batch, as one process with ``world x`` the batch would. The candidate pairs of the hinge
(the costly part: cross-attention per pair) are split: rank r scores the r-th share and the
scores are gathered.

Why the gradients equal those of one process with the big batch, L being the global loss and
DDP taking the *mean* of the ranks' gradients:

* the contrastive (and alignment) terms read the gathered encodings of which only the local part
  keeps its graph (open_clip's ``gather_features`` with ``local_loss=False,
  gather_with_grad=False``): a rank's encoders get the part ``dL/df_r df_r/dtheta`` of the
  gradient, the sum over ranks is dL/dtheta, so the local encodings pass ``world x`` their
  gradient back (:class:`_ScaleGrad`, identity forward); the temperature, used directly, gets
  the full gradient on every rank, whose mean is itself;
* the hinge reads every pair's score, of which only the rank's share keeps its graph, scaled by
  ``world``: the head's parameters get ``world x`` the share's part, whose mean over ranks is
  the whole. A share's pairs involve other ranks' encodings, so the pair scorer reads encodings
  gathered *with* their graph (:class:`_SumGather`: backward sums the gradient over ranks and
  returns the local rows): each encoding receives ``world x`` its whole hinge gradient.

The images of the global batch are deduplicated and sorted by index, and the captions keep the
trainer's order, so the matrices, the mined candidates and the random negatives (one generator
seed per step, the same on every rank) are those of the single process.
"""

from __future__ import annotations

import os
from dataclasses import fields
from datetime import timedelta
from types import SimpleNamespace

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


class _SumGather(torch.autograd.Function):
    """All ranks' rows concatenated, differentiable everywhere: backward sums the gradient over
    the ranks and returns the local rows' part (a reduce-scatter through all_reduce, which every
    backend has)."""

    @staticmethod
    def forward(ctx, local, buffers, rows, offset):
        ctx.offset, ctx.n = offset, local.shape[0]
        return torch.cat([b[:n] for b, n in zip(buffers, rows)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.offset:ctx.offset + ctx.n], None, None, None


def gather_rows(tensor: torch.Tensor, world: int, rank: int, width_axes: tuple[int, ...] = (),
                local_grad_scale: float | None = None, summed: bool = False) -> torch.Tensor:
    """All ranks' ``tensor`` concatenated on axis 0 (rows may differ per rank; ``width_axes`` are
    padded with zeros to the widest rank). The local rows keep their graph, scaled in backward by
    ``local_grad_scale``; the others are plain values. ``summed``: every row keeps its graph
    across ranks instead (:class:`_SumGather`)."""
    sizes = torch.tensor([tensor.shape[0], *[tensor.shape[a] for a in width_axes]], device=tensor.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    all_sizes = torch.stack(all_sizes).cpu()
    rows = int(all_sizes[:, 0].max())
    widths = {a: int(all_sizes[:, 1 + i].max()) for i, a in enumerate(width_axes)}
    local = _pad_to(tensor, tensor.shape[0], widths)
    buffers = [torch.empty((rows, *local.shape[1:]), dtype=local.dtype, device=local.device) for _ in range(world)]
    dist.all_gather(buffers, _pad_to(local.detach(), rows, widths).contiguous())
    rows_of = [int(n) for n in all_sizes[:, 0]]
    if summed and local.requires_grad:
        buffers[rank] = _pad_to(local, rows, widths)  # the local rows with their graph
        return _SumGather.apply(local, buffers, rows_of, sum(rows_of[:rank]))
    if local_grad_scale is not None and local.requires_grad:
        local = _ScaleGrad.apply(local, local_grad_scale)
    parts = [local if r == rank else buffers[r][:rows_of[r]] for r in range(world)]
    return torch.cat(parts)


# Which axes of an Encoding field run over units (padded to the longest caption of any rank).
_UNIT_AXES = {"units": (1,), "mask": (1,), "membership": (2,)}


def gather_encoding(encoding, world: int, rank: int, summed: bool = False):
    values = {}
    for f in fields(encoding):
        value = getattr(encoding, f.name)
        if value is not None:
            is_mask = value.dtype == torch.bool
            value = gather_rows(value.to(torch.uint8) if is_mask else value, world, rank, _UNIT_AXES.get(f.name, ()),
                                local_grad_scale=float(world), summed=summed)
            value = value.bool() if is_mask else value
        values[f.name] = value
    return type(encoding)(**values)


class _ShardedPairs:
    """``score_pairs`` over the global batch with the pairs split between the ranks: rank r scores
    the r-th contiguous share from encodings gathered with their graph; the scores, stream and
    level scores of all shares are gathered, the local share's graph scaled by ``world``."""

    def __init__(self, model, images, texts, world: int, rank: int):
        self.model, self.images, self.texts, self.world, self.rank = model, images, texts, world, rank

    def __call__(self, images, texts, image_index, text_index, return_attention: bool = False):
        n = len(image_index)
        start, end = n * self.rank // self.world, n * (self.rank + 1) // self.world
        out = self.model.score_pairs(self.images, self.texts, image_index[start:end], text_index[start:end])

        def gather(values):
            return gather_rows(values, self.world, self.rank, local_grad_scale=float(self.world))

        return SimpleNamespace(scores=gather(out.scores),
                               stream_scores={k: gather(v) for k, v in out.stream_scores.items()},
                               level_scores={k: gather(v) for k, v in out.level_scores.items()})


class _ModelWithPairScorer:
    """The model as the loss sees it, with ``score_pairs`` replaced (everything else delegated)."""

    def __init__(self, model, score_pairs):
        self._model, self.score_pairs = model, score_pairs

    def __getattr__(self, name):
        return getattr(self._model, name)


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
        local_images = model.encode_image_features(image_features, image_mask)
        local_texts = model.encode_text_features(text_features, text_mask)
        images = gather_encoding(local_images, world, rank)
        texts = gather_encoding(local_texts, world, rank)
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
        pairs = _ShardedPairs(model, gather_encoding(local_images, world, rank, summed=True)[first],
                              gather_encoding(local_texts, world, rank, summed=True), world, rank)
        return matching_loss(_ModelWithPairScorer(model, pairs), images, texts, positive, settings, hardest,
                             generator)
