"""--readout-mean: each level's score is the mean of its readouts before and after the reasoning
steps (the score averaged over reasoning depths 0 and the preset's steps), in training and at
test time."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_analysis import _encode
from tests.test_train import data, run, train_cmd  # noqa: F401  (the precomp fixture)


def test_readout_mean_is_the_mean_of_the_scores_before_and_after_reasoning(make_model, regions, captions,
                                                                        tmp_path) -> None:
    from tshsr import TSHSRConfig, TSHSRModel
    from tshsr.analysis import reasoning_off

    for preset in ("tshsr", "flat", "i2t"):
        last, mean = make_model(preset), make_model(preset, readout_mean=True)  # same seed: the same weights
        images, texts = _encode(last, regions, captions)
        with torch.no_grad():
            full = last.score_encoded(images, texts)
            with reasoning_off(last):
                unreasoned = last.score_encoded(images, texts)
            averaged = mean.score_encoded(images, texts)
            with reasoning_off(mean):  # no step: both readouts are the one from the nodes as built
                torch.testing.assert_close(mean.score_encoded(images, texts).scores, unreasoned.scores)
        torch.testing.assert_close(averaged.scores, (full.scores + unreasoned.scores) / 2)
        for key, value in averaged.contributions.items():  # the breakdown still sums to the score
            torch.testing.assert_close(value, (full.contributions[key] + unreasoned.contributions[key]) / 2)
    mean.save_pretrained(tmp_path / "mean")
    assert TSHSRConfig.load(tmp_path / "mean").readout_mean
    torch.testing.assert_close(TSHSRModel.from_pretrained(tmp_path / "mean").eval().score_encoded(
        images, texts).scores, averaged.scores)
    assert "readout_mean" not in last.config.to_dict()  # off: config.json as older versions wrote it
    for preset, steps in (("dual", None), ("sgr", None), ("tshsr", 0)):
        with pytest.raises(ValueError, match="readout_mean"):
            make_model(preset, readout_mean=True, **({} if steps is None else {"reasoning_steps": steps}))


def test_the_flag_trains_saves_reloads_and_is_kept_on_resume(data, tmp_path) -> None:  # noqa: F811
    from tshsr import TSHSRModel

    out = tmp_path / "run"
    result = run(train_cmd(data, out, "--epochs", "1", "--preset", "flat", "--readout-mean"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["readout_mean"] is True
    assert "--readout-mean" in (out / "README.md").read_text()
    assert TSHSRModel.from_pretrained(out).config.readout_mean
    resumed = run(train_cmd(data, out, "--epochs", "2", "--preset", "flat", "--resume"))  # flag left off: kept
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["readout_mean"] is True
