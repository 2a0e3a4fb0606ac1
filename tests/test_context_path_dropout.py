"""--context-path-dropout: some training steps run with the context level cut out of the reasoning
graph (tshsr.analysis.context_cut), so the global and local nodes learn to work without it."""

from __future__ import annotations

import json

import pytest

from tests.test_train import data, run, train_cmd  # noqa: F401  (the precomp fixture)
from tshsr_train.args import parse_args


def test_the_flag_is_checked_trained_and_recorded(data, tmp_path) -> None:  # noqa: F811
    assert parse_args(["--context-path-dropout", "0.5"]).context_path_dropout == 0.5
    with pytest.raises(SystemExit):
        parse_args(["--context-path-dropout", "1.5"])
    out = tmp_path / "run"
    result = run(train_cmd(data, out, "--epochs", "1", "--preset", "tshsr", "--context-skip",
                           "--context-path-dropout", "0.5"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "train_args.json").read_text())["context_path_dropout"] == 0.5
    assert "--context-path-dropout 0.5" in (out / "README.md").read_text()  # the card lists it with the recipe
    saved = json.loads((out / "config.json").read_text())
    assert "cut_context" not in json.dumps(saved)  # a training switch, never part of the saved model


def test_a_model_without_a_context_level_is_refused(data, tmp_path) -> None:  # noqa: F811
    result = run(train_cmd(data, tmp_path / "run", "--epochs", "1", "--preset", "flat",
                           "--context-path-dropout", "0.5"))
    assert result.returncode != 0
    assert "--context-path-dropout needs a preset" in result.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()
