"""Losses, checked by hand: VSE++ hinge (hardest and summed violations, candidate masks, several
captions per image), InfoNCE against cross-entropy, hard-negative mining."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tshsr.losses import contrastive_loss, hinge_loss, mine_candidates

NAN = float("nan")


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_hinge_2x2_by_hand() -> None:
    scores = _t([[0.9, 0.5],
                 [0.8, 0.3]])
    positive = torch.eye(2, dtype=torch.bool)
    # pair (0,0): caption 1 gives 0.2 + 0.5 - 0.9 < 0 -> 0; image 1 gives 0.2 + 0.8 - 0.9 = 0.1
    # pair (1,1): caption 0 gives 0.2 + 0.8 - 0.3 = 0.7; image 0 gives 0.2 + 0.5 - 0.3 = 0.4
    expected = ((0 + 0.1) + (0.7 + 0.4)) / 2
    for hardest in (True, False):  # one negative per direction: both modes agree
        assert hinge_loss(scores, positive, hardest=hardest).item() == pytest.approx(expected, abs=1e-12)
    # margin 0: only strict violations count
    # (0,0): 0.8 - 0.9 < 0 -> 0 both ways; (1,1): 0.8 - 0.3 = 0.5 and 0.5 - 0.3 = 0.2
    assert hinge_loss(scores, positive, margin=0.0).item() == pytest.approx(0.7 / 2, abs=1e-12)


S3 = [[0.7, 0.6, 0.1],
      [0.65, 0.5, 0.4],
      [0.2, 0.45, 0.3]]


def test_hinge_3x3_hardest_and_sum_by_hand() -> None:
    scores, positive = _t(S3), torch.eye(3, dtype=torch.bool)
    # violations  (text: other captions of the image; image: other images of the caption)
    # (0,0) s=.7 : text .1, 0        image .15, 0
    # (1,1) s=.5 : text .35, .1      image .3, .15
    # (2,2) s=.3 : text .1, .35      image 0, .3
    hardest = ((0.1 + 0.15) + (0.35 + 0.3) + (0.35 + 0.3)) / 3
    summed = ((0.1 + 0.15) + (0.35 + 0.1 + 0.3 + 0.15) + (0.1 + 0.35 + 0 + 0.3)) / 3
    assert hinge_loss(scores, positive, hardest=True).item() == pytest.approx(hardest, abs=1e-12)
    assert hinge_loss(scores, positive, hardest=False).item() == pytest.approx(summed, abs=1e-12)


def test_hinge_ignores_non_candidates_even_nan() -> None:
    scores = _t(S3)
    scores[0, 1] = NAN  # not computed: only candidate pairs are scored in training
    scores[2, 0] = NAN
    scores.requires_grad_(True)
    positive = torch.eye(3, dtype=torch.bool)
    candidate = torch.ones(3, 3, dtype=torch.bool)
    candidate[0, 1] = candidate[2, 0] = False
    # (0,0): text: caption 1 dropped, caption 2 -> 0;      image: .15, 0
    # (1,1): text .35, .1;  image: image 0 dropped, image 2 .15
    # (2,2): text: caption 0 dropped, caption 1 .35;       image: 0, .3
    hardest = ((0 + 0.15) + (0.35 + 0.15) + (0.35 + 0.3)) / 3
    summed = ((0 + 0.15) + (0.35 + 0.1 + 0.15) + (0.35 + 0 + 0.3)) / 3
    loss = hinge_loss(scores, positive, candidate, hardest=True)
    assert loss.item() == pytest.approx(hardest, abs=1e-12)
    assert hinge_loss(scores, positive, candidate, hardest=False).item() == pytest.approx(summed, abs=1e-12)
    loss.backward()
    assert torch.isfinite(scores.grad).all()
    assert scores.grad[0, 1] == 0 and scores.grad[2, 0] == 0
    # S[1,0] is the hardest caption for pair (1,1) and the hardest image for pair (0,0): 2 x 1/3.
    assert scores.grad[1, 0].item() == pytest.approx(2 / 3)
    # Positives are pushed down once per active direction: (0,0) image only, (1,1) both.
    assert scores.grad[0, 0].item() == pytest.approx(-1 / 3)
    assert scores.grad[1, 1].item() == pytest.approx(-2 / 3)


def test_hinge_several_captions_per_image() -> None:
    scores = _t([[0.5, 0.8, 0.4],
                 [0.45, 0.2, 0.6]])
    positive = torch.tensor([[True, True, False], [False, False, True]])
    # (0,0) s=.5: text: caption 1 is a positive, not a negative; caption 2 .1.  image 1: .15
    # (0,1) s=.8: text: caption 2 -> 0.  image 1: 0.2+0.2-0.8 -> 0
    # (1,2) s=.6: text: caption 0 .05, caption 1 -> 0.  image 0: 0.2+0.4-0.6 = 0
    expected = (0.25 + 0 + 0.05) / 3
    assert hinge_loss(scores, positive).item() == pytest.approx(expected, abs=1e-12)
    assert hinge_loss(scores, positive, hardest=False).item() == pytest.approx(expected, abs=1e-12)


def test_hinge_collapsed_scores_sit_at_twice_the_margin() -> None:
    """The known trap: all scores equal -> loss = 2 x margin per positive pair (mean)."""
    scores = torch.full((4, 4), 0.37, dtype=torch.float64)
    assert hinge_loss(scores, torch.eye(4, dtype=torch.bool), margin=0.2).item() == pytest.approx(0.4)


def test_hinge_needs_a_positive() -> None:
    with pytest.raises(ValueError, match="at least one positive"):
        hinge_loss(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
def test_contrastive_equals_cross_entropy_with_one_positive_per_row() -> None:
    torch.manual_seed(0)
    sim = torch.randn(5, 5, dtype=torch.float64).tanh()
    perm = torch.tensor([3, 0, 4, 1, 2])  # image i matches caption perm[i]
    positive = torch.zeros(5, 5, dtype=torch.bool)
    positive[torch.arange(5), perm] = True
    scale = torch.tensor(12.5, dtype=torch.float64)
    logits = sim * scale
    expected = 0.5 * (F.cross_entropy(logits, perm) + F.cross_entropy(logits.T, torch.argsort(perm)))
    assert contrastive_loss(sim, positive, scale).item() == pytest.approx(expected.item(), abs=1e-10)


def test_contrastive_several_positives_and_missing_rows() -> None:
    sim = _t([[0.9, 0.7, 0.1, 0.0],
              [0.2, 0.1, 0.8, 0.3],
              [0.3, 0.2, 0.1, 0.4]])  # image 2 has no caption in the batch
    positive = torch.tensor([[True, True, False, False],
                             [False, False, True, True],
                             [False, False, False, False]])
    scale = 10.0
    e = np.exp(sim.numpy() * scale)
    # image side: -log(sum over the image's captions / sum over all captions), images 0 and 1
    img = [-math.log(e[0, :2].sum() / e[0].sum()), -math.log(e[1, 2:].sum() / e[1].sum())]
    # caption side: each caption has one image among the three
    txt = [-math.log(e[0, t] / e[:, t].sum()) for t in (0, 1)] + [-math.log(e[1, t] / e[:, t].sum()) for t in (2, 3)]
    expected = 0.5 * (np.mean(img) + np.mean(txt))
    assert contrastive_loss(sim, positive, torch.tensor(scale)).item() == pytest.approx(expected, abs=1e-10)


# ----------------------------------------------------------------------------------------------
def _expected_candidates(sim: np.ndarray, positive: np.ndarray, hard: int) -> np.ndarray:
    expected = positive.copy()
    for i in range(sim.shape[0]):
        negatives = [t for t in np.argsort(-sim[i], kind="stable") if not positive[i, t]]
        expected[i, negatives[:hard]] = True
    for t in range(sim.shape[1]):
        negatives = [i for i in np.argsort(-sim[:, t], kind="stable") if not positive[i, t]]
        expected[negatives[:hard], t] = True
    return expected


def test_mine_candidates_positives_and_top_k() -> None:
    gen = np.random.default_rng(3)
    sim = gen.permutation(35).reshape(5, 7).astype(np.float32) / 35  # no ties
    caption_image = np.array([0, 0, 1, 2, 3, 4, 4])
    positive = np.zeros((5, 7), bool)
    positive[caption_image, np.arange(7)] = True
    for hard in (1, 2, 3):
        got = mine_candidates(torch.from_numpy(sim), torch.from_numpy(positive), hard=hard, random=0)
        assert got.dtype == torch.bool
        assert np.array_equal(got.numpy(), _expected_candidates(sim, positive, hard)), hard
    assert np.array_equal(mine_candidates(torch.from_numpy(sim), torch.from_numpy(positive), 0, 0).numpy(), positive)
    assert mine_candidates(torch.from_numpy(sim), torch.from_numpy(positive), -1, 0).all()


def test_mine_candidates_random_negatives() -> None:
    sim = torch.rand(6, 9, generator=torch.Generator().manual_seed(0))
    positive = torch.zeros(6, 9, dtype=torch.bool)
    positive[torch.arange(9) % 6, torch.arange(9)] = True
    base = mine_candidates(sim, positive, hard=1, random=0)
    gen = torch.Generator().manual_seed(1)
    more = mine_candidates(sim, positive, hard=1, random=2, generator=gen)
    assert (more | base).equal(more), "random negatives only add to the mined ones"
    assert more.sum() > base.sum()
    assert ((more & ~base).sum(0) <= 2).all()  # at most `random` extra images per caption
    again = mine_candidates(sim, positive, hard=1, random=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(more, again)  # reproducible from the generator
