"""benchmarks/examples_recall.py: the counts it reports for every part of the score agree with
the full score and the cosine it reports as well, and the context knock-out is measured."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts import their siblings
from examples_recall import part_counts, parts_table, recall_counts  # noqa: E402


def test_recall_counts_on_a_known_matrix() -> None:
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    c = recall_counts(scores, [[0], [1]])
    assert (c["i2t_r1"], c["i2t_r5"], c["t2i_r1"], c["misses"]) == (1, 2, 2, [1])


def test_part_counts_cover_every_part_and_the_context_knock_out(make_model, regions, captions) -> None:
    model = make_model("tshsr")
    images, texts = model.encode_images(regions[:3]), model.encode_texts(captions[:6])
    own = [[2 * i, 2 * i + 1] for i in range(3)]
    parts = part_counts(model, images, texts, own)
    out = model.score_encoded(images, texts)
    full = recall_counts(out.scores.numpy(), own)
    assert parts["full"] == {k: full[k] for k in ("i2t_r1", "i2t_r5", "t2i_r1")}
    assert {"cosine", "i2t stream", "t2i stream", "without i2t", "without context", "i2t/context",
            "without context in reasoning"} <= set(parts)
    record = {"name": "tiny", "full": full, "parts": parts}
    table = parts_table([{"name": "old", "full": full}, record])
    assert "tiny's score" in table[1] and len(table) == 5 + len(parts)
    assert parts_table([{"name": "old", "full": full}]) == []
