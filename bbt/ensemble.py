"""Prompt ensembles: several tuned prompts on one frozen model, scored in one request per batch.

One frozen model serves many prompts (Lester et al., 2021), so the M members of an ensemble go
out as one population of M candidates: a batch of inputs costs one request of M queries, not
M requests. Members are combined by majority vote (the paper's) or by the mean of their class
probabilities. An ensemble on disk is a folder of member run folders plus `ensemble.json` (`bbt.rundir`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from bbt import metrics, scoring
from bbt.data import Split
from bbt.errors import ConfigError
from bbt.protocol import PromptTensor, TaskSpec, Tensor
from bbt.prompt import Prompt
from bbt.session import Session

Vote = Literal["majority", "mean"]


def _p0_key(p: Prompt) -> tuple:
    return p.init_seed, p.init_text, p.z.shape[0], p.prompt_length, p.projections[0].D


def passes(prompts: list[Prompt]) -> int:
    """How many times `score_prompts` goes through a split: once per group of prompts sharing p0."""
    return len({_p0_key(p) for p in prompts})


def score_prompts(session: Session, task: TaskSpec, split: Split, prompts: list[Prompt], on_chunk=None) -> np.ndarray:
    """Class scores of every prompt on a split: logits [M, N, C].

    Prompts that share a starting point p0 (members of one `--ensemble` do) and a shape travel as
    one population, materialized (p = A z) on this side since each member has its own projection:
    one request per batch of `scoring.EVAL_CHUNK` inputs for all of them. Spending is booked as evaluation.
    `on_chunk(n)`: called after each request with its number of inputs (`passes` of them cover the split).
    """
    if not prompts:
        raise ConfigError("no prompts to score")
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(_p0_key(p), []).append(i)
    out: list[np.ndarray | None] = [None] * len(prompts)
    for members in groups.values():
        first = prompts[members[0]]
        tensor = np.concatenate([prompts[i].materialize() for i in members])  # (M, layers, L, H)
        candidates = PromptTensor(prompts=Tensor.from_numpy(tensor), init_seed=first.init_seed, init_text=first.init_text)
        logits, _ = scoring.score_candidates(session, task, split, candidates, len(members), on_chunk=on_chunk)
        for j, i in enumerate(members):
            out[i] = logits[j]
    return np.stack(out)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over classes, [..., C]."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def combine(logits: np.ndarray, vote: Vote = "majority") -> np.ndarray:
    """The ensemble's class scores [N, C] from its members' logits [M, N, C].

    mean: the mean of the members' class probabilities. majority: the number of members voting for
    each class, plus the mean probability / (M + 1) so that a tie goes to the class the members
    find more probable on average (and a further tie to the lower class index, as argmax does);
    the added term is below 1, so it never overturns a vote.
    """
    probs = probabilities(logits)
    mean = probs.mean(axis=0)
    if vote == "mean":
        return mean
    if vote != "majority":
        raise ConfigError(f"unknown vote {vote!r}: majority or mean")
    m, _, c = logits.shape
    votes = np.zeros_like(mean)
    for member in logits.argmax(axis=-1):  # (N,) per member
        votes[np.arange(len(member)), member] += 1
    return votes + mean / (m + 1)


@dataclass
class EnsembleScores:
    """An ensemble on one split, beside its members."""

    ensemble: float  # the task's metric (accuracy or F1)
    ensemble_accuracy: float
    members: list[float]
    members_accuracy: list[float]

    @property
    def mean_member(self) -> float:
        return float(np.mean(self.members))

    @property
    def best_member(self) -> float:
        return float(np.max(self.members))


def evaluate(session: Session, task: TaskSpec, split: Split, prompts: list[Prompt], vote: Vote = "majority",
             on_chunk=None) -> tuple[EnsembleScores, np.ndarray]:
    """The ensemble's and each member's metric on a split, and the members' logits [M, N, C]."""
    logits = score_prompts(session, task, split, prompts, on_chunk)
    labels = np.asarray(split.labels)
    combined = combine(logits, vote)[None]
    scores = EnsembleScores(
        ensemble=float(metrics.score(task.metric, combined, labels)[0]),
        ensemble_accuracy=float(metrics.accuracy(combined, labels)[0]),
        members=[float(x) for x in metrics.score(task.metric, logits, labels)],
        members_accuracy=[float(x) for x in metrics.accuracy(logits, labels)],
    )
    return scores, logits


def check_compatible(artifacts: list) -> None:
    """Members must share model, task (labels, template, verbalizer) and method: else a clear error."""
    first = artifacts[0]
    for i, a in enumerate(artifacts[1:], start=2):
        differs = [f for f in ("model", "method") if getattr(a, f) != getattr(first, f)]
        differs += [f"task {f}" for f in TaskSpec.model_fields if getattr(a.task, f) != getattr(first.task, f)]
        if differs:
            what = differs[0]
            mine, theirs = (getattr(x.task, what[5:]) if what.startswith("task ") else getattr(x, what) for x in (a, first))
            raise ConfigError(f"member {i} differs from member 1 in its {what} ({repr(mine)[:80]} vs {repr(theirs)[:80]}): "
                              "an ensemble's members share model, task, template and method")
