"""--context-relations: in every reasoning step the context nodes reason over each other (SGR's
relation step, as a residual), so the context level can carry relations between its phrases and
neighbourhoods rather than only their means."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_context_gain import train_batch
from tests.test_train import data, run, train_cmd  # noqa: F401  (the precomp fixture)
from tshsr import TSHSRConfig
from tshsr.heads import HierarchicalReasoning
from tshsr.loss import LossSettings, matching_loss

FLAGS = dict(context_skip=True, context_relations=True)


def _steps(model):
    return [m.context_relations for m in model.modules() if isinstance(m, HierarchicalReasoning)]


def test_a_silent_relation_step_scores_as_the_model_without_it(make_model, regions, captions) -> None:
    model = make_model("tshsr", **FLAGS)
    steps = _steps(model)
    assert len(steps) == 2 and all(s is not None for s in steps)
    plain = make_model("tshsr", context_skip=True)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all("context_relations" in k for k in unexpected)
    images, texts = model.encode_images(regions[:4]), model.encode_texts(captions[:5])
    related = model.score_encoded(images, texts).scores
    assert not torch.allclose(related, plain.score_encoded(images, texts).scores)  # the step changes scores
    with torch.no_grad():
        for s in steps:  # relu(W x + 0) with W = 0 adds nothing
            s.update.weight.zero_()
            s.update.bias.zero_()
    torch.testing.assert_close(model.score_encoded(images, texts).scores, plain.score_encoded(images, texts).scores)


def test_the_relation_step_learns(make_model, regions, captions) -> None:
    model = make_model("tshsr", **FLAGS).train()
    settings = LossSettings(hard_negatives=-1, random_negatives=0)
    out = matching_loss(model, *train_batch(model, regions, captions), settings, hardest=False)
    out.loss.backward()
    for s in _steps(model):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (s.query.weight, s.key.weight,
                                                                           s.update.weight))


def test_config_needs_the_context_level_and_stays_out_of_older_configs() -> None:
    with pytest.raises(ValueError, match="context_relations"):
        TSHSRConfig.preset("flat", context_relations=True)
    assert "context_relations" not in TSHSRConfig.preset("tshsr").to_dict()
    assert TSHSRConfig.preset("tshsr", context_relations=True).to_dict()["context_relations"] is True


def test_the_flag_trains_saves_and_reloads(data, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "run"
    result = run(train_cmd(data, out, "--epochs", "1", "--preset", "tshsr", "--context-skip",
                           "--context-relations"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["context_relations"] is True
    assert "--context-relations" in (out / "README.md").read_text()
    from tshsr import TSHSRModel

    model = TSHSRModel.from_pretrained(out)
    assert all(s is not None for s in _steps(model))
