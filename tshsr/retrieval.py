"""Two-stage retrieval over a gallery encoded once: global-cosine shortlist, full-model rerank.

A :class:`GalleryIndex` holds the encodings of a gallery (images, or texts), so a query costs one
encoding of the query plus ``rerank_k`` full-model pair scores. It saves to a folder
(``gallery.safetensors`` + ``gallery.json``) and refuses to load under a model other than the
one that built it: encodings from another configuration or other weights are meaningless.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .evaluate import eval_mode
from .io import atomic_write as _atomic_write

__all__ = ["Hit", "GalleryIndex", "model_fingerprints"]

INDEX_FORMAT = 1
TENSORS_NAME = "gallery.safetensors"
META_NAME = "gallery.json"
KINDS = ("images", "texts")


@dataclass
class Hit:
    """One search result. ``rank`` is 1-based; ``contributions`` sum to ``score`` (per stream/level)."""

    id: str
    score: float
    rank: int
    contributions: dict[str, float] = field(default_factory=dict)


def model_fingerprints(model) -> dict[str, str]:
    """Identity of a model for its encodings: its configuration and its stored weights.

    Frozen pretrained backbones are named by the configuration; the trainable weights (what a
    checkpoint stores) are hashed, so a retrained model with the same config is told apart.
    """
    config = model.config
    if hasattr(config, "fingerprint"):
        config_hash = config.fingerprint()
    else:
        config_hash = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    state = model.saved_state_dict() if hasattr(model, "saved_state_dict") else model.state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"config": config_hash, "weights": digest.hexdigest()[:16]}


class GalleryIndex:
    """A searchable gallery of images (queried by text) or texts (queried by an image).

    >>> index = GalleryIndex(model, kind="images")
    >>> index.add(["a.jpg", "b.jpg"], ids=["a", "b"])
    >>> index.search("a dog on a beach", top_k=5, rerank_k=50)
    """

    def __init__(self, model, kind: str = "images"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.model = model
        self.kind = kind
        self._encoding = None  # ImageEncoding / TextEncoding of the gallery, or None when empty
        self._ids: list[str] = []
        self._next_id = 0  # automatic ids never repeat, even after removals

    # ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return str(item_id) in set(self._ids)

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def __repr__(self) -> str:
        return f"GalleryIndex(kind={self.kind!r}, items={len(self)})"

    @property
    def _encoding_cls(self):
        from .model import ImageEncoding, TextEncoding

        return ImageEncoding if self.kind == "images" else TextEncoding

    def _encode(self, items, batch_size: int | None, progress: bool, side: str):
        with eval_mode(self.model):
            if side == "images":
                return self.model.encode_images(items, batch_size=batch_size or 32, progress=progress)
            return self.model.encode_texts(items, batch_size=batch_size or 128, progress=progress)

    # ------------------------------------------------------------------------------------------
    def add(self, items, ids: Sequence[Any] | None = None, batch_size: int | None = None,
            progress: bool = False) -> list[str]:
        """Encode ``items`` once and add them; returns their ids (given, or new automatic ones).

        Images: PIL images or paths (or a region array [N, K, F] for precomputed-feature models);
        texts: strings.
        """
        if self.kind == "texts" and isinstance(items, str):
            items = [items]
        n = len(items)
        if n == 0:
            return []
        existing = set(self._ids)
        if ids is None:
            new_ids = []
            while len(new_ids) < n:
                candidate = str(self._next_id)
                self._next_id += 1
                if candidate not in existing:
                    new_ids.append(candidate)
        else:
            new_ids = [str(i) for i in ids]
            if len(new_ids) != n:
                raise ValueError(f"{n} items but {len(new_ids)} ids")
            if len(set(new_ids)) != n:
                raise ValueError("ids must be unique")
            clash = sorted(existing.intersection(new_ids))
            if clash:
                raise ValueError(f"ids already in the index: {clash[:10]}")
        encoding = self._encode(items, batch_size, progress, self.kind)
        self._encoding = encoding if self._encoding is None else self._encoding_cls.cat([self._encoding, encoding])
        self._ids.extend(new_ids)
        return new_ids

    def remove(self, ids: Sequence[Any] | str) -> None:
        """Remove items by id; a KeyError (and no change) if any id is not in the index."""
        if isinstance(ids, str):
            ids = [ids]
        doomed = {str(i) for i in ids}
        missing = sorted(doomed.difference(self._ids))
        if missing:
            raise KeyError(f"not in the index: {missing[:10]}")
        keep = [k for k, item_id in enumerate(self._ids) if item_id not in doomed]
        self._ids = [self._ids[k] for k in keep]
        self._encoding = self._encoding[keep] if keep else None

    # ------------------------------------------------------------------------------------------
    def _encode_query(self, query):
        """The query as a one-item encoding of the other side."""
        if self.kind == "images":
            if not isinstance(query, str):
                raise TypeError("an image gallery is searched with a text (str)")
            return self._encode([query], None, False, "texts")
        if isinstance(query, str) and not Path(query).exists():
            raise TypeError("a text gallery is searched with an image (PIL image, file path or region array)")
        if isinstance(query, (np.ndarray, torch.Tensor)) and query.ndim == 2:
            query = query[None]  # one image's regions [K, F]
        elif not isinstance(query, (np.ndarray, torch.Tensor)):
            query = [query]
        return self._encode(query, None, False, "images")

    def search(self, query, top_k: int = 10, rerank_k: int | None = None) -> list[Hit]:
        """The ``top_k`` best items for ``query``, best first.

        ``rerank_k``: shortlist that many items by global cosine and score only those with the full
        model (at least ``top_k`` are scored, so every hit carries a full-model score);
        ``None`` scores the whole gallery with the full model.
        """
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        if rerank_k is not None and rerank_k <= 0:
            raise ValueError(f"rerank_k must be positive or None, got {rerank_k}")
        if not self._ids:
            return []
        query_encoding = self._encode_query(query).to(self._encoding.device)
        n = len(self._ids)
        with eval_mode(self.model):
            if rerank_k is None or rerank_k >= n:
                candidates = torch.arange(n)
            else:
                similarity = self._pair_matrix(self.model.global_similarity, query_encoding, self._encoding)
                candidates = torch.topk(similarity, min(n, max(rerank_k, top_k))).indices.cpu()
            gallery = self._encoding[candidates.to(self._encoding.device)]
            output = self._pair_matrix(self.model.score_encoded, query_encoding, gallery, full=True)
        scores = output.scores.reshape(-1).double().cpu()
        contributions = {k: v.reshape(-1).double().cpu() for k, v in output.contributions.items()}
        # Stable sort: equal scores keep the shortlist (cosine) order.
        order = torch.sort(-scores, stable=True).indices[:top_k]
        return [
            Hit(
                id=self._ids[int(candidates[k])],
                score=float(scores[k]),
                rank=rank,
                contributions={name: float(values[k]) for name, values in contributions.items()},
            )
            for rank, k in enumerate(order.tolist(), start=1)
        ]

    def _pair_matrix(self, fn, query, gallery, full: bool = False):
        """Call ``fn(images, texts)`` with the gallery on its side; result is gallery-major [n]."""
        if self.kind == "images":
            result = fn(gallery, query)  # [n, 1]
        else:
            result = fn(query, gallery)  # [1, n]
        if full:
            return result
        return result.reshape(-1)

    # ------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``gallery.safetensors`` and ``gallery.json`` into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {} if self._encoding is None else {k: v.cpu() for k, v in self._encoding.state_dict().items()}
        meta = {
            "format": INDEX_FORMAT,
            "kind": self.kind,
            "ids": self._ids,
            "next_id": self._next_id,
            "model": model_fingerprints(self.model),
        }
        # Tensors first, metadata last: load() trusts a folder only once the metadata is there.
        _atomic_write(directory / TENSORS_NAME, lambda p: save_file(tensors, p, metadata={"kind": self.kind}))
        _atomic_write(directory / META_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=1) + "\n"))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, model) -> "GalleryIndex":
        """Reopen a saved index for ``model``; a ValueError if another model built it."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path, tensors_path = directory / META_NAME, directory / TENSORS_NAME
        if not meta_path.is_file() or not tensors_path.is_file():
            raise FileNotFoundError(f"{directory} is not a saved GalleryIndex ({META_NAME} and {TENSORS_NAME} needed)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{meta_path}: index format {meta.get('format')!r}, this tshsr reads {INDEX_FORMAT}")
        stored, current = meta.get("model", {}), model_fingerprints(model)
        if stored.get("config") != current["config"]:
            raise ValueError(
                f"{directory} was built by a model with another configuration (fingerprint "
                f"{stored.get('config')}, this model {current['config']}): rebuild the index"
            )
        if stored.get("weights") != current["weights"]:
            raise ValueError(
                f"{directory} was built by a model with the same configuration but other weights "
                f"(fingerprint {stored.get('weights')}, this model {current['weights']}): rebuild the index"
            )
        index = cls(model, kind=meta["kind"])
        index._ids = [str(i) for i in meta["ids"]]
        index._next_id = int(meta.get("next_id", len(index._ids)))
        state = load_file(str(tensors_path))
        if index._ids:
            encoding = index._encoding_cls.from_state_dict(state)
            if len(encoding) != len(index._ids):
                raise ValueError(f"{directory}: {len(encoding)} encoded items for {len(index._ids)} ids")
            index._encoding = encoding.to(_model_device(model))
        return index


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device
