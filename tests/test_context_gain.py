"""--context-gain-weight: a hinge on what the context path adds to each mined pair's score (the
full score minus the score with the context level cut from the reasoning), so that the context
path's contribution is trained to rank by itself."""

from __future__ import annotations

import json

import torch

from tests.test_train import data, run, train_cmd  # noqa: F401  (the precomp fixture)
from tshsr.analysis import context_cut
from tshsr.heads import HierarchicalReasoning
from tshsr.loss import LossSettings, matching_loss, scores_with_context_cut
from tshsr.losses import hinge_loss
from tshsr_train.args import parse_args

FLAGS = dict(context_skip=True)


def train_batch(model, regions, captions):
    """Four images and their four captions, encoded with gradient, and which pairs match."""
    images = model.encode_image_features(*model.image_features(regions[:4]))
    texts = model.encode_text_features(*model.text_features(captions[:4]))
    return images, texts, torch.eye(4, dtype=torch.bool)


def test_the_gain_is_the_full_score_minus_the_cut_score_and_trains_the_context_path(make_model, regions,
                                                                                  captions) -> None:
    model = make_model("tshsr", **FLAGS).train()
    images, texts, positive = train_batch(model, regions, captions)
    settings = LossSettings(hard_negatives=-1, random_negatives=0, context_gain_weight=0.5)
    out = matching_loss(model, images, texts, positive, settings, hardest=False)
    assert not any(m.cut_context for m in model.modules() if isinstance(m, HierarchicalReasoning))  # restored
    pi, pt = torch.ones_like(positive).nonzero(as_tuple=True)
    with torch.no_grad():
        full = model.score_pairs(images, texts, pi, pt).scores
        with context_cut(model):
            cut = model.score_pairs(images, texts, pi, pt).scores
        twin, twin_cut = scores_with_context_cut(model, images, texts, pi, pt)
    # One pass over the nodes, reasoned twice, gives the same scores as scoring twice.
    torch.testing.assert_close(twin.scores, full)
    torch.testing.assert_close(twin_cut, cut)
    for key, v in model.score_pairs(images, texts, pi, pt).level_scores.items():
        torch.testing.assert_close(twin.level_scores[key], v.detach())
    assert not any(m.twin_cut for m in model.modules() if hasattr(m, "twin_cut"))  # restored
    expected = hinge_loss((full - cut).view(4, 4), positive, torch.ones_like(positive), settings.margin, False)
    torch.testing.assert_close(out.parts["context_gain"], expected)
    assert (full - cut).abs().max() > 0  # the context path does move the score
    # The gain's gradient reaches the context path's own layers.
    model.zero_grad()
    out.parts["context_gain"].backward()
    up_context = [m.up_context.weight.grad for m in model.modules() if isinstance(m, HierarchicalReasoning)]
    assert all(g is not None and g.abs().sum() > 0 for g in up_context)


def test_off_by_default_and_for_a_model_without_a_context_level(make_model, regions, captions) -> None:
    model = make_model("tshsr", **FLAGS).train()
    images, texts, positive = train_batch(model, regions, captions)
    assert "context_gain" not in matching_loss(model, images, texts, positive, LossSettings(), hardest=False).parts
    flat = make_model("flat").train()
    images, texts, positive = train_batch(flat, regions, captions)
    out = matching_loss(flat, images, texts, positive, LossSettings(context_gain_weight=0.5), hardest=False)
    assert "context_gain" not in out.parts


def test_the_flag_is_checked_trained_and_recorded(data, tmp_path) -> None:  # noqa: F811
    assert parse_args(["--context-gain-weight", "0.5"]).context_gain_weight == 0.5
    out = tmp_path / "run"
    result = run(train_cmd(data, out, "--epochs", "1", "--preset", "tshsr", "--context-skip",
                           "--context-gain-weight", "0.5"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "train_args.json").read_text())["context_gain_weight"] == 0.5
    assert "--context-gain-weight 0.5" in (out / "README.md").read_text()
    assert any("context_gain" in json.loads(line) for line in
               (out / "log.jsonl").read_text().splitlines() if line.strip())


def test_refused_without_a_context_level_or_with_path_dropout(data, tmp_path) -> None:  # noqa: F811
    flat = run(train_cmd(data, tmp_path / "flat", "--epochs", "1", "--preset", "flat",
                         "--context-gain-weight", "0.5"))
    assert flat.returncode != 0 and "--context-gain-weight needs a preset" in flat.stderr
    both = run(train_cmd(data, tmp_path / "both", "--epochs", "1", "--preset", "tshsr",
                         "--context-gain-weight", "0.5", "--context-path-dropout", "0.5"))
    assert both.returncode != 0 and "do not combine" in both.stderr
    assert not (tmp_path / "flat" / "model.safetensors").exists()
    assert not (tmp_path / "both" / "model.safetensors").exists()
