"""Losses that CMA-ES minimises and the metrics a run reports, on class logits.

All functions take logits of shape [K, N, C] (K candidates, N examples, C classes) and integer
labels [N], and return one number per candidate, shape [K]. numpy only: the server scores with the
same code the client uses.
"""

from __future__ import annotations

import numpy as np

HINGE_MARGIN = 2.0  # BBT's MultiMarginLoss margin
# one-sided 5%: a held-out cross-entropy fewer standard errors than this below a blind guess's is no
# evidence that the scores read the task at all (see above_chance)
CHANCE_MARGIN = 1.645


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 3 or labels.shape != (logits.shape[1],):
        raise ValueError(f"logits {logits.shape} and labels {labels.shape}: expected [K, N, C] and [N]")
    return logits, labels


def _per_example_ce(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Softmax cross-entropy [K, N] of checked logits and labels (nats)."""
    shifted = logits - logits.max(axis=2, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=2))
    return log_z - np.take_along_axis(shifted, labels[None, :, None], axis=2)[..., 0]


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean softmax cross-entropy per candidate (nats)."""
    return _per_example_ce(*_check(logits, labels)).mean(axis=1)


def above_chance(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Standard errors by which the mean cross-entropy per candidate sits below the loss of the best
    guess that ignores the input: the entropy of the labels' class shares (ln C on a class-balanced
    split). Negative: above it. Under CHANCE_MARGIN, those inputs show no sign that the candidate
    reads the task at all."""
    logits, labels = _check(logits, labels)
    shares = np.bincount(labels, minlength=logits.shape[2]) / len(labels)
    guess = float(-(shares[shares > 0] * np.log(shares[shares > 0])).sum())
    per_example = _per_example_ce(logits, labels)
    n = per_example.shape[1]
    se = per_example.std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.full(len(per_example), np.inf)
    gap = guess - per_example.mean(axis=1)
    # identical losses on every input (se = 0): infinitely sure of the sign of the gap, or level with the guess
    edge = np.where(np.abs(gap) < 1e-9, 0.0, np.copysign(np.inf, gap))  # (rounding: ln C two ways)
    return np.where(se > 0, gap / np.where(se > 0, se, 1.0), edge)


def hinge(logits: np.ndarray, labels: np.ndarray, margin: float = HINGE_MARGIN) -> np.ndarray:
    """Multi-class margin loss: mean over examples of sum_{j != y} max(0, margin - s_y + s_j) / C."""
    logits, labels = _check(logits, labels)
    correct = np.take_along_axis(logits, labels[None, :, None], axis=2)
    terms = np.maximum(0.0, margin - correct + logits)
    terms[:, np.arange(len(labels)), labels] = 0.0
    return terms.sum(axis=2).mean(axis=1) / logits.shape[2]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Fraction of examples whose arg-max class is the label."""
    logits, labels = _check(logits, labels)
    return (logits.argmax(axis=2) == labels[None, :]).mean(axis=1)


def f1(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Binary F1 with class 1 as positive (MRPC's 'equivalent'); 0 where nothing is predicted positive."""
    logits, labels = _check(logits, labels)
    pred = logits.argmax(axis=2) == 1
    gold = (labels == 1)[None, :]
    tp = (pred & gold).sum(axis=1)
    denom = pred.sum(axis=1) + gold.sum(axis=1)
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def loss(kind: str, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The loss named by `kind`: 'ce' (cross-entropy), 'hinge' (margin 2), 'perf' (negative accuracy)."""
    if kind == "ce":
        return cross_entropy(logits, labels)
    if kind == "hinge":
        return hinge(logits, labels)
    if kind == "perf":
        return -accuracy(logits, labels)
    raise ValueError(f"unknown loss {kind!r}: choose ce, hinge or perf")


def score(metric: str, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The task's headline metric: 'acc' or 'f1'."""
    return f1(logits, labels) if metric == "f1" else accuracy(logits, labels)
