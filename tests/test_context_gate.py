"""--context-gate: the context level's messages in the reasoning are scaled by a learned gate that
starts at zero (ReZero), so a new model scores exactly as with the context path cut, and opens it
only as far as training finds it useful."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_context_gain import train_batch
from tests.test_train import data, run, train_cmd  # noqa: F401  (the precomp fixture)
from tshsr import TSHSRConfig
from tshsr.analysis import context_cut
from tshsr.heads import HierarchicalReasoning
from tshsr.loss import LossSettings, matching_loss

FLAGS = dict(context_skip=True, context_gate=True)


def _encode(model, regions, captions):
    return model.encode_images(regions[:4]), model.encode_texts(captions[:5])


def test_a_closed_gate_scores_as_the_cut_path_and_an_open_one_does_not(make_model, regions, captions) -> None:
    model = make_model("tshsr", **FLAGS)
    gates = [m.context_scale for m in model.modules() if isinstance(m, HierarchicalReasoning)]
    assert len(gates) == 2 and all(float(g.detach()) == 0.0 for g in gates)
    images, texts = _encode(model, regions, captions)
    full = model.score_encoded(images, texts).scores
    with context_cut(model):
        cut = model.score_encoded(images, texts).scores
    torch.testing.assert_close(full, cut)
    with torch.no_grad():
        for g in gates:
            g.fill_(1.0)
    assert not torch.allclose(model.score_encoded(images, texts).scores, cut)


def test_the_gate_learns(make_model, regions, captions) -> None:
    model = make_model("tshsr", **FLAGS).train()
    settings = LossSettings(hard_negatives=-1, random_negatives=0)
    out = matching_loss(model, *train_batch(model, regions, captions), settings, hardest=False)
    out.loss.backward()
    for m in model.modules():
        if isinstance(m, HierarchicalReasoning):
            assert m.context_scale.grad is not None and m.context_scale.grad.abs() > 0


def test_config_needs_the_skip_edges_and_stays_out_of_older_configs() -> None:
    with pytest.raises(ValueError, match="context_gate"):
        TSHSRConfig.preset("tshsr", context_gate=True)
    assert "context_gate" not in TSHSRConfig.preset("tshsr", context_skip=True).to_dict()
    assert TSHSRConfig.preset("tshsr", context_skip=True, context_gate=True).to_dict()["context_gate"] is True


def test_the_flag_trains_saves_and_reloads(data, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "run"
    result = run(train_cmd(data, out, "--epochs", "1", "--preset", "tshsr", "--context-skip", "--context-gate"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["context_gate"] is True
    assert "--context-gate" in (out / "README.md").read_text()
    from tshsr import TSHSRModel

    model = TSHSRModel.from_pretrained(out)
    assert all(m.context_scale is not None for m in model.modules() if isinstance(m, HierarchicalReasoning))
