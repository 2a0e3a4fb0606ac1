"""Every dataset schema read by load_split, built offline in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tshsr import data as data_module
from tshsr.data import ImageCaptionSplit, load_imagefolder_with_datasets, load_split

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared/data/flickr8k"

# Unequal caption counts on purpose: nothing may assume five captions per image.
CAPTIONS = [
    ["a red square", "something red"],
    ["a green square"],
    ["a blue square", "blue", "a blue thing"],
    ["a grey square", "grey"],
]
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)]


def _image(color: tuple[int, int, int], mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", (12, 10), color)
    return image.convert(mode) if mode != "RGB" else image


def _expected_caption_image(groups: list[list[str]]) -> list[int]:
    return [i for i, group in enumerate(groups) for _ in group]


# ----------------------------------------------------------------------------------------------
# imagefolder
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def imagefolder(tmp_path: Path) -> Path:
    root = tmp_path / "tinyfolder"
    for split, indices in (("train", [0, 1]), ("validation", [2, 3])):
        folder = root / split
        folder.mkdir(parents=True)
        with (folder / "metadata.jsonl").open("w") as handle:
            for i in indices:
                # A grayscale and a palette file: the split must still hand out RGB images.
                mode = {0: "RGB", 1: "L", 2: "P", 3: "RGB"}[i]
                name = f"img{i}.png"
                _image(COLORS[i], mode).save(folder / name)
                handle.write(json.dumps({"file_name": name, "image_id": f"id{i}", "captions": CAPTIONS[i]}) + "\n")
    return root


def test_imagefolder_counts_mapping_and_rgb(imagefolder: Path) -> None:
    split = load_split("imagefolder", "validation", data_dir=str(imagefolder))
    assert len(split) == 2
    assert split.image_ids == ["id2", "id3"]
    assert split.captions == CAPTIONS[2] + CAPTIONS[3]
    assert split.caption_image.tolist() == [0, 0, 0, 1, 1]
    assert split.caption_image.dtype == np.int64
    assert split.regions is None
    assert split.captions_of(1) == CAPTIONS[3]
    image = split.image(0)
    assert image.mode == "RGB" and image.size == (12, 10)
    assert image.getpixel((3, 3)) == COLORS[2]  # the palette file decodes to its colour
    train = load_split("flickr8k", "train", data_dir=str(imagefolder))
    assert train.image_ids == ["id0", "id1"] and train.caption_image.tolist() == [0, 0, 1]
    assert train.image(1).mode == "RGB"  # from an L-mode file


def test_imagefolder_split_aliases_and_max_images(imagefolder: Path) -> None:
    full = load_split("imagefolder", "validation", data_dir=str(imagefolder))
    assert load_split("imagefolder", "val", data_dir=str(imagefolder)).fingerprint() == full.fingerprint()
    first = load_split("imagefolder", "validation", data_dir=str(imagefolder), max_images=1)
    assert first.image_ids == ["id2"] and first.captions == CAPTIONS[2]
    # data_dir may also be a split folder itself.
    direct = load_split("imagefolder", "validation", data_dir=str(imagefolder / "validation"))
    assert direct.captions == full.captions


def test_imagefolder_datasets_path_matches_fast_path(imagefolder: Path, tmp_path: Path) -> None:
    fast = load_split("imagefolder", "validation", data_dir=str(imagefolder))
    slow = load_imagefolder_with_datasets(imagefolder, "validation", cache_dir=str(tmp_path / "hf_cache"))
    assert slow.image_ids == fast.image_ids
    assert slow.captions == fast.captions
    assert slow.caption_image.tolist() == fast.caption_image.tolist()
    assert slow.fingerprint() == fast.fingerprint()
    assert slow.image(1).getpixel((0, 0)) == COLORS[3]


def test_imagefolder_csv_metadata_goes_through_datasets(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "csvfolder" / "train"
    folder.mkdir(parents=True)
    _image(COLORS[0]).save(folder / "a.png")
    _image(COLORS[1]).save(folder / "b.png")
    (folder / "metadata.csv").write_text("file_name,caption\na.png,a red square\nb.png,a green square\n")
    monkeypatch.setattr(data_module, "load_imagefolder_with_datasets",
                        lambda *a, **k: load_imagefolder_with_datasets(*a, **k, cache_dir=str(tmp_path / "c")))
    split = load_split("imagefolder", "train", data_dir=str(tmp_path / "csvfolder"))
    assert split.captions == ["a red square", "a green square"]
    assert split.image_ids == ["a", "b"]
    assert split.image(1).getpixel((0, 0)) == COLORS[1]


def test_imagefolder_errors(imagefolder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_split("imagefolder", "train", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="No split folder 'test'"):
        load_split("imagefolder", "test", data_dir=str(imagefolder))
    with pytest.raises(ValueError, match="needs data_dir"):
        load_split("imagefolder", "train")
    bad = tmp_path / "bad" / "train"
    bad.mkdir(parents=True)
    (bad / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "labels": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="no caption column"):
        load_split("imagefolder", "train", data_dir=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="Unknown dataset 'flickr9k'"):
        load_split("flickr9k", "train", data_dir=str(imagefolder))


# ----------------------------------------------------------------------------------------------
# flickr30k (nlphuji/flickr30k schema: one split, Karpathy split in a column)
# ----------------------------------------------------------------------------------------------
def _save_flickr30k(path: Path, drop: str | None = None) -> None:
    import datasets

    columns = {
        "image": [_image(c) for c in COLORS],
        "caption": CAPTIONS,
        "sentids": [[str(10 * i + k) for k in range(len(g))] for i, g in enumerate(CAPTIONS)],
        "split": ["train", "val", "test", "test"],
        "img_id": ["0", "1", "2", "3"],
        "filename": ["100.jpg", "101.jpg", "102.jpg", "103.jpg"],
    }
    features = {
        "image": datasets.Image(),
        "caption": datasets.List(datasets.Value("string")),
        "sentids": datasets.List(datasets.Value("string")),
        "split": datasets.Value("string"),
        "img_id": datasets.Value("string"),
        "filename": datasets.Value("string"),
    }
    if drop:
        columns.pop(drop)
        features.pop(drop)
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(path))


def test_flickr30k_split_column_filtering(tmp_path: Path) -> None:
    _save_flickr30k(tmp_path / "f30k")
    test = load_split("flickr30k", "test", data_dir=str(tmp_path / "f30k"))
    assert test.image_ids == ["102", "103"]
    assert test.captions == CAPTIONS[2] + CAPTIONS[3]
    assert test.caption_image.tolist() == [0, 0, 0, 1, 1]
    assert test.image(1).mode == "RGB" and test.image(1).getpixel((5, 5)) == COLORS[3]
    val = load_split("flickr30k", "validation", data_dir=str(tmp_path / "f30k"))
    assert val.image_ids == ["101"] and val.captions == CAPTIONS[1] and val.name == "flickr30k/val"
    assert val.images()[0].getpixel((0, 0)) == COLORS[1]
    assert load_split("flickr30k", "test", data_dir=str(tmp_path / "f30k"), max_images=1).image_ids == ["102"]


def test_flickr30k_errors(tmp_path: Path) -> None:
    _save_flickr30k(tmp_path / "nosplit", drop="split")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['split'\]"):
        load_split("flickr30k", "test", data_dir=str(tmp_path / "nosplit"))
    with pytest.raises(FileNotFoundError, match="absent"):
        load_split("flickr30k", "test", data_dir=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        load_split("flickr30k", "holdout", data_dir=str(tmp_path / "nosplit"))


# ----------------------------------------------------------------------------------------------
# coco (yerevann/coco-karpathy schema: HF splits train/validation/test/restval)
# ----------------------------------------------------------------------------------------------
def _coco_rows(indices: list[int], split: str, with_image: bool) -> dict:
    rows = {
        "filepath": ["val2014" if split != "train" else "train2014" for _ in indices],
        "filename": [f"COCO_{i:012d}.jpg" for i in indices],
        "sentences": [CAPTIONS[i] for i in indices],
        "split": [split for _ in indices],
        "cocoid": [1000 + i for i in indices],
        "url": [f"http://images.invalid/{i}.jpg" for i in indices],
    }
    if with_image:
        rows["image"] = [_image(COLORS[i]) for i in indices]
    return rows


def _save_coco(path: Path, with_image: bool = False) -> None:
    import datasets

    parts = {"train": [0], "restval": [1], "validation": [2], "test": [3, 2]}
    dd = {}
    for name, indices in parts.items():
        rows = _coco_rows(indices, "val" if name == "validation" else name, with_image)
        features = {
            "filepath": datasets.Value("string"),
            "filename": datasets.Value("string"),
            "sentences": datasets.List(datasets.Value("string")),
            "split": datasets.Value("string"),
            "cocoid": datasets.Value("int64"),
            "url": datasets.Value("string"),
        }
        if with_image:
            features["image"] = datasets.Image()
        dd[name] = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    datasets.DatasetDict(dd).save_to_disk(str(path))


def test_coco_train_is_train_plus_restval_and_reads_image_root(tmp_path: Path) -> None:
    _save_coco(tmp_path / "coco")
    image_root = tmp_path / "images"
    for i, color in enumerate(COLORS):
        sub = image_root / ("train2014" if i == 0 else "val2014")
        sub.mkdir(parents=True, exist_ok=True)
        _image(color, "L" if i == 1 else "RGB").save(sub / f"COCO_{i:012d}.jpg", format="PNG")
    train = load_split("coco", "train", data_dir=str(tmp_path / "coco"), image_root=str(image_root))
    assert train.image_ids == ["1000", "1001"]  # restval joins train
    assert train.caption_image.tolist() == [0, 0, 1]
    assert train.image(1).mode == "RGB"
    test = load_split("coco", "test", data_dir=str(tmp_path / "coco"), image_root=str(image_root))
    assert test.image_ids == ["1003", "1002"] and test.captions == CAPTIONS[3] + CAPTIONS[2]
    assert test.caption_image.tolist() == [0, 0, 1, 1, 1]
    assert test.image(0).getpixel((1, 1)) == COLORS[3]
    val = load_split("coco", "validation", data_dir=str(tmp_path / "coco"), image_root=str(image_root))
    assert val.image_ids == ["1002"]


def test_coco_image_column_and_lazy_urls(tmp_path: Path, monkeypatch) -> None:
    _save_coco(tmp_path / "with_image", with_image=True)
    split = load_split("coco", "test", data_dir=str(tmp_path / "with_image"))
    assert split.image(1).getpixel((0, 0)) == COLORS[2]

    _save_coco(tmp_path / "urls_only")
    fetched: list[str] = []

    def fake_fetch(url: str) -> bytes:
        import io

        fetched.append(url)
        buffer = io.BytesIO()
        _image(COLORS[0]).save(buffer, format="PNG")
        return buffer.getvalue()

    monkeypatch.setattr(data_module, "_fetch_url", fake_fetch)
    split = load_split("coco", "test", data_dir=str(tmp_path / "urls_only"))
    assert fetched == []  # loading the split downloads nothing
    assert split.image(0).mode == "RGB"
    assert fetched == ["http://images.invalid/3.jpg"]


def test_coco_missing_image_root_is_an_error(tmp_path: Path) -> None:
    _save_coco(tmp_path / "coco")
    with pytest.raises(FileNotFoundError, match="image_root"):
        load_split("coco", "test", data_dir=str(tmp_path / "coco"), image_root=str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------
# precomp (SCAN / SGRAF)
# ----------------------------------------------------------------------------------------------
def _write_precomp(root: Path, stem: str, n_images: int, repeat_rows: bool) -> np.ndarray:
    root.mkdir(parents=True, exist_ok=True)
    features = np.random.default_rng(0).standard_normal((n_images, 3, 4)).astype(np.float32)
    rows = np.repeat(features, 5, axis=0) if repeat_rows else features
    np.save(root / f"{stem}_ims.npy", rows)
    (root / f"{stem}_caps.txt").write_text("".join(f"caption {i} {k}\n" for i in range(n_images) for k in range(5)))
    return features


@pytest.mark.parametrize("repeat_rows", [False, True])
def test_precomp_memmap_and_im_div(tmp_path: Path, repeat_rows: bool) -> None:
    features = _write_precomp(tmp_path / "f30k_precomp", "test", 3, repeat_rows)
    split = load_split("precomp", "test", data_dir=str(tmp_path / "f30k_precomp"))
    assert len(split) == 3 and split.n_captions == 15
    assert split.caption_image.tolist() == [i for i in range(3) for _ in range(5)]
    assert split.captions_of(2)[0] == "caption 2 0"
    assert isinstance(split.regions, np.memmap)  # not read into memory
    np.testing.assert_array_equal(np.asarray(split.regions), features)
    with pytest.raises(ValueError, match="precomputed"):
        split.image(0)


def test_precomp_dev_alias_ids_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "coco_precomp"
    _write_precomp(root, "dev", 2, repeat_rows=False)
    (root / "dev_ids.txt").write_text("\n".join(str(v) for v in (7, 7, 7, 7, 7, 9, 9, 9, 9, 9)) + "\n")
    split = load_split("precomp", "validation", data_dir=str(root))
    assert split.image_ids == ["7", "9"]
    assert load_split("precomp", "dev", data_dir=str(root), max_images=1).n_captions == 5
    with pytest.raises(FileNotFoundError, match="test_ims.npy"):
        load_split("precomp", "test", data_dir=str(root))
    (root / "bad_caps.txt").write_text("a\nb\nc\n")
    np.save(root / "bad_ims.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="do not divide"):
        load_split("precomp", "bad", data_dir=str(root))
    np.save(root / "nocaps_ims.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(FileNotFoundError, match="nocaps_caps.txt"):
        load_split("precomp", "nocaps", data_dir=str(root))


# ----------------------------------------------------------------------------------------------
# The split object itself
# ----------------------------------------------------------------------------------------------
def _regions_split(captions: list[list[str]] = CAPTIONS) -> ImageCaptionSplit:
    regions = np.arange(len(captions) * 2 * 3, dtype=np.float32).reshape(len(captions), 2, 3)
    return ImageCaptionSplit(
        name="toy/test",
        image_ids=[f"i{k}" for k in range(len(captions))],
        captions=[c for g in captions for c in g],
        caption_image=np.array(_expected_caption_image(captions)),
        regions=regions,
        source="toy",
    )


def test_fingerprint_is_stable_and_tracks_captions() -> None:
    base = _regions_split()
    assert base.fingerprint() == _regions_split().fingerprint()
    edited = [list(g) for g in CAPTIONS]
    edited[1][0] = "a green rectangle"
    assert _regions_split(edited).fingerprint() != base.fingerprint()
    # Same captions, moved to another image: the mapping is part of the identity.
    moved = [["a red square"], ["something red", "a green square"]] + [list(g) for g in CAPTIONS[2:]]
    assert _regions_split(moved).fingerprint() != base.fingerprint()
    assert base.subset(n_images=3).fingerprint() != base.fingerprint()


def test_subset_keeps_each_images_captions() -> None:
    split = _regions_split()
    picked = split.subset(indices=[2, 0])
    assert picked.image_ids == ["i2", "i0"]
    assert picked.captions == CAPTIONS[2] + CAPTIONS[0]
    assert picked.caption_image.tolist() == [0, 0, 0, 1, 1]
    np.testing.assert_array_equal(picked.regions, split.regions[[2, 0]])
    first = split.subset(n_images=2)
    assert first.captions == CAPTIONS[0] + CAPTIONS[1]
    assert split.subset(n_images=99).n_captions == split.n_captions
    with pytest.raises(ValueError, match="exactly one"):
        split.subset()
    with pytest.raises(ValueError, match="repeat"):
        split.subset(indices=[1, 1])


def test_non_contiguous_captions_and_images_without_captions() -> None:
    split = ImageCaptionSplit(
        name="odd", image_ids=["a", "b", "c"], captions=["b1", "a1", "b2"],
        caption_image=np.array([1, 0, 1]), regions=np.zeros((3, 1, 1), np.float32),
    )
    assert split.captions_of(1) == ["b1", "b2"]
    assert split.captions_of(2) == []
    sub = split.subset(indices=[1, 2])
    assert sub.captions == ["b1", "b2"] and sub.caption_image.tolist() == [0, 0]
    with pytest.raises(ValueError, match="caption_image must index"):
        ImageCaptionSplit(name="x", image_ids=["a"], captions=["c"], caption_image=np.array([1]),
                          regions=np.zeros((1, 1, 1)))


# ----------------------------------------------------------------------------------------------
# The real Flickr8k copy, when it is there
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not FLICKR8K.is_dir(), reason=f"real Flickr8k not found at {FLICKR8K} (shared data absent)")
def test_real_flickr8k_validation() -> None:
    split = load_split("flickr8k", "validation", data_dir=str(FLICKR8K))
    assert len(split) == 1000 and split.n_captions == 5000
    assert np.bincount(split.caption_image, minlength=1000).tolist() == [5] * 1000
    assert len(set(split.image_ids)) == 1000
    image = split.image(0)
    assert image.mode == "RGB" and image.size == (224, 224)
    small = load_split("flickr8k", "validation", data_dir=str(FLICKR8K), max_images=10)
    assert small.image_ids == split.image_ids[:10] and small.captions == split.captions[:50]
