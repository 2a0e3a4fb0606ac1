"""benchmarks/context_train_val.py writes its table from the records: the knock-out's sign and the
gap to the cosine are computed, and a model without a context level gets dashes, not zeros."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts import their siblings
from context_train_val import summarize  # noqa: E402


def _record(name: str, split: str, rsum: dict) -> dict:
    return {"name": name, "model": f"runs/{name}", "weights": "abc", "split": split, "images": 1000,
            "rsum": rsum, "rerank_k": 20, "machine": "test box"}


def test_summary_rows_carry_the_knock_out_delta_and_dashes_without_context() -> None:
    text = summarize([_record("tshsr", "train", {"full": 400.0, "cosine": 380.0, "context cut": 397.5}),
                      _record("tshsr", "validation", {"full": 300.0, "cosine": 290.0, "context cut": 303.0,
                                                      "no reasoning": 299.0, "mean with cut": 304.5,
                                                      "mean with no reasoning": 301.0}),
                      _record("flat", "train", {"full": 395.0, "cosine": 380.0, "no reasoning": 396.5,
                                                "mean with no reasoning": 397.0})])
    rows = [line for line in text.splitlines() if line.startswith("| tshsr") or line.startswith("| flat")]
    older = "| tshsr | train | 1000 | 400.0 | 380.0 | +20.0 | 397.5 | -2.5 | — | — | — | — | — |"  # measured less
    assert rows[0] == older
    assert rows[1].endswith("| +10.0 | 303.0 | +3.0 | 299.0 | -1.0 | 304.5 | +1.5 | 301.0 |")  # the mean − the cut
    assert rows[2].endswith("| 395.0 | 380.0 | +15.0 | — | — | 396.5 | +1.5 | — | — | 397.0 |")
    assert "top-20" in text and "test box" in text


def test_summary_of_no_records_is_just_the_header() -> None:
    assert summarize([]).splitlines()[-1] == "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
