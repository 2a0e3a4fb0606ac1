"""Evaluation: exhaustive and two-stage scoring, the 1K folds, the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tshsr import TSHSRConfig, TSHSRModel, Vocabulary
from tshsr import evaluate as evaluate_module
from tshsr.data import ImageCaptionSplit, load_split
from tshsr.evaluate import evaluate_model, evaluate_split, two_stage_matrices
from tshsr_train.evaluate_cli import main
from tshsr.metrics import coco_1k_folds, retrieval_metrics

FEATURE_DIM = 16
SCHEMA = {"i2t", "t2i", "rsum", "n_images", "n_captions", "seconds"}
OBJECTS = ["dog", "cat", "car", "tree", "boat", "bird"]


def _captions(n_images: int) -> list[list[str]]:
    # One to three captions per image: nothing may assume five.
    return [[f"a {adj} {OBJECTS[i % 6]} number {i}" for adj in ("red", "big", "small")][: 1 + i % 3]
            for i in range(n_images)]


def _tiny_model(captions: list[str], seed: int = 0) -> TSHSRModel:
    vocabulary = Vocabulary.build(captions, min_count=1)
    config = TSHSRConfig.preset("tshsr", image_encoder="precomputed", image_feature_dim=FEATURE_DIM,
                                text_encoder="bigru", vocab_size=len(vocabulary), embed_dim=32, sim_dim=16)
    torch.manual_seed(seed)
    return TSHSRModel(config, vocabulary=vocabulary).eval()


def _split(n_images: int = 8) -> ImageCaptionSplit:
    groups = _captions(n_images)
    regions = np.random.default_rng(1).standard_normal((n_images, 5, FEATURE_DIM)).astype(np.float32)
    return ImageCaptionSplit(
        name="toy/test", image_ids=[str(i) for i in range(n_images)], captions=[c for g in groups for c in g],
        caption_image=np.repeat(np.arange(n_images), [len(g) for g in groups]), regions=regions, source="toy",
    )


@pytest.fixture(scope="module")
def split() -> ImageCaptionSplit:
    return _split()


@pytest.fixture(scope="module")
def model(split: ImageCaptionSplit) -> TSHSRModel:
    return _tiny_model(split.captions)


@pytest.fixture(scope="module")
def encoded(model: TSHSRModel, split: ImageCaptionSplit):
    images = model.encode_images(split.regions)
    texts = model.encode_texts(split.captions)
    return images, texts, model.score_encoded(images, texts).scores, model.global_similarity(images, texts)


def test_evaluate_model_matches_the_full_score_matrix(model, split, encoded) -> None:
    result = evaluate_model(model, split, progress=False)
    assert set(result) == SCHEMA
    assert set(result["i2t"]) == set(result["t2i"]) == {"r1", "r5", "r10"}
    assert result["n_images"] == 8 and result["n_captions"] == split.n_captions
    expected = retrieval_metrics(encoded[2], split.caption_image)
    assert result["i2t"] == pytest.approx(expected["i2t"]) and result["t2i"] == pytest.approx(expected["t2i"])
    assert result["rsum"] == pytest.approx(expected["rsum"])
    assert json.loads(json.dumps(result)) == result  # plain JSON types


def test_two_stage_limits_are_the_dual_encoder_and_the_full_model(model, split, encoded) -> None:
    # Reranking every item is the exhaustive protocol; reranking one item per query leaves the
    # cosine order untouched (the top item stays first), i.e. the dual-encoder metrics.
    exhaustive = evaluate_model(model, split, progress=False)
    everything = evaluate_model(model, split, rerank_k=1000, progress=False)
    assert everything["rsum"] == pytest.approx(exhaustive["rsum"])
    assert everything["i2t"] == pytest.approx(exhaustive["i2t"])
    top1 = evaluate_model(model, split, rerank_k=1, progress=False)
    cosine = retrieval_metrics(encoded[3], split.caption_image)
    assert top1["i2t"] == pytest.approx(cosine["i2t"]) and top1["t2i"] == pytest.approx(cosine["t2i"])
    with pytest.raises(ValueError, match="rerank_k"):
        evaluate_model(model, split, rerank_k=0, progress=False)


def test_two_stage_matrices_by_hand() -> None:
    cosine = np.array([[0.9, 0.5, 0.1],
                       [0.2, 0.8, 0.7]])
    full = np.array([[0.0, 5.0, 9.0],
                     [3.0, 1.0, 2.0]])
    calls: list[tuple[int, int]] = []

    def score(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        calls.extend(zip(rows.tolist(), cols.tolist()))
        return full[rows, cols]

    i2t, t2i = two_stage_matrices(cosine, 1, score)
    # Shortlists (k=1): image rows -> caption 0 for image 0, caption 1 for image 1;
    # caption columns -> image 0, image 1, image 1. Their full scores are 0, 1 (and 0, 1, 2).
    # Everything else keeps its cosine, shifted by -(max cosine 0.9) + (lowest full 0 - 1) = -1.9.
    np.testing.assert_allclose(i2t, [[0.0, -1.4, -1.8], [-1.7, 1.0, -1.2]])
    np.testing.assert_allclose(t2i, [[0.0, -1.4, -1.8], [-1.7, 1.0, 2.0]])
    # Image 0's caption 2 has the best full score (9) but was not shortlisted: it stays last.
    assert set(calls) == {(0, 0), (1, 1), (1, 2)}


def test_training_mode_is_restored(model, split) -> None:
    model.train()
    try:
        evaluate_model(model, split, progress=False)
        assert model.training
    finally:
        model.eval()


def test_coco_1k_folds_exhaustive_and_two_stage(model, split, encoded) -> None:
    # Folds of 4 images: the exhaustive 1K result is the mean of per-fold metrics of the matrix.
    result, folds = evaluate_split(model, split, progress=False, coco_1k=True, fold_size=4)
    expected = coco_1k_folds(encoded[2], split.caption_image, fold_size=4)
    assert set(folds) == SCHEMA and folds["n_images"] == 4
    assert folds["rsum"] == pytest.approx(expected["rsum"])
    assert result["n_images"] == 8
    # Two-stage with a shortlist as large as a fold equals the exhaustive protocol fold by fold.
    _, folds_rerank = evaluate_split(model, split, rerank_k=4 * 3, progress=False, coco_1k=True, fold_size=4)
    assert folds_rerank["rsum"] == pytest.approx(expected["rsum"])


def test_image_splits_are_encoded_in_batches_of_paths(tmp_path: Path, model) -> None:
    # A precomputed model stands in for an image backbone: a wrapper turns each image into
    # region vectors. It checks that evaluation hands the model lazy paths, batch by batch.
    folder = tmp_path / "toy" / "test"
    folder.mkdir(parents=True)
    groups = _captions(5)
    with (folder / "metadata.jsonl").open("w") as handle:
        for i, group in enumerate(groups):
            Image.new("RGB", (8, 8), (40 * i, 255 - 40 * i, 7 * i)).save(folder / f"{i}.png")
            handle.write(json.dumps({"file_name": f"{i}.png", "captions": group}) + "\n")
    split = load_split("imagefolder", "test", data_dir=str(tmp_path / "toy"))
    seen: list[list] = []
    original = model.encode_images

    def encode_images(images, batch_size=32, progress=False):
        seen.append(list(images))
        regions = np.stack([
            np.resize(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)[0, 0] / 255.0, (5, FEATURE_DIM))
            for p in images
        ])
        return original(regions, batch_size=batch_size)

    model.encode_images = encode_images
    try:
        result = evaluate_model(model, split, batch_size=2, progress=False)
    finally:
        del model.encode_images
    assert [len(batch) for batch in seen] == [2, 2, 1]
    assert all(isinstance(p, str) and p.endswith(".png") for batch in seen for p in batch)
    assert result["n_images"] == 5 and result["n_captions"] == sum(len(g) for g in groups)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, split: ImageCaptionSplit, model: TSHSRModel) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    model.save_pretrained(str(root / "model"))
    data = root / "precomp"
    data.mkdir()
    # SCAN layout needs a fixed number of captions per image: two each.
    np.save(data / "test_ims.npy", split.regions)
    (data / "test_caps.txt").write_text("".join(f"a {OBJECTS[i % 6]} number {i}\nthe {OBJECTS[i % 6]} {i}\n"
                                                for i in range(len(split))))
    return root / "model", data


def test_cli_writes_exact_schema_and_prints_a_table(saved, tmp_path: Path, capsys) -> None:
    model_dir, data_dir = saved
    output = tmp_path / "out" / "metrics.json"
    assert main(["--model", str(model_dir), "--dataset", "precomp", "--data-dir", str(data_dir), "--split", "test",
                 "--output", str(output), "--device", "cpu", "--no-progress", "--max-images", "6"]) == 0
    result = json.loads(output.read_text())
    assert set(result) == SCHEMA and set(result["i2t"]) == {"r1", "r5", "r10"}
    assert result["n_images"] == 6 and result["n_captions"] == 12
    assert not (tmp_path / "out" / "metrics_1k.json").exists()
    printed = capsys.readouterr().out
    assert "Image-to-text" in printed and "RSUM" in printed and f"{result['rsum']:.1f}" in printed
    # The CLI loads the saved model: its numbers equal the library call on the same data.
    loaded = TSHSRModel.from_pretrained(str(model_dir))
    direct = evaluate_model(loaded, load_split("precomp", "test", data_dir=str(data_dir), max_images=6),
                            progress=False)
    assert result["rsum"] == pytest.approx(direct["rsum"])


def test_cli_writes_1k_folds_next_to_the_output(saved, tmp_path: Path, monkeypatch) -> None:
    model_dir, data_dir = saved
    monkeypatch.setattr(evaluate_module, "COCO_FOLD_SIZE", 4)
    output = tmp_path / "metrics.json"
    main(["--model", str(model_dir), "--dataset", "precomp", "--data-dir", str(data_dir), "--output", str(output),
          "--device", "cpu", "--no-progress", "--coco-1k", "--rerank-k", "3"])
    result = json.loads(output.read_text())
    folds = json.loads((tmp_path / "metrics_1k.json").read_text())
    assert set(result) == set(folds) == SCHEMA
    assert result["n_images"] == 8 and folds["n_images"] == 4


def test_cli_rejects_unknown_dataset(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--model", "x", "--dataset", "flickr9k"])
    assert "invalid choice" in capsys.readouterr().err


def test_auto_compile_only_pays_on_large_cpu_runs(model, monkeypatch) -> None:
    from tshsr.evaluate import AUTO_COMPILE_PAIRS, resolve_compile

    cpu = torch.device("cpu")
    monkeypatch.setattr(evaluate_module, "_cxx_compiler", lambda: "/usr/bin/g++")
    assert resolve_compile(True, model, 10, cpu) and not resolve_compile(False, model, 10**9, cpu)
    assert not resolve_compile("auto", model, AUTO_COMPILE_PAIRS - 1, cpu)
    assert resolve_compile("auto", model, AUTO_COMPILE_PAIRS, cpu)
    assert not resolve_compile("auto", model, AUTO_COMPILE_PAIRS, torch.device("meta"))
    monkeypatch.setattr(evaluate_module, "_cxx_compiler", lambda: None)
    assert not resolve_compile("auto", model, AUTO_COMPILE_PAIRS, cpu)


def test_auto_compile_falls_back_to_eager_when_compiling_fails(model, split, encoded, monkeypatch, capsys) -> None:
    """compile="auto" must not lose an evaluation to a missing compiler: it says so and scores uncompiled;
    an explicit compile=True still fails loudly."""
    images, texts, expected, _ = encoded
    monkeypatch.setattr(evaluate_module, "resolve_compile", lambda compile, *a: compile is not False)
    real = model.score_encoded

    def no_compiler(*args, compile=False, **kwargs):
        if compile:
            raise RuntimeError("torch.compile could not build the scoring block (no g++)")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "score_encoded", no_compiler)
    scored = evaluate_module.score_split(model, images, texts, split.caption_image, progress=False, compile="auto")
    assert np.allclose(scored.scores, expected.numpy(), atol=1e-6)
    assert "scoring uncompiled" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="could not build"):
        evaluate_module.score_split(model, images, texts, split.caption_image, progress=False, compile=True)
