"""--augment-views: other real looks at each training photo (a mirror, crops), cached once like the
photo itself and drawn per image per step.

The unit tests use EfficientNet-Lite0 with random weights and the BiGRU text encoder; the
training test runs the trainer on a folder of random photos with the offline pretrained backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_train import _photo_folder, data, run, train_cmd  # noqa: F401  (the precomp fixture)
from tshsr import TSHSRConfig, TSHSRModel
from tshsr.views import ImageViews, cache_image_view, crop_box, mirror_safe, view_image, view_names
from tshsr_train.args import parse_args


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, size=(60 + 10 * i, 80, 3), dtype=np.uint8)) for i in range(3)]


@pytest.fixture(scope="module")
def model(vocab) -> TSHSRModel:
    torch.manual_seed(0)
    config = TSHSRConfig.preset("flat", text_encoder="bigru", vocab_size=len(vocab), embed_dim=32, sim_dim=16,
                                image_size=96)
    return TSHSRModel(config, vocabulary=vocab, pretrained_backbones=False).eval()


def test_view_names_and_crops_are_fixed_by_the_image_id() -> None:
    assert view_names(0) == [] and view_names(1) == ["hflip"] and view_names(3) == ["hflip", "crop1", "crop2"]
    with pytest.raises(ValueError):
        view_names(-1)
    boxes = [crop_box((400, 300), f"img{i}.jpg", "crop1") for i in range(50)]
    assert boxes[0] == crop_box((400, 300), "img0.jpg", "crop1")  # a resumed cache draws the same box
    assert crop_box((400, 300), "img0.jpg", "crop2") != boxes[0]  # each crop view is another box
    assert len(set(boxes)) == 50
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= 400 and 0 <= top < bottom <= 300
        assert 0.5 - 0.02 <= (right - left) * (bottom - top) / (400 * 300) <= 1.0
        assert 3 / 4 - 0.02 <= (right - left) / (bottom - top) <= 4 / 3 + 0.02
    left, top, right, bottom = crop_box((2000, 3), "strip.jpg", "crop1")  # no box of the ratio fits: centred
    assert 0 <= left < right <= 2000 and 0 <= top < bottom <= 3


def test_a_view_is_the_mirrored_or_cropped_photo(photos) -> None:
    photo = photos[0]
    mirrored = np.asarray(view_image(photo, "hflip", "a"))
    assert np.array_equal(mirrored, np.asarray(photo)[:, ::-1])
    cropped = view_image(photo, "crop1", "a")
    left, top, right, bottom = crop_box(photo.size, "a", "crop1")
    assert np.array_equal(np.asarray(cropped), np.asarray(photo)[top:bottom, left:right])
    with pytest.raises(ValueError, match="unknown image view"):
        view_image(photo, "rotate", "a")


def test_captions_that_say_left_or_right_keep_their_image_unmirrored() -> None:
    captions = ["A dog turns left .", "A dog runs .", "The man on the RIGHT waves", "a bright light", "Leftover food"]
    safe = mirror_safe(captions, [0, 1, 2, 3, 4], 6)
    assert safe.tolist() == [False, True, False, True, True, True]  # whole words only


def test_cached_views_are_the_backbone_features_of_the_views(model, photos, tmp_path) -> None:
    ids = ["a.jpg", "b.jpg", "c.jpg"]
    feats, mask = cache_image_view(model, photos, ids, "hflip", tmp_path, batch_size=2, progress=False)
    expected, expected_mask = model.image_features([view_image(p, "hflip", i) for p, i in zip(photos, ids)])
    np.testing.assert_allclose(feats, expected.numpy().astype(np.float16), rtol=1e-3, atol=1e-3)
    assert np.array_equal(mask, expected_mask.numpy())
    crops, _ = cache_image_view(model, photos, ids, "crop1", tmp_path, progress=False)
    assert not np.allclose(crops, feats)
    assert len(list(tmp_path.iterdir())) == 2  # an entry a view
    again, _ = cache_image_view(model, photos, ids, "hflip", tmp_path, progress=False)
    assert np.array_equal(again, feats) and len(list(tmp_path.iterdir())) == 2  # reused, not recomputed


def test_each_image_is_shown_as_one_view_and_unsafe_images_never_mirrored() -> None:
    base = np.zeros((4, 2, 3), np.float16)
    views = {"hflip": (np.ones((4, 2, 3), np.float16), np.ones((4, 2), bool)),
             "crop1": (np.full((4, 2, 3), 2, np.float16), np.ones((4, 2), bool))}
    source = ImageViews(base, np.ones((4, 2), bool), views, mirror_ok=np.array([True, False, True, True]))
    generator = torch.Generator().manual_seed(0)
    seen = {i: set() for i in range(4)}
    for _ in range(200):
        feats, mask = source.batch([3, 1, 0], generator)
        assert feats.dtype == torch.float32 and mask.all()
        for row, image in zip(feats, [3, 1, 0]):
            assert len(row.unique()) == 1  # one view per image
            seen[image].add(int(row[0, 0]))
    assert seen[3] == {0, 1, 2} and seen[0] == {0, 1, 2}
    assert seen[1] == {0, 2}  # its captions say left or right: the mirror is replaced by the photo


def test_the_flag_is_checked_and_needs_cached_photos(data, tmp_path) -> None:  # noqa: F811
    assert parse_args(["--augment-views", "2"]).augment_views == 2
    with pytest.raises(SystemExit):
        parse_args(["--augment-views", "-1"])
    result = run(train_cmd(data, tmp_path / "run", "--epochs", "1", "--augment-views", "1"))
    assert result.returncode != 0 and "--augment-views needs" in result.stderr


@pytest.mark.slow
def test_a_run_trains_on_the_views_and_resumes_with_the_same_draws(tmp_path, monkeypatch) -> None:
    """Three cache entries besides the captions' (photo, mirror, crop), the card records the flag,
    and a run stopped after step 1 and resumed ends with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    from tshsr_train import TrainArgs, run as train

    photos = _photo_folder(tmp_path / "photos")
    common = dict(dataset="imagefolder", data_dir=str(photos), val_split=None, text_encoder="bigru", batch_size=4,
                  epochs=1, embed_dim=32, sim_dim=16, cache_dir=str(tmp_path / "cache"), progress=False, threads=1,
                  checkpoint_every=1, augment_views=2)
    batches = []
    real_batch = ImageViews.batch
    monkeypatch.setattr(ImageViews, "batch", lambda self, *a, **k: batches.append(a[0]) or real_batch(self, *a, **k))
    train(TrainArgs(**common, output_dir=str(tmp_path / "whole"), max_steps=3))
    assert len(batches) == 3  # every training step drew its images' views
    keys = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/key.json")]
    assert sorted(k.get("view", "original") for k in keys) == ["crop1", "hflip", "original"]
    assert "--augment-views 2" in (tmp_path / "whole" / "README.md").read_text()
    train(TrainArgs(**common, output_dir=str(tmp_path / "resumed"), max_steps=1))
    train(TrainArgs(**common, output_dir=str(tmp_path / "resumed"), max_steps=3, resume=True))
    whole, resumed = (load_file(str(tmp_path / name / "checkpoint" / "weights.safetensors"))
                      for name in ("whole", "resumed"))
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-4, atol=1e-5, msg=key)
