"""Part-by-part diagnosis (tshsr.analysis), fixed fusion weights and the training levers that make
every stream and level a matcher of its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tshsr.analysis import part_metrics, rankers, shortlist_pairs
from tshsr.metrics import retrieval_metrics
from tshsr.loss import LossSettings, mine
from tshsr_train import TrainArgs
from tshsr_train.loop import compute_loss


def _encode(model, regions, captions):
    images = model.encode_images(regions)
    texts = model.encode_texts(captions)
    return images, texts


def test_rankers_leave_one_out_is_full_minus_the_part(make_model, regions, captions) -> None:
    model = make_model("tshsr")
    images, texts = _encode(model, regions, captions)
    out = model.score_encoded(images, texts)
    ranked = rankers(out.contributions, out.level_scores, out.stream_scores, out.global_similarity)
    assert set(ranked) == {"full", "cosine", "i2t/local", "i2t/context", "i2t/global", "t2i/local", "t2i/context",
                           "t2i/global", "i2t stream", "t2i stream", "without i2t", "without t2i",
                           "without local", "without context", "without global"}
    torch.testing.assert_close(ranked["full"], out.scores)
    expected = out.scores - out.contributions["t2i/local"] - out.contributions["i2t/local"]
    torch.testing.assert_close(ranked["without local"], expected)
    # Without a stream, what is left is the other stream's score times its (positive) weight.
    w = model.mixing_weights()
    t2i_weight = sum(v for k, v in w.items() if k.startswith("t2i/"))
    torch.testing.assert_close(ranked["without i2t"], t2i_weight * out.stream_scores["t2i"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ranked["i2t/context"], out.level_scores["i2t/context"])


def test_rankers_of_a_single_part_model_have_no_breakdown(make_model, regions, captions) -> None:
    model = make_model("sgr")
    images, texts = _encode(model, regions, captions)
    out = model.score_encoded(images, texts)
    assert set(rankers(out.contributions, out.level_scores, out.stream_scores, out.global_similarity)) == {
        "full", "cosine"}


def test_part_metrics_exhaustive_matches_plain_metrics(make_model, regions, captions) -> None:
    model = make_model("tshsr")
    images, texts = _encode(model, regions[:3], captions[:6])
    caption_image = np.array([0, 0, 1, 1, 2, 2])
    results = part_metrics(model, images, texts, caption_image)
    out = model.score_encoded(images, texts)
    assert results["full"] == retrieval_metrics(out.scores.numpy(), caption_image)
    assert results["cosine"] == retrieval_metrics(out.global_similarity.numpy(), caption_image)


def test_part_metrics_with_a_shortlist_covering_everything_equals_exhaustive(make_model, regions, captions) -> None:
    model = make_model("tshsr")
    images, texts = _encode(model, regions[:3], captions[:6])
    caption_image = np.array([0, 0, 1, 1, 2, 2])
    exhaustive = part_metrics(model, images, texts, caption_image)
    shortlisted = part_metrics(model, images, texts, caption_image, rerank_k=10)  # K >= every side
    assert shortlisted.keys() == exhaustive.keys()
    for name in exhaustive:
        assert shortlisted[name]["rsum"] == pytest.approx(exhaustive[name]["rsum"]), name


def test_shortlist_pairs_are_each_sides_top_k() -> None:
    sim = np.array([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
    i2t_rows, i2t_cols, t2i_rows, t2i_cols = shortlist_pairs(sim, 2)
    assert list(zip(i2t_rows, i2t_cols)) == [(0, 1), (0, 2), (1, 0), (1, 2)]
    assert sorted(zip(t2i_rows, t2i_cols)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


@pytest.mark.parametrize("fusion", [dict(stream_fusion="equal", level_fusion="equal"), dict(level_fusion="equal")])
def test_fixed_fusion_weights_are_equal_and_not_parameters(fusion, make_model) -> None:
    model = make_model("tshsr", **fusion)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("level_logits") for n in names)
    weights = model.mixing_weights()
    per_stream = {s: sum(v for k, v in weights.items() if k.startswith(s)) for s in ("i2t", "t2i")}
    for stream, head in model.streams.items():
        levels = [weights[f"{stream}/{lv}"] for lv in head.levels]
        assert levels == pytest.approx([per_stream[stream] / 3] * 3)
    if fusion.get("stream_fusion") == "equal":
        assert per_stream == pytest.approx({"i2t": 0.5, "t2i": 0.5})


def test_level_aux_loss_trains_every_level_score(make_model, regions, captions) -> None:
    """With the per-level hinge, the local and context scores get gradients of their own."""
    model = make_model("tshsr", stream_fusion="equal", level_fusion="equal").train()
    positive = torch.eye(4, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    grads = {}
    for weight in (0.0, 1.0):
        model.zero_grad()
        feats, fmask = model.image_features(regions[:4])
        toks, tmask = model.text_features(captions[:4])  # the BiGRU is trained: a fresh graph each time
        args = TrainArgs(aux_level_weight=weight, aux_stream_weight=0.0, contrastive_weight=0.0,
                         hard_negatives=-1)
        loss, parts = compute_loss(model, feats, fmask, toks, tmask, positive, args, hardest=False, generator=gen)
        assert ("aux_levels" in parts) == (weight > 0)
        loss.backward()
        grads[weight] = model.streams["t2i"].local_readout.score.weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[1.0])


def test_model_mined_negatives_are_the_models_hardest(make_model, regions, captions) -> None:
    model = make_model("tshsr").train()
    images, texts = _encode(model, regions[:6], captions[:6])
    positive = torch.eye(6, dtype=torch.bool)
    sim = model.global_similarity(images, texts)
    settings = LossSettings(hard_negatives=1, random_negatives=0, mine_pool=5)  # the pool is every negative
    candidate = mine(model, images, texts, sim, positive, settings, torch.Generator().manual_seed(0))
    full = model.score_encoded(images, texts).scores.masked_fill(positive, float("-inf"))
    expected = positive.clone()
    expected[torch.arange(6), full.argmax(1)] = True
    expected[full.argmax(0), torch.arange(6)] = True
    assert torch.equal(candidate, expected)


# --- SCAN alignment at the local and context levels (level_cosine) ---------------------------
def test_attended_cosine_grid_equals_the_attended_vectors_cosine(make_model, regions, captions) -> None:
    """The Gram-matrix shortcut gives the same alignment as building every attended vector."""
    from tshsr.encoding import head_inputs
    from tshsr.attention import attended_cosine_grid, cross_attention, mean_alignment

    model = make_model("tshsr", level_cosine=True)
    images, texts = _encode(model, regions[:4], captions[:5])
    img, txt = head_inputs(images), head_inputs(texts)
    for queries_are_images in (True, False):
        q, k = (img, txt) if queries_are_images else (txt, img)
        grid = attended_cosine_grid(q["units"], q["mask"], k["units"], k["mask"], 9.0, queries_are_images)
        assert grid.shape == (4, 5)
        for i in range(4):
            for t in range(5):
                qi, ki = (i, t) if queries_are_images else (t, i)
                attended, _ = cross_attention(q["units"][qi:qi + 1], q["mask"][qi:qi + 1], k["units"][ki:ki + 1],
                                              k["mask"][ki:ki + 1], 9.0)
                expected = mean_alignment(attended, q["units"][qi:qi + 1], q["mask"][qi:qi + 1])
                assert grid[i, t].item() == pytest.approx(expected.item(), abs=1e-5)


def test_level_cosine_scores_blend_alignment_and_agree_across_paths(make_model, regions, captions) -> None:
    model = make_model("tshsr", level_cosine=True, stream_fusion="equal", level_fusion="equal")
    with torch.no_grad():
        for head in model.streams.values():
            head.alignment_mix.copy_(torch.tensor([0.7, -1.2]))  # unequal, so a swapped level shows
    images, texts = _encode(model, regions[:4], captions[:5])
    grid = model.score_encoded(images, texts)
    pi, pt = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    pairs = model.score_pairs(images, texts, pi.reshape(-1), pt.reshape(-1))
    torch.testing.assert_close(pairs.scores.view(4, 5), grid.scores, atol=1e-5, rtol=1e-5)
    for key in grid.level_scores:
        torch.testing.assert_close(pairs.level_scores[key].view(4, 5), grid.level_scores[key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(list(grid.contributions.values())).sum(0), grid.scores)
    # Turning the alignment fully off recovers the node readout alone: the blend is really there.
    off = make_model("tshsr", level_fusion="equal", stream_fusion="equal")
    off.load_state_dict({k: v for k, v in model.state_dict().items() if "alignment_mix" not in k})
    with torch.no_grad():
        for head in model.streams.values():
            head.alignment_mix.fill_(-60.0)
    torch.testing.assert_close(model.score_encoded(images, texts).scores, off.score_encoded(images, texts).scores)


def test_alignment_loss_trains_the_unit_projections(make_model, regions, captions) -> None:
    from tshsr.loss import LossSettings, matching_loss

    model = make_model("tshsr", level_cosine=True).train()
    positive = torch.eye(4, dtype=torch.bool)
    settings = LossSettings(contrastive_weight=0.0, aux_stream_weight=0.0, alignment_weight=1.0, hard_negatives=1)
    images = model.encode_image_features(*model.image_features(regions[:4]))
    texts = model.encode_text_features(*model.text_features(captions[:4]))
    out = matching_loss(model, images, texts, positive, settings, hardest=False)
    assert set(out.parts) >= {"alignment", "hinge"} and out.parts["alignment"] > 0
    model.zero_grad()
    out.parts["alignment"].backward()
    assert model.image_proj.weight.grad.abs().sum() > 0 and model.text_proj.weight.grad.abs().sum() > 0


def test_joint_alignment_loss_is_the_infonce_of_the_mean_score(make_model, regions, captions) -> None:
    from tshsr.encoding import head_inputs
    from tshsr.loss import alignment_loss
    from tshsr.losses import contrastive_loss

    model = make_model("tshsr", level_cosine=True).train()
    positive = torch.eye(4, dtype=torch.bool)
    images = model.encode_image_features(*model.image_features(regions[:4]))
    texts = model.encode_text_features(*model.text_features(captions[:4]))
    similarity = model.global_similarity(images, texts)
    scale = torch.tensor(10.0)
    out = alignment_loss(model, images, texts, positive, scale, chunk=4, similarity=similarity)
    aligned = model.head_kind.alignment_scores(model, head_inputs(images, torch.arange(4)),
                                               head_inputs(texts, torch.arange(4)))
    assert len(aligned) == 4  # i2t and t2i, local and context
    mean = (similarity + sum(aligned.values())) / 5
    torch.testing.assert_close(out["alignment_joint"], contrastive_loss(mean, positive, scale))
    assert "alignment_joint" not in alignment_loss(model, images, texts, positive, scale, chunk=4)


def test_complement_alignment_loss_pushes_each_stream_where_the_other_is_wrong(make_model, regions, captions) -> None:
    from tshsr.encoding import head_inputs
    from tshsr.loss import alignment_loss
    from tshsr.losses import contrastive_loss

    model = make_model("tshsr", level_cosine=True).train()
    positive = torch.eye(4, dtype=torch.bool)
    images = model.encode_image_features(*model.image_features(regions[:4]))
    texts = model.encode_text_features(*model.text_features(captions[:4]))
    scale = torch.tensor(10.0)
    out = alignment_loss(model, images, texts, positive, scale, chunk=4, complement=True)
    a = model.head_kind.alignment_scores(model, head_inputs(images, torch.arange(4)),
                                         head_inputs(texts, torch.arange(4)))
    expected = torch.stack([contrastive_loss((a[f"{s}/{lv}"] + a[f"{o}/{lv}"]) / 2, positive, scale)
                            for s, o in (("i2t", "t2i"), ("t2i", "i2t")) for lv in ("local", "context")]).mean()
    torch.testing.assert_close(out["alignment_complement"], expected)
    assert "alignment_complement" not in alignment_loss(model, images, texts, positive, scale, chunk=4)
    # One stream alone has no partner: no such term.
    single = make_model("i2t", level_cosine=True).train()
    img = single.encode_image_features(*single.image_features(regions[:4]))
    txt = single.encode_text_features(*single.text_features(captions[:4]))
    assert "alignment_complement" not in alignment_loss(single, img, txt, positive, scale, chunk=4, complement=True)


def test_stream_agreement_matches_each_streams_recall(make_model, regions, captions) -> None:
    from tshsr.analysis import shortlisted_values, stream_agreement

    model = make_model("tshsr")
    images, texts = _encode(model, regions[:3], captions[:6])
    caption_image = np.array([0, 0, 1, 1, 2, 2])
    shortlisted = shortlisted_values(model, images, texts, rerank_k=2)  # a real shortlist: 2 of 6, 2 of 3
    metrics = part_metrics(model, images, texts, caption_image, rerank_k=2, shortlisted=shortlisted)
    assert metrics == part_metrics(model, images, texts, caption_image, rerank_k=2)
    agreement = stream_agreement(shortlisted, caption_image)
    for direction in ("i2t", "t2i"):
        a = agreement[direction]
        assert a["both"] + a["only_i2t"] + a["only_t2i"] + a["neither"] == pytest.approx(1.0)
        assert 100 * (a["both"] + a["only_i2t"]) == pytest.approx(metrics["i2t stream"][direction]["r1"])
        assert 100 * (a["both"] + a["only_t2i"]) == pytest.approx(metrics["t2i stream"][direction]["r1"])
    itself = stream_agreement(shortlisted, caption_image, streams=("i2t", "i2t"))
    assert itself["i2t"]["same_top1"] == 1.0 and itself["t2i"]["spearman"] == pytest.approx(1.0)


# --- the reasoning graph with local <-> global edges beside the context level (context_skip) --------
def test_context_skip_adds_edges_and_scores_the_same_on_every_path(make_model, regions, captions, tmp_path) -> None:
    from tshsr import TSHSRConfig, TSHSRModel

    model = make_model("tshsr", context_skip=True, level_cosine=True).eval()
    assert all(hasattr(h.reasoning, "skip_up") for h in model.streams.values())
    images, texts = _encode(model, regions[:4], captions[:5])
    grid = model.score_encoded(images, texts)
    pi, pt = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    pairs = model.score_pairs(images, texts, pi.reshape(-1), pt.reshape(-1))
    torch.testing.assert_close(pairs.scores.view(4, 5), grid.scores, atol=1e-5, rtol=1e-5)
    # The skip edges really take part: zeroing them changes the scores.
    with torch.no_grad():
        for h in model.streams.values():
            h.reasoning.skip_up.weight.zero_(); h.reasoning.skip_up.bias.fill_(-1.0)
            h.reasoning.skip_down.weight.zero_(); h.reasoning.skip_down.bias.fill_(-1.0)
    assert not torch.allclose(model.score_encoded(images, texts).scores, grid.scores)
    # Saved and reloaded with the flag; a config without it reads and hashes as before.
    model.save_pretrained(tmp_path / "m")
    assert TSHSRModel.from_pretrained(tmp_path / "m").config.context_skip
    plain = TSHSRConfig.preset("tshsr")
    assert "context_skip" not in plain.to_dict()
    assert TSHSRConfig.from_dict(plain.to_dict()).fingerprint() == plain.fingerprint()
    with pytest.raises(ValueError, match="context_skip"):
        TSHSRConfig.preset("flat", context_skip=True)


def test_shortlist_rankers_include_each_alignment_alone(make_model, regions, captions) -> None:
    """The diagnosis ranks each level's alignment score alone (before nodes and reasoning); on a
    pair it is the same value the grid path computes for training."""
    from tshsr.analysis import shortlisted_values
    from tshsr.encoding import head_inputs

    model = make_model("tshsr", level_cosine=True)
    images, texts = _encode(model, regions[:4], captions[:6])
    s = shortlisted_values(model, images, texts, rerank_k=3)
    grid = model.head_kind.alignment_scores(model, head_inputs(images), head_inputs(texts))
    assert set(grid) == {"i2t/local", "i2t/context", "t2i/local", "t2i/context"}
    for key, values in grid.items():
        expected = values.double().numpy()[np.arange(4)[:, None], s.i2t_cols]
        np.testing.assert_allclose(s.i2t[f"{key} alignment"], expected, atol=1e-5)
    # Models without alignment levels have no such rankers.
    plain = make_model("tshsr")
    assert not any(k.endswith("alignment") for k in shortlisted_values(plain, *_encode(plain, regions[:4], captions[:6]),
                                                                         rerank_k=3).i2t)


def test_alignment_loss_can_leave_the_context_level_out(make_model, regions, captions) -> None:
    from tshsr.encoding import head_inputs
    from tshsr.loss import alignment_loss
    from tshsr.losses import contrastive_loss

    model = make_model("tshsr", level_cosine=True).train()
    positive = torch.eye(4, dtype=torch.bool)
    images = model.encode_image_features(*model.image_features(regions[:4]))
    texts = model.encode_text_features(*model.text_features(captions[:4]))
    scale = torch.tensor(10.0)
    out = alignment_loss(model, images, texts, positive, scale, chunk=4, levels=("local",))
    aligned = model.head_kind.alignment_scores(model, head_inputs(images, torch.arange(4)),
                                               head_inputs(texts, torch.arange(4)))
    expected = (contrastive_loss(aligned["i2t/local"], positive, scale)
                + contrastive_loss(aligned["t2i/local"], positive, scale)) / 2
    torch.testing.assert_close(out["alignment"], expected)
    only_local = model.head_kind.alignment_scores(model, head_inputs(images, torch.arange(4)),
                                                  head_inputs(texts, torch.arange(4)), levels=("local",))
    assert set(only_local) == {"i2t/local", "t2i/local"}  # the context grid is not computed at all
    # The context queries then get no gradient from this term.
    model.zero_grad()
    out["alignment"].backward()
    assert model.image_context_queries.grad is None or model.image_context_queries.grad.abs().sum() == 0


def test_context_detach_keeps_scores_and_cuts_the_context_gradient_into_units(make_model, regions, captions) -> None:
    """With detach_context_units the context level's own inputs (its units and the keys it attends
    over) carry no gradient into the unit vectors. Without reasoning steps the context score
    depends on nothing else (with them, it also reads the local nodes, which is wanted)."""
    from tshsr.encoding import head_inputs

    model = make_model("tshsr", level_cosine=True, reasoning_steps=0).train()
    with torch.no_grad():
        feats = (model.image_features(regions[:3]), model.text_features(captions[:3]))

    def run(detach: bool, part: str):
        model.head_kind.set_context_detach(model, detach)
        model.zero_grad()
        images, texts = model.encode_image_features(*feats[0]), model.encode_text_features(*feats[1])
        if part == "score":
            out = model.score_pairs(images, texts, torch.arange(3), torch.arange(3))
            value, scores = out.level_scores["i2t/context"].sum() + out.level_scores["t2i/context"].sum(), out.scores
        else:  # the context alignment the InfoNCE trains
            aligned = model.head_kind.alignment_scores(model, head_inputs(images), head_inputs(texts))
            value, scores = aligned["i2t/context"].sum() + aligned["t2i/context"].sum(), aligned["i2t/context"]
        value.backward()
        units_grad = sum(float(p.grad.abs().sum()) for p in (model.image_proj.weight, model.text_proj.weight)
                         if p.grad is not None)
        return scores.detach(), units_grad, float(model.image_context_queries.grad.abs().sum())

    for part in ("score", "alignment"):
        scores, units_grad, _ = run(False, part)
        assert units_grad > 0
        detached_scores, detached_units_grad, queries_grad = run(True, part)
        torch.testing.assert_close(detached_scores, scores)
        assert detached_units_grad == 0  # nothing reaches the unit vectors
        assert queries_grad > 0  # the context queries still learn
    model.head_kind.set_context_detach(model, False)


# --- a learned salience per word (word_salience) ----------------------------------------------
def test_word_salience_starts_neutral_and_scores_the_same_on_every_path(make_model, regions, captions,
                                                                          tmp_path) -> None:
    from tshsr import TSHSRConfig, TSHSRModel
    from tshsr.testing import assert_scoring_paths_agree

    flags = dict(level_cosine=True, context_skip=True)
    base = make_model("tshsr", **flags)
    model = make_model("tshsr", word_salience=True, **flags)
    images, texts = _encode(model, regions[:4], captions[:5])
    # Zero at first: every score as without it (and no other layer starts differently).
    torch.testing.assert_close(model.score_encoded(images, texts).scores,
                               base.score_encoded(*_encode(base, regions[:4], captions[:5])).scores)
    with torch.no_grad():
        for head in model.streams.values():
            head.word_salience.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(3))
    grid = model.score_encoded(images, texts, return_attention=True)
    assert not torch.allclose(grid.scores, base.score_encoded(*_encode(base, regions[:4], captions[:5])).scores)
    # Pairs and grid agree, and the training grid of alignment scores is the pair path's, salience included.
    assert_scoring_paths_agree(model, images, texts, grid.scores)
    # Saved and reloaded with the flag; configs without it read and hash as before; TSHSR heads only.
    model.save_pretrained(tmp_path / "m")
    again = TSHSRModel.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(again.score_encoded(images, texts).scores, grid.scores)
    assert "word_salience" not in TSHSRConfig.preset("tshsr").to_dict()
    with pytest.raises(ValueError, match="word_salience"):
        TSHSRConfig.preset("sgr", word_salience=True)


def test_context_cut_knocks_the_context_level_out_of_the_reasoning_and_restores_it(make_model, regions,
                                                                                    captions) -> None:
    from tshsr.analysis import context_cut

    model = make_model("tshsr")
    images, texts = _encode(model, regions, captions)
    with torch.no_grad():
        before = model.score_encoded(images, texts)
        with context_cut(model) as cut:
            knocked = model.score_encoded(images, texts)
        after = model.score_encoded(images, texts)
    assert cut
    torch.testing.assert_close(after.scores, before.scores)  # switched back on exit
    assert not torch.allclose(knocked.scores, before.scores)
    # The cosine does not go through the reasoning; the global node, which gathered the context
    # nodes, is not the same any more.
    torch.testing.assert_close(knocked.global_similarity, before.global_similarity)
    assert not torch.allclose(knocked.level_scores["i2t/global"], before.level_scores["i2t/global"])
    assert not any(getattr(m, "cut_context", False) for m in model.modules())


def test_context_cut_restores_the_switch_after_an_error(make_model) -> None:
    from tshsr.analysis import context_cut

    model = make_model("tshsr")
    with pytest.raises(RuntimeError), context_cut(model):
        raise RuntimeError("boom")
    assert not any(getattr(m, "cut_context", False) for m in model.modules())


def test_reasoning_off_reads_every_level_from_its_nodes_as_built_and_restores_the_steps(make_model, regions,
                                                                                      captions) -> None:
    from tshsr.analysis import context_cut, reasoning_off
    from tshsr.heads import HierarchicalReasoning

    for preset in ("tshsr", "flat"):
        model = make_model(preset)
        images, texts = _encode(model, regions, captions)
        steps = [m.steps for m in model.modules() if isinstance(m, HierarchicalReasoning)]
        with torch.no_grad():
            before = model.score_encoded(images, texts)
            with reasoning_off(model) as reasons:
                off = model.score_encoded(images, texts)
                if preset == "tshsr":  # with no step, cutting the context path changes nothing more
                    with context_cut(model):
                        torch.testing.assert_close(model.score_encoded(images, texts).scores, off.scores)
            after = model.score_encoded(images, texts)
        assert reasons and steps and all(n > 0 for n in steps)
        assert [m.steps for m in model.modules() if isinstance(m, HierarchicalReasoning)] == steps
        torch.testing.assert_close(after.scores, before.scores)
        assert not torch.allclose(off.scores, before.scores)
        torch.testing.assert_close(off.global_similarity, before.global_similarity)  # the cosine is not reasoned
    with pytest.raises(RuntimeError), reasoning_off(model):
        raise RuntimeError("boom")
    assert [m.steps for m in model.modules() if isinstance(m, HierarchicalReasoning)] == steps
    with reasoning_off(make_model("dual")) as reasons:
        assert not reasons


def test_knockout_metrics_only_for_models_with_a_context_level(make_model, regions, captions) -> None:
    from tshsr.analysis import knockout_metrics

    caption_image = np.array([0, 0, 1, 1, 2, 2])
    flat = make_model("flat")
    images, texts = _encode(flat, regions[:3], captions[:6])
    assert knockout_metrics(flat, images, texts, caption_image) == {}
    model = make_model("tshsr")
    images, texts = _encode(model, regions[:3], captions[:6])
    knocked = knockout_metrics(model, images, texts, caption_image)
    assert "without context in reasoning" in knocked
    # Same protocol as part_metrics: a shortlist that covers every pair gives the exhaustive numbers.
    assert knockout_metrics(model, images, texts, caption_image, rerank_k=6) == knocked
