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
