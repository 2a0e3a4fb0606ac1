"""The live image pipeline: same batches with and without workers, resumable mid-epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tshsr.config import TSHSRConfig
from tshsr.data import ImageCaptionSplit
from tshsr.pipeline import StepBatchSampler, epoch_caption_order, image_batch_loader, normalize_pixels
from tshsr.processing import TSHSRProcessor

N_IMAGES = 10
SIZE = 16


@pytest.fixture()
def split(tmp_path: Path) -> ImageCaptionSplit:
    rng = np.random.default_rng(0)
    paths, groups = [], []
    for i in range(N_IMAGES):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
        groups.append(1 + i % 3)  # unequal caption counts
    caption_image = np.repeat(np.arange(N_IMAGES), groups)
    return ImageCaptionSplit(name="toy", image_ids=[f"i{i}" for i in range(N_IMAGES)],
                             captions=[f"c{j}" for j in range(len(caption_image))],
                             caption_image=caption_image, image_refs=paths, source="test")


@pytest.fixture()
def processor() -> TSHSRProcessor:
    config = TSHSRConfig.preset("tshsr", image_size=SIZE, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3))
    return TSHSRProcessor(config)


def _collect(loader) -> list[dict]:
    return [{"step": b["step"], "index": b["index"].clone(), "pixels": b["pixels"].clone()} for b in loader]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["step"] == y["step"] and torch.equal(x["index"], y["index"]) and torch.equal(x["pixels"], y["pixels"])
        for x, y in zip(a, b))


def test_batches_match_the_trainer_and_the_models_preprocessing(split, processor) -> None:
    loader = image_batch_loader(split, processor, batch_size=4, seed=3, num_workers=0)
    batches = _collect(loader)
    sampler = loader.batch_sampler
    assert len(batches) == sampler.steps_per_epoch == len(split.captions) // 4
    order = epoch_caption_order(len(split.captions), 3, 0)
    for step, batch in enumerate(batches):
        captions = order[step * 4:(step + 1) * 4]
        assert torch.equal(sampler.captions(step), captions)
        # The trainer's torch.unique(caption_image[captions]): sorted unique images of the step.
        assert torch.equal(batch["index"], torch.unique(torch.as_tensor(split.caption_image)[captions]))
        expected = processor.preprocess_images([split.images()[int(i)] for i in batch["index"]])
        # Workers hand over uint8; normalising on the device gives exactly the model's input.
        assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape[1:] == (3, SIZE, SIZE)
        assert torch.equal(normalize_pixels(batch["pixels"], processor), expected)
    floats = _collect(image_batch_loader(split, processor, batch_size=4, seed=3, num_workers=0, uint8=False))
    assert all(torch.equal(f["pixels"], normalize_pixels(b["pixels"], processor.config))
               for f, b in zip(floats, batches))


def test_same_seed_same_batches_with_0_and_2_workers(split, processor) -> None:
    serial = _collect(image_batch_loader(split, processor, batch_size=3, seed=7, epoch=2, num_workers=0))
    parallel = _collect(image_batch_loader(split, processor, batch_size=3, seed=7, epoch=2, num_workers=2,
                                           prefetch_factor=2, persistent_workers=False))
    assert _same(serial, parallel)
    other_seed = _collect(image_batch_loader(split, processor, batch_size=3, seed=8, epoch=2, num_workers=0))
    assert not _same(serial, other_seed)


def test_order_depends_only_on_seed_and_epoch(split, processor) -> None:
    loader = image_batch_loader(split, processor, batch_size=3, seed=1, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in (0, 1, 0):  # persistent workers, epochs changed through the sampler
        loader.batch_sampler.set_epoch(epoch)
        epochs.append(_collect(loader))
    assert _same(epochs[0], epochs[2])
    assert [b["index"].tolist() for b in epochs[0]] != [b["index"].tolist() for b in epochs[1]]
    fresh = _collect(image_batch_loader(split, processor, batch_size=3, seed=1, epoch=1, num_workers=0))
    assert _same(epochs[1], fresh)


def test_resume_mid_epoch_is_the_tail_and_decodes_nothing_skipped(split, processor) -> None:
    full = _collect(image_batch_loader(split, processor, batch_size=2, seed=5, epoch=1, num_workers=0, uint8=False))
    decoded: list[str] = []

    def counting(images):
        decoded.extend(str(i) for i in images)
        return processor.preprocess_images(images)

    k = 3
    resumed = _collect(image_batch_loader(split, processor, batch_size=2, seed=5, epoch=1, start_step=k,
                                          num_workers=0, preprocess=counting))
    assert _same(resumed, full[k:]) and resumed[0]["step"] == k
    assert len(decoded) == sum(len(b["index"]) for b in full[k:])  # the first k steps were never read
    resumed_workers = _collect(image_batch_loader(split, processor, batch_size=2, seed=5, epoch=1, start_step=k,
                                                  num_workers=2, persistent_workers=False, uint8=False))
    assert _same(resumed_workers, full[k:])


def test_ranks_split_each_step_like_the_trainer(split) -> None:
    world = 2
    samplers = [StepBatchSampler(split.caption_image, 3, seed=4, rank=r, world=world) for r in range(world)]
    order = epoch_caption_order(len(split.captions), 4, 0)
    assert samplers[0].steps_per_epoch == len(split.captions) // (3 * world)
    for step in range(samplers[0].steps_per_epoch):
        both = torch.cat([s.captions(step) for s in samplers])
        assert torch.equal(both, order[step * 6:(step + 1) * 6])
    with pytest.raises(ValueError, match="start_step"):
        samplers[0].set_epoch(0, start_step=samplers[0].steps_per_epoch + 1)


def test_precomputed_splits_are_refused() -> None:
    regions = np.zeros((2, 3, 4), dtype=np.float32)
    split = ImageCaptionSplit(name="pre", image_ids=["a", "b"], captions=["x", "y"], caption_image=[0, 1],
                              regions=regions, source="precomp")
    with pytest.raises(ValueError, match="precomputed region features"):
        image_batch_loader(split, object(), batch_size=2)
