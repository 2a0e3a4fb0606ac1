"""Core model behaviour: exact score breakdown, presets, attention maps, invariance to batching,
SGR/SAF against their equations, clear errors on empty inputs, config round trips."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tshsr import InvalidInputError, TSHSRConfig
from tshsr.sgraf import SGRAFHead

PRESETS = TSHSRConfig.PRESETS
TOL = 1e-5


# ----------------------------------------------------------------------------------------------
# 1. The breakdown is exact
# ----------------------------------------------------------------------------------------------
EXPECTED_KEYS = {
    "tshsr": ["i2t/local", "i2t/context", "i2t/global", "t2i/local", "t2i/context", "t2i/global"],
    "flat": ["i2t/local", "i2t/global", "t2i/local", "t2i/global"],
    "t2i": ["t2i/local", "t2i/context", "t2i/global"],
    "i2t": ["i2t/local", "i2t/context", "i2t/global"],
}


def test_presets_list_is_complete() -> None:
    assert set(PRESETS) == {"tshsr", "flat", "t2i", "i2t", "sgr", "saf", "dual"}


@pytest.mark.parametrize("preset", PRESETS)
def test_contributions_sum_to_scores(preset, make_model, regions, captions) -> None:
    model = make_model(preset)
    keys = model.config.contribution_keys
    if preset in EXPECTED_KEYS:
        assert keys == EXPECTED_KEYS[preset]
    for out in (
        model.score(regions, captions),  # exhaustive grid path
        model.score_pairs(model.encode_images(regions), model.encode_texts(captions),
                          [0, 5, 2, 3, 1], [6, 0, 4, 3, 1]),  # explicit pairs path
    ):
        assert list(out.contributions) == keys
        assert set(out.level_scores) == set(out.weights) == set(keys)
        total = torch.stack([out.contributions[k] for k in keys]).sum(0)
        assert torch.allclose(total, out.scores, atol=TOL, rtol=0)
        for key in keys:
            assert torch.allclose(out.contributions[key], out.weights[key] * out.level_scores[key], atol=TOL, rtol=0)
        # A convex combination: non-negative weights that sum to one.
        weights = np.array([out.weights[k] for k in keys])
        assert (weights >= 0).all() and abs(weights.sum() - 1) < 1e-6
        assert torch.isfinite(out.scores).all()
    if model.config.head == "tshsr":
        # The randomized fusion weights really are unequal, so the check above was not trivial.
        assert np.ptp(weights) > 0.01
        # Each stream's score is its own convex combination of its levels; the final score fuses them.
        fused = 0
        for stream in model.config.streams:
            stream_keys = [k for k in keys if k.startswith(stream + "/")]
            share = sum(out.weights[k] for k in stream_keys)
            recombined = sum(out.weights[k] / share * out.level_scores[k] for k in stream_keys)
            assert torch.allclose(out.stream_scores[stream], recombined, atol=TOL, rtol=0)
            fused = fused + share * out.stream_scores[stream]
        assert torch.allclose(fused, out.scores, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# 2. Every preset builds, runs, and is a different model
# ----------------------------------------------------------------------------------------------
def test_presets_give_different_scores(make_model, regions, captions) -> None:
    scores = {}
    for preset in PRESETS:
        out = make_model(preset, randomize=False).score(regions, captions)
        assert out.scores.shape == (len(regions), len(captions))
        assert torch.isfinite(out.scores).all()
        assert out.scores.std() > 1e-4, f"{preset}: every pair gets the same score"
        scores[preset] = out.scores
    for a, b in itertools.combinations(PRESETS, 2):
        assert (scores[a] - scores[b]).abs().max() > 1e-4, f"presets {a} and {b} give the same scores"


def test_presets_build_the_parts_they_name(make_model) -> None:
    for preset in PRESETS:
        model = make_model(preset, randomize=False)
        names = {n.split(".")[0] for n, _ in model.named_parameters()}
        has_context = "context" in model.config.levels and model.config.head == "tshsr"
        assert ("image_context_queries" in names) == has_context, preset
        if model.config.head == "tshsr":
            assert set(model.streams) == set(model.config.streams)
            assert ("stream_logits" in names) == (len(model.config.streams) > 1)
            assert "sgraf" not in names
        elif model.config.head in ("sgr", "saf"):
            assert "sgraf" in names and "streams" not in names
            assert model.sgraf.graph_reasoning == (preset == "sgr")
            if preset == "sgr":
                assert len(model.sgraf.steps) == 3  # SGRAF reasons for 3 steps
        else:
            assert "sgraf" not in names and "streams" not in names


# ----------------------------------------------------------------------------------------------
# 3. Attention maps
# ----------------------------------------------------------------------------------------------
def _n_words(caption: str) -> int:
    return len(caption.split()) + 2  # BiGRU units are <start>, the words, <end>


@pytest.mark.parametrize("preset", ["tshsr", "sgr", "saf"])
def test_attention_sums_to_one_over_valid_keys(preset, make_model, regions, captions) -> None:
    model = make_model(preset)
    # Image 1 has only 3 valid regions, image 4 only 1: padded regions must get no attention.
    region_mask = torch.ones(regions.shape[:2], dtype=torch.bool)
    region_mask[1, 3:] = False
    region_mask[4, 1:] = False
    images = model.encode_image_features(torch.from_numpy(regions), region_mask)
    texts = model.encode_texts(captions)
    out = model.score_encoded(images, texts, block_pairs=10, return_attention=True)
    n_words = torch.tensor([_n_words(c) for c in captions])
    assert torch.equal(texts.mask.sum(1), n_words)
    L = texts.mask.shape[1]
    word_valid = texts.mask.unsqueeze(0).expand(len(regions), -1, -1)  # [ni, nt, L]
    region_valid = region_mask.unsqueeze(1).expand(-1, len(captions), -1)  # [ni, nt, K]

    # t2i: words over regions, [ni, nt, L, K]
    att = out.attentions["t2i"]["attention"]
    assert att.shape == (len(regions), len(captions), L, regions.shape[1])
    sums = att.sum(-1)
    assert torch.allclose(sums[word_valid], torch.ones(()), atol=TOL)
    assert (sums[~word_valid] == 0).all(), "padded words must have empty attention rows"
    assert (att.masked_select(~region_valid.unsqueeze(2)) == 0).all(), "padded regions got attention"
    assert (att >= 0).all()

    lw = out.attentions["t2i"].get("local_weights")
    if preset == "tshsr":
        assert torch.allclose(lw.sum(-1), torch.ones(()), atol=TOL)
    elif preset == "saf":
        # SAF filters [s_g, s_1..s_L] together: the words share what the global node leaves.
        assert ((lw.sum(-1) > 0) & (lw.sum(-1) < 1)).all()
    if lw is not None:
        assert (lw[~word_valid] == 0).all() and (lw >= 0).all()

    # The explicit-pairs path (training, reranking) gives the same maps as the exhaustive one.
    ii, tt = torch.tensor([1, 4, 0, 4]), torch.tensor([3, 2, 6, 0])
    pairs = model.score_pairs(images, texts, ii, tt, return_attention=True)
    for stream, maps in pairs.attentions.items():
        for name, value in maps.items():
            if value is not None:
                assert torch.allclose(value, out.attentions[stream][name][ii, tt], atol=TOL), (stream, name)

    if preset == "tshsr":
        # i2t: regions over words, [ni, nt, K, L]
        att = out.attentions["i2t"]["attention"]
        sums = att.sum(-1)
        assert torch.allclose(sums[region_valid], torch.ones(()), atol=TOL)
        assert (sums[~region_valid] == 0).all()
        assert (att.masked_select(~word_valid.unsqueeze(2)) == 0).all(), "padded words got attention"
        lw = out.attentions["i2t"]["local_weights"]
        assert torch.allclose(lw.sum(-1), torch.ones(()), atol=TOL)
        assert (lw[~region_valid] == 0).all()
        # Context units attend over the key side's valid units too.
        ctx = out.attentions["t2i"]["context_attention"]
        assert torch.allclose(ctx.sum(-1), torch.ones(()), atol=TOL)
        assert (ctx.masked_select(~region_valid.unsqueeze(2)) == 0).all()
        member = out.attentions["i2t"]["context_membership"]
        assert torch.allclose(member.sum(-1), torch.ones(()), atol=TOL)
        assert (member.masked_select(~region_valid.unsqueeze(2)) == 0).all()


@pytest.mark.parametrize("preset", ["tshsr", "sgr", "saf"])
def test_padded_regions_do_not_change_scores(preset, make_model, regions, captions) -> None:
    model = make_model(preset)
    mask = torch.ones(regions.shape[:2], dtype=torch.bool)
    mask[:, 3:] = False
    feats = torch.from_numpy(regions)
    noisy = feats.clone()
    noisy[:, 3:] = torch.randn_like(noisy[:, 3:]) * 100
    texts = model.encode_texts(captions)
    a = model.score_encoded(model.encode_image_features(feats, mask), texts).scores
    b = model.score_encoded(model.encode_image_features(noisy, mask), texts).scores
    c = model.score_encoded(model.encode_image_features(feats[:, :3], mask[:, :3]), texts).scores
    assert torch.allclose(a, b, atol=TOL, rtol=0)
    assert torch.allclose(a, c, atol=TOL, rtol=0)
    # ...while the valid regions do matter.
    d = model.score_encoded(model.encode_image_features(noisy, torch.ones_like(mask)), texts).scores
    assert (a - d).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# 4. Scores do not depend on batch composition, gallery order or block size
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_scores_independent_of_batching(preset, make_model, regions, captions) -> None:
    model = make_model(preset)
    images, texts = model.encode_images(regions), model.encode_texts(captions)
    full = model.score_encoded(images, texts).scores
    assert torch.allclose(model.score(regions, captions).scores, full, atol=TOL, rtol=0)

    # Permuted gallery and queries: the same scores, permuted.
    pi, pt = [3, 0, 5, 1, 4, 2], [6, 2, 0, 5, 3, 1, 4]
    permuted = model.score(regions[pi], [captions[t] for t in pt]).scores
    assert torch.allclose(permuted, full[pi][:, pt], atol=TOL, rtol=0)

    # A subset (shorter captions only: the text batch gets less padding).
    si, st = [4, 1], [3, 6, 0]
    subset = model.score(regions[si], [captions[t] for t in st]).scores
    assert torch.allclose(subset, full[si][:, st], atol=TOL, rtol=0)
    single = model.score(regions[2:3], captions[4:5]).scores
    assert torch.allclose(single, full[2:3, 4:5], atol=TOL, rtol=0)

    # Encoding in small batches.
    small = model.score_encoded(model.encode_images(regions, batch_size=4),
                                model.encode_texts(captions, batch_size=3)).scores
    assert torch.allclose(small, full, atol=TOL, rtol=0)

    # Block sizes of exhaustive scoring, including blocks that do not divide the gallery.
    exhaustive = model.score_encoded(images, texts)
    for block_pairs in (1, 5, 13, 10_000):
        out = model.score_encoded(images, texts, block_pairs=block_pairs)
        assert torch.allclose(out.scores, full, atol=TOL, rtol=0), block_pairs
        for key, value in out.contributions.items():
            assert torch.allclose(value, exhaustive.contributions[key], atol=TOL, rtol=0), (block_pairs, key)

    # Explicit pairs match the exhaustive matrix entry for entry.
    ii = torch.tensor([0, 5, 5, 2, 3, 1, 4, 0])
    tt = torch.tensor([6, 0, 6, 4, 3, 1, 2, 0])
    pairs = model.score_pairs(images, texts, ii, tt)
    assert pairs.scores.shape == (len(ii),)
    assert torch.allclose(pairs.scores, full[ii, tt], atol=TOL, rtol=0)
    for key in model.config.contribution_keys:
        assert torch.allclose(pairs.contributions[key], exhaustive.contributions[key][ii, tt], atol=TOL, rtol=0)


@pytest.mark.parametrize("preset", ["tshsr", "sgr"])
def test_compiled_scoring_matches_eager(preset, make_model, regions, captions) -> None:
    """score_encoded(compile=True) pads blocks to one fixed shape for torch.compile; the padding
    must never leak into the scores or the breakdown (blocks of 4 do not divide 6 x 7)."""
    model = make_model(preset)
    images, texts = model.encode_images(regions), model.encode_texts(captions)
    eager = model.score_encoded(images, texts, block_pairs=8)
    compiled = model.score_encoded(images, texts, block_pairs=8, compile=True)
    assert torch.allclose(compiled.scores, eager.scores, atol=TOL, rtol=0)
    assert compiled.contributions.keys() == eager.contributions.keys()
    for key, value in compiled.contributions.items():
        assert torch.allclose(value, eager.contributions[key], atol=TOL, rtol=0), key


@pytest.mark.parametrize("preset", ["tshsr", "sgr"])
def test_bf16_scoring_is_close_and_returns_fp32(preset, make_model, regions, captions) -> None:
    """precision="bf16" is what a GPU gets by default (exercised here through CPU autocast): the
    products run in bf16, the results come back in fp32 and near the fp32 scores."""
    model = make_model(preset)
    images, texts = model.encode_images(regions), model.encode_texts(captions)
    full = model.score_encoded(images, texts, block_pairs=8)
    half = model.score_encoded(images, texts, block_pairs=8, precision="bf16")
    assert half.scores.dtype == torch.float32 and half.scores.shape == full.scores.shape
    assert torch.allclose(half.scores, full.scores, atol=3e-2, rtol=0)
    assert not torch.equal(half.scores, full.scores)  # bf16 did run
    assert torch.equal(model.score_encoded(images, texts, block_pairs=8, precision="auto").scores, full.scores)
    with pytest.raises(ValueError, match="precision"):
        model.score_encoded(images, texts, precision="fp16")


def test_score_pairs_rejects_mismatched_indices(make_model, regions, captions) -> None:
    model = make_model("tshsr")
    images, texts = model.encode_images(regions), model.encode_texts(captions)
    with pytest.raises(ValueError, match="equal length"):
        model.score_pairs(images, texts, [0, 1], [0])


# ----------------------------------------------------------------------------------------------
# 8. SGR and SAF follow SGRAF's equations (hand-made inputs, recomputed in plain torch)
# ----------------------------------------------------------------------------------------------
def _unit(rows) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.float64)
    return t / t.norm(dim=-1, keepdim=True)


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)


def _sgraf_reference(head: SGRAFHead, words, regions, text_glob, image_glob):
    """SGRAF's equations, one pair, no masks, written from the paper/official code."""
    A = F.leaky_relu(regions @ words.T, 0.1)  # [K, L]: region x word
    A = A / (A.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)  # l2norm each region's row over words
    attn = torch.softmax(head.smooth * A.T, dim=1)  # [L, K]: for each word, over regions
    attended = _l2(attn @ regions)  # a_i
    W_l, W_g = head.local_nodes.proj, head.global_nodes.proj
    s_local = _l2((attended - words).pow(2) @ W_l.weight.T + W_l.bias)
    s_glob = _l2((image_glob - text_glob).pow(2) @ W_g.weight.T + W_g.bias)
    N = torch.cat([s_glob.unsqueeze(0), s_local], 0)  # [1 + L, m]
    if head.graph_reasoning:
        for step in head.steps:
            q = N @ step.query.weight.T + step.query.bias
            k = N @ step.key.weight.T + step.key.bias
            N = torch.relu((torch.softmax(q @ k.T, dim=1) @ N) @ step.update.weight.T + step.update.bias)
        score = torch.sigmoid(N[0] @ head.readout.weight[0] + head.readout.bias[0])
    else:
        bn = head.filter_norm
        logit = N @ head.filter.weight[0] + head.filter.bias[0]
        normed = (logit - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        alpha = torch.sigmoid(normed)
        alpha = alpha / alpha.abs().sum()
        pooled = _l2(alpha @ N)
        score = torch.sigmoid(pooled @ head.readout.weight[0] + head.readout.bias[0])
    return score, attn


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_sgraf_head_matches_equations(kind, vocab) -> None:
    from tests.conftest import tiny_config

    config = tiny_config(kind, vocab, embed_dim=4, sim_dim=6)
    torch.manual_seed(4)
    head = SGRAFHead(config, graph_reasoning=kind == "sgr").double()
    if kind == "saf":  # non-trivial BatchNorm statistics and affine terms (eval mode uses them)
        head.filter_norm.running_mean.fill_(0.3)
        head.filter_norm.running_var.fill_(2.0)
        with torch.no_grad():
            head.filter_norm.weight.fill_(1.7)
            head.filter_norm.bias.fill_(-0.4)
    head.eval()
    words = _unit([[1, 0, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 1, 1]])  # L = 3
    regions = _unit([[1, 1, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0], [1, -1, 1, 0.5]])  # K = 4
    text_glob = _unit([[1, 1, 1, 0]])[0]
    image_glob = _unit([[0.5, 1, 0, 1]])[0]
    expected, expected_attn = _sgraf_reference(head, words, regions, text_glob, image_glob)

    text = {"units": words.unsqueeze(0), "mask": torch.ones(1, 3, dtype=torch.bool), "pooled": text_glob[None]}
    image = {"units": regions.unsqueeze(0), "mask": torch.ones(1, 4, dtype=torch.bool), "pooled": image_glob[None]}
    with torch.no_grad():
        score, maps = head(text, image, want_maps=True)
        assert score.shape == (1,)
        assert abs(score.item() - expected.item()) < 1e-6
        assert torch.allclose(maps["attention"][0], expected_attn, atol=1e-6)
        # The exhaustive (grid) path computes the same number.
        grid_score, _ = head(text, image, grid=(1, 1))
        assert abs(grid_score.item() - expected.item()) < 1e-6
        # Padding the caption with an extra (masked) word slot changes nothing.
        padded = {"units": torch.cat([text["units"], _unit([[3, 1, 4, 1]])[None]], 1),
                  "mask": torch.tensor([[True, True, True, False]]), "pooled": text["pooled"]}
        padded_score, _ = head(padded, image)
        assert abs(padded_score.item() - expected.item()) < 1e-6
    # The reference is sensitive: another caption gives another score (SGRAF ignores word order,
    # so change a word, not the order).
    other_words = torch.cat([words[:2], _unit([[0, 1, -1, 0.2]])], 0)
    other, _ = _sgraf_reference(head, other_words, regions, text_glob, image_glob)
    assert abs(other.item() - expected.item()) > 1e-4


# ----------------------------------------------------------------------------------------------
# 10. Empty inputs are refused clearly
# ----------------------------------------------------------------------------------------------
def test_empty_inputs_raise_clear_errors(make_model, regions, captions) -> None:
    model = make_model("tshsr")
    no_regions = np.zeros((0, 5, regions.shape[2]), np.float32)
    cases = [
        (lambda: model.score(regions, []), "No texts"),
        (lambda: model.score([], captions), "No images"),
        (lambda: model.score(no_regions, captions), "No images"),
        (lambda: model.encode_images([]), "No images"),
        (lambda: model.encode_texts([]), "No texts"),
        (lambda: model.encode_texts("a dog"), "list of strings"),
        (lambda: model.score(regions, "a dog"), "list of strings"),
        (lambda: model.score(regions, [""]), "empty"),
        (lambda: model.score(regions, ["a dog", "   \t\n "]), "Text #1 is empty"),
        (lambda: model.encode_texts(["\x00\x01"]), "empty"),
        (lambda: model.encode_texts(["a dog", None]), "not a string"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            call()
    images, texts = model.encode_images(regions), model.encode_texts(captions)
    with pytest.raises(InvalidInputError, match="at least one"):
        model.score_encoded(images[[]], texts)


# ----------------------------------------------------------------------------------------------
# 12. Configuration
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_config_round_trip(preset, tmp_path, vocab) -> None:
    from tests.conftest import tiny_config

    config = TSHSRConfig.preset(preset)
    assert config.preset_name == preset
    config.validate()
    assert TSHSRConfig.from_dict(config.to_dict()) == config
    assert TSHSRConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert TSHSRConfig.load(tmp_path) == config
    assert TSHSRConfig.load(tmp_path).fingerprint() == config.fingerprint()
    tiny = tiny_config(preset, vocab, image_mean=[0.5, 0.4, 0.3])
    assert isinstance(tiny.image_mean, tuple)
    assert TSHSRConfig.from_dict(tiny.to_dict()) == tiny
    assert tiny.fingerprint() != config.fingerprint()


def test_config_presets_are_the_documented_ablations() -> None:
    cfg = {p: TSHSRConfig.preset(p) for p in PRESETS}
    assert cfg["tshsr"].streams == ("i2t", "t2i") and cfg["tshsr"].levels == ("local", "context", "global")
    assert "context" not in cfg["flat"].levels and cfg["flat"].streams == ("i2t", "t2i")
    assert cfg["t2i"].streams == ("t2i",) and cfg["i2t"].streams == ("i2t",)
    assert cfg["sgr"].head == "sgr" and cfg["saf"].head == "saf" and cfg["sgr"].reasoning_steps == 3
    assert TSHSRConfig.preset("tshsr", embed_dim=64).embed_dim == 64


@pytest.mark.parametrize("overrides, message", [
    (dict(head="transformer"), "head="),
    (dict(streams=()), "streams="),
    (dict(streams=("i2t", "x2y")), "streams="),
    (dict(levels=("local", "phrase")), "levels="),
    (dict(streams=("t2i", "t2i")), "must not repeat"),
    (dict(head="sgr", streams=("i2t", "t2i")), "text-to-image stream only"),
    (dict(head="dual", levels=("local", "global")), "global level only"),
    (dict(image_encoder="clip"), "image_encoder="),
    (dict(text_encoder="lstm"), "text_encoder="),
    (dict(image_encoder="precomputed"), "needs image_feature_dim"),
    (dict(text_encoder="bigru"), "needs vocab_size"),
    (dict(stream_fusion="max"), "stream_fusion="),
    (dict(embed_dim=0), "embed_dim must be positive"),
    (dict(sim_dim=-4), "sim_dim must be positive"),
    (dict(max_text_length=0), "max_text_length must be positive"),
    (dict(reasoning_steps=-1), "reasoning_steps"),
    (dict(context_units_text=0), "context_units"),
    # a lever on one side's context units is read by one stream only: without it the flag would do nothing
    (dict(streams=("i2t",), text_context_layer=3), "only the text-to-image stream"),
    (dict(streams=("t2i",), image_context_stage=3), "only the image-to-text stream"),
])
def test_invalid_configs_raise(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        TSHSRConfig(**overrides)


def test_config_unknown_preset_and_fields() -> None:
    with pytest.raises(ValueError, match="Unknown preset 'sgraf'"):
        TSHSRConfig.preset("sgraf")
    data = TSHSRConfig().to_dict()
    data["attention_temperature"] = 3.0
    with pytest.raises(ValueError, match="unknown fields \\['attention_temperature'\\]"):
        TSHSRConfig.from_dict(data)
    # A config without context still validates when context units are zero.
    TSHSRConfig.preset("flat", context_units_text=0, context_units_image=0)


def test_encoding_cat_pads_and_can_consume_its_parts(make_model, regions, captions) -> None:
    model = make_model("tshsr")
    short, long = model.encode_texts(captions[:2]), model.encode_texts(captions[2:])
    assert short.units.shape[1] != long.units.shape[1]
    parts = [short, long]
    joined = type(short).cat(parts, consume=True)
    assert parts == [None, None]  # dropped as copied
    width = joined.units.shape[1]
    assert width == max(short.units.shape[1], long.units.shape[1])
    for got, part, rows in ((joined[:2], short, 2), (joined[2:], long, len(captions) - 2)):
        n = part.units.shape[1]
        assert torch.equal(got.units[:, :n], part.units) and not got.mask[:, n:].any()
        assert torch.equal(got.units[:, n:], torch.zeros(rows, width - n, part.units.shape[2]))
        assert torch.equal(got.membership[..., :n], part.membership) and torch.equal(got.context, part.context)
    images = model.encode_images(regions)
    assert torch.allclose(model.score_encoded(images, joined).scores,
                          model.score_encoded(images, model.encode_texts(captions)).scores, atol=TOL, rtol=0)
