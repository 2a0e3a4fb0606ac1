"""Synthetic data and tiny models for tests, benchmarks and smoke runs (no downloads, seconds to run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ["red", "blue", "green", "yellow", "cat", "dog", "car", "boat", "small", "big"]


def make_precomp(root: str | Path, n_train: int = 48, n_dev: int = 12, nan_image: int | None = None,
                 regions: int = 5, feature_dim: int = 16) -> Path:
    """A SCAN-style precomputed folder (``train``/``dev`` ``_ims.npy`` + ``_caps.txt``) whose region
    features encode a colour, an object and a size that the 5 captions of each image name, so a
    model can learn it. ``nan_image`` poisons one training image's features with NaN."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(len(WORDS), feature_dim)).astype(np.float32)
    for split, n in (("train", n_train), ("dev", n_dev)):
        ims, caps = [], []
        for _ in range(n):
            colour, obj, size = rng.integers(0, 4), rng.integers(4, 8), rng.integers(8, 10)
            feats = rng.normal(scale=0.3, size=(regions, feature_dim)).astype(np.float32)
            feats[0] += basis[colour]
            feats[1] += basis[obj]
            feats[2] += basis[size]
            ims.append(feats)
            for j in range(5):
                caps.append(f"a {WORDS[size]} {WORDS[colour]} {WORDS[obj]}" + (" here" if j % 2 else ""))
        ims = np.stack(ims)
        if nan_image is not None and split == "train":
            ims[nan_image] = np.nan
        np.save(root / f"{split}_ims.npy", ims)
        (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    return root


def assert_scoring_paths_agree(model, images, texts, grid_scores=None) -> None:
    """The pair path scores every (image, text) as the exhaustive grid does, and the alignment
    scores the loss trains (``alignment_scores`` over all combinations) are the ones the pair path
    blends into the level scores (as :func:`tshsr.analysis.shortlisted_values` reads them)."""
    import torch

    from .analysis import shortlisted_values
    from .encoding import head_inputs

    n_images, n_texts = len(images), len(texts)
    if grid_scores is None:
        grid_scores = model.score_encoded(images, texts).scores
    pi, pt = torch.meshgrid(torch.arange(n_images), torch.arange(n_texts), indexing="ij")
    pairs = model.score_pairs(images, texts, pi.reshape(-1), pt.reshape(-1))
    torch.testing.assert_close(pairs.scores.view(n_images, n_texts), grid_scores, atol=1e-5, rtol=1e-5)
    shortlist = shortlisted_values(model, images, texts, rerank_k=min(3, n_texts))
    with torch.no_grad():
        aligned = model.head_kind.alignment_scores(model, head_inputs(images), head_inputs(texts))
    for key, values in aligned.items():
        expected = values.double().numpy()[np.arange(n_images)[:, None], shortlist.i2t_cols]
        np.testing.assert_allclose(shortlist.i2t[f"{key} alignment"], expected, atol=1e-5)
