"""Losses CMA-ES minimises and the metrics a run reports, against hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bbt import metrics


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def test_cross_entropy_of_equal_logits_is_log_c():
    for c in (2, 3, 14):
        logits = np.zeros((2, 5, c))
        np.testing.assert_allclose(metrics.cross_entropy(logits, np.zeros(5, dtype=int)), [math.log(c)] * 2)


def test_cross_entropy_matches_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 7, 3)) * 3
    labels = rng.integers(0, 3, 7)
    expected = -_log_softmax(logits)[:, np.arange(7), labels].mean(axis=1)
    np.testing.assert_allclose(metrics.cross_entropy(logits, labels), expected, rtol=1e-12)


def test_cross_entropy_is_shift_invariant_and_stable_for_large_logits():
    logits = np.array([[[1000.0, 0.0], [0.0, 1000.0]]])
    labels = np.array([0, 0])
    out = metrics.cross_entropy(logits, labels)
    assert np.isfinite(out).all()
    assert out[0] == pytest.approx(500.0)  # one example right with certainty, one wrong by 1000 nats
    shifted = logits + np.array([5.0, -7.0])[None, :, None]  # a constant per example
    np.testing.assert_allclose(metrics.cross_entropy(shifted, labels), out)


def test_hinge_hand_worked():
    # example 0, label 0: s = [2, 0] -> j=1: max(0, 2 - 2 + 0) = 0
    # example 1, label 1: s = [2, 0] -> j=0: max(0, 2 - 0 + 2) = 4
    logits = np.array([[[2.0, 0.0], [2.0, 0.0]]])
    np.testing.assert_allclose(metrics.hinge(logits, np.array([0, 1])), [(0 / 2 + 4 / 2) / 2])
    # three classes, label 2: s = [1, 3, 2.5]: j=0: max(0, 2 - 2.5 + 1) = 0.5; j=1: 2 - 2.5 + 3 = 2.5
    three = np.array([[[1.0, 3.0, 2.5]]])
    np.testing.assert_allclose(metrics.hinge(three, np.array([2])), [(0.5 + 2.5) / 3])
    # a margin wider than 2 everywhere costs nothing
    np.testing.assert_allclose(metrics.hinge(np.array([[[10.0, 0.0, 7.9]]]), np.array([0])), [0.0])
    np.testing.assert_allclose(metrics.hinge(np.array([[[10.0, 0.0, 7.9]]]), np.array([0]), margin=3.0), [0.9 / 3])


def test_accuracy_and_f1_hand_worked():
    # predictions 1, 1, 0, 0 against labels 1, 0, 1, 0
    logits = np.array([[[0, 1], [0, 1], [1, 0], [1, 0]]], dtype=float)
    labels = np.array([1, 0, 1, 0])
    np.testing.assert_allclose(metrics.accuracy(logits, labels), [0.5])
    np.testing.assert_allclose(metrics.f1(logits, labels), [0.5])  # tp 1, 2 predicted, 2 gold
    # all predicted negative: no true positive -> 0, not a division by zero
    none = np.array([[[1, 0]] * 4], dtype=float)
    np.testing.assert_allclose(metrics.f1(none, labels), [0.0])
    # nothing positive anywhere, nothing predicted: 0 as well
    np.testing.assert_allclose(metrics.f1(none, np.zeros(4, dtype=int)), [0.0])
    # perfect
    np.testing.assert_allclose(metrics.f1(np.eye(2)[labels][None], labels), [1.0])


def test_candidates_are_scored_independently():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 9, 4))
    labels = rng.integers(0, 4, 9)
    for fn in (metrics.cross_entropy, metrics.hinge, metrics.accuracy):
        together = fn(logits, labels)
        assert together.shape == (5,)
        alone = [fn(logits[k : k + 1], labels)[0] for k in range(5)]
        np.testing.assert_allclose(together, alone)


def test_loss_and_score_dispatch():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((3, 6, 2))
    labels = rng.integers(0, 2, 6)
    np.testing.assert_array_equal(metrics.loss("ce", logits, labels), metrics.cross_entropy(logits, labels))
    np.testing.assert_array_equal(metrics.loss("hinge", logits, labels), metrics.hinge(logits, labels))
    np.testing.assert_array_equal(metrics.loss("perf", logits, labels), -metrics.accuracy(logits, labels))
    np.testing.assert_array_equal(metrics.score("acc", logits, labels), metrics.accuracy(logits, labels))
    np.testing.assert_array_equal(metrics.score("f1", logits, labels), metrics.f1(logits, labels))
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        metrics.loss("mse", logits, labels)


@pytest.mark.parametrize("shape,labels", [((6, 2), [0] * 6), ((1, 6, 2), [0] * 5), ((1, 6, 2), [[0] * 6])])
def test_shapes_are_checked(shape, labels):
    with pytest.raises(ValueError, match=r"\[K, N, C\]"):
        metrics.cross_entropy(np.zeros(shape), np.asarray(labels))


def test_above_chance_against_hand_worked_values():
    # two classes, four inputs: per-input losses ln(1 + e^-2) for three right, ln(1 + e^2) for one wrong
    logits = np.array([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]]])
    labels = np.array([0, 1, 0, 1])
    per = np.array([math.log1p(math.exp(-2))] * 3 + [math.log1p(math.exp(2))])
    want = (math.log(2) - per.mean()) / (per.std(ddof=1) / 2)
    assert metrics.above_chance(logits, labels)[0] == pytest.approx(want, rel=1e-12)
    # a uniform guess sits at ln C on balanced labels: zero standard errors; a confident wrong reader below it
    assert metrics.above_chance(np.zeros((1, 6, 3)), np.arange(6) % 3)[0] == 0
    assert metrics.above_chance(-3 * np.eye(2)[None, [0, 1, 0, 1]], np.array([0, 1, 0, 1]))[0] < 0


def test_above_chance_ranks_readers_and_survives_identical_losses():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 32)
    signal = np.eye(2)[labels] * 2 + rng.standard_normal((32, 2))
    noise = rng.standard_normal((32, 2)) * 0.1
    out = metrics.above_chance(np.stack([signal, noise]), labels)
    assert out[0] > metrics.CHANCE_MARGIN > out[1]
    labels = np.array([0, 1, 0, 1])
    same = np.eye(2)[labels][None]  # every input right, with the same loss: no spread at all
    assert metrics.above_chance(same, labels)[0] == np.inf and metrics.above_chance(-same, labels)[0] == -np.inf


def test_above_chance_measures_against_the_best_blind_guess_on_imbalanced_labels():
    # 3 of 4 inputs in class 0: always answering 0.75 / 0.25 costs the labels' entropy, below ln 2, and
    # a model that does just that has learned nothing, so it sits at zero, where ln 2 would rate it above chance
    labels = np.array([0, 0, 0, 1] * 4)
    blind = np.tile(np.log([[0.75, 0.25]]), (16, 1))[None]
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert metrics.cross_entropy(blind, labels)[0] == pytest.approx(entropy)
    assert metrics.above_chance(blind, labels)[0] == pytest.approx(0, abs=1e-9)
