"""Automatic verbalizers: several label words per class, chosen on the training split.

A class read through one hand-picked word ("great") is at the mercy of that word. BBT-RGB reads
it through several, found on the training data; the class score is the mean over the words
(`TaskSpec.verbalizer` entries may be lists). How the words are found:

1. One query on the training split gives, per input, a score for every candidate word: for masked
   and causal LMs the words likeliest at {mask} (`EvaluateRequest.top_words`, log-probabilities);
   for a sentence encoder, the cosine with each candidate label text, the candidates being the
   task's label-text pattern ("It was {}.") filled with the words of the training texts.
2. For each class, the candidates are ranked by how much higher they score on its inputs than on
   those of any other class (mean over the class minus the best other class's mean); the class
   keeps its own word(s) first and adds the best K - 1 candidates, each candidate going to one
   class at most.
3. K is chosen from `CHOICES` by accuracy on train and dev together (one query per K tried; ties
   go to fewer words, and K = 1 is the task's own verbalizer), unless it is given. Dev alone (32
   inputs) cannot tell the K apart: on SmolLM2 SST-2 it preferred 5 words that lose 7 points on test.

Dev and test inputs never choose a word. Every query is booked on the run's ledger as tuning.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from bbt import cache
from bbt.budget import Ledger
from bbt.data import Split
from bbt.protocol import MAX_LABELS, MAX_WORDS_PER_LABEL, EvaluateRequest, StatsRequest, TaskSpec, Usage, words_of
from bbt.tuner import Evaluation

CHOICES = (1, 2, 3, 5, 8)  # words per class tried on dev when the number is not given
TOP_WORDS = 100  # vocabulary words per training input an LM is asked for
_WORD = re.compile(r"[A-Za-z]{3,}")


@dataclass
class Choice:
    """The verbalizer a search chose: the task with it, and what the choice saw."""

    task: TaskSpec
    label_words: int  # K, words per class (1: the task's own verbalizer)
    dev: dict[int, float] = field(default_factory=dict)  # K -> metric on train + dev, for each K tried
    queries: int = 0  # what choosing cost


def choose(backend, model: str, family: str, task: TaskSpec, train: Split, dev: Split, ledger: Ledger,
           label_words: int | None = None) -> Choice:
    """The task with words per class chosen on `train` (their number on train + dev unless given).

    Costs 1 query on train plus one on train + dev per number of words tried; a budget that
    cannot pay for the train query leaves the task's own verbalizer.
    """
    start = ledger.tuning.queries
    scores, names = _candidate_scores(backend, model, family, task, train, ledger)
    if scores is None:
        return Choice(task=task, label_words=1)
    field_name = "label_texts" if family == "encoder" else "verbalizer"
    own = [words_of(e) for e in getattr(task, field_name)]
    if family == "encoder":
        pattern = _pattern(task)
        names = [pattern.format(w) for w in names]
    ranked = rank(scores, np.asarray(train.labels), names, own)
    options = [label_words] if label_words is not None else list(CHOICES)
    tasks = {}
    for k in options:
        groups = [o + r[: max(0, k - len(o))] for o, r in zip(own, ranked)]
        entries = [g[0] if len(g) == 1 else g for g in groups]
        candidate = task.model_copy(update={field_name: entries})
        if candidate not in tasks.values():
            tasks[k] = candidate
    if len(tasks) == 1:
        (k, chosen), = tasks.items()
        return Choice(task=chosen, label_words=k, queries=ledger.tuning.queries - start)
    both = Split(train.examples + dev.examples, train.labels + dev.labels)
    tokens = _tokens(backend, model, task, both)  # once: every candidate bills the same
    dev_scores = {}
    for k, candidate in tasks.items():
        ev = _score(backend, model, candidate, both, ledger, tokens)
        if ev is None:
            break
        dev_scores[k] = ev.metric
    if not dev_scores:
        return Choice(task=task, label_words=1, queries=ledger.tuning.queries - start)
    best = max(dev_scores, key=lambda k: (dev_scores[k], -k))
    return Choice(task=tasks[best], label_words=best, dev=dev_scores, queries=ledger.tuning.queries - start)


def rank(scores: np.ndarray, labels: np.ndarray, names: list[str], own: list[list[str]],
         limit: int = MAX_WORDS_PER_LABEL) -> list[list[str]]:
    """Per class, candidate names best first by their margin: mean score over the class's inputs
    minus the highest mean over another class's; only names whose margin is positive (so each
    goes to one class at most), and none that is already some class's own word.

    `scores` is [N inputs, W candidates]; `own` the words each class has already.
    """
    n_classes = len(own)
    taken = {w for words in own for w in words}
    means = np.stack([scores[labels == c].mean(0) if (labels == c).any() else np.full(scores.shape[1], -np.inf)
                      for c in range(n_classes)])  # (C, W)
    out = []
    for c in range(n_classes):
        margin = means[c] - np.delete(means, c, axis=0).max(0)
        order = [j for j in np.argsort(-margin, kind="stable") if margin[j] > 0 and names[j] not in taken]
        out.append([names[j] for j in order[:limit]])
    return out


def _candidate_scores(backend, model, family, task, train, ledger) -> tuple[np.ndarray | None, list[str]]:
    """[N, W] scores of W candidate words on the training inputs (one query), or None if unaffordable."""
    if family == "encoder":
        names = _text_words(train, limit=MAX_LABELS)
        pattern = _pattern(task)
        probe = TaskSpec(name=f"{task.name}-words", labels=[f"w{i}" for i in range(len(names))],
                         template=task.template, verbalizer=names, label_texts=[pattern.format(w) for w in names],
                         pair=task.pair)
        resp = _query(backend, model, probe, train, ledger, _tokens(backend, model, task, train), labels=False)
        return (None, []) if resp is None else (resp.logits.to_numpy()[0], names)
    resp = _query(backend, model, task, train, ledger, _tokens(backend, model, task, train), top_words=TOP_WORDS)
    if resp is None:
        return None, []
    names = sorted({w for row in resp.words for w, _ in row})
    index = {w: j for j, w in enumerate(names)}
    scores = np.empty((len(resp.words), len(names)))
    for i, row in enumerate(resp.words):
        scores[i] = min(lp for _, lp in row) if row else 0.0  # below this input's list: at most its last
        for w, lp in row:
            scores[i, index[w]] = lp
    return scores, names


def _tokens(backend, model, task, split) -> int:
    """Tokens one query of `split` bills. The words change none: a verbalizer is read at {mask}, and
    a sentence encoder's label texts are not part of its input."""
    return sum(backend.stats(StatsRequest(model=model, task=task, inputs=split.examples)).tokens)


def _query(backend, model, task, split, ledger, tokens: int, *, labels: bool = True, top_words: int = 0):
    """One tuning query of the plain model on `split`, or None when the budget cannot pay for it."""
    if ledger.affordable(1, examples_per_query=len(split), tokens_per_query=tokens) < 1:
        return None
    req = EvaluateRequest(model=model, task=task, inputs=split.examples, labels=split.labels if labels else None,
                          return_logits=True, top_words=top_words)
    resp, paid_by = cache.evaluate(backend, req, ledger.payer())
    ledger.record(resp.usage, expected=Usage(queries=1, requests=1, examples=len(split), tokens=tokens),
                  tuning=True, paid_by=paid_by)
    return resp


def _score(backend, model, task, split, ledger, tokens: int) -> Evaluation | None:
    resp = _query(backend, model, task, split, ledger, tokens)
    if resp is None:
        return None
    return Evaluation.of(resp.logits.to_numpy()[0], split.labels, task.metric)


def _text_words(split: Split, limit: int) -> list[str]:
    """Distinct lower-case words (3+ letters) of the inputs, the most frequent first up to `limit`."""
    counts = Counter()
    for ex in split.examples:
        text = ex.text + " " + (ex.text_pair or "")
        counts.update({w.lower() for w in _WORD.findall(text)})
    return sorted(sorted(counts), key=lambda w: -counts[w])[:limit]


def _pattern(task: TaskSpec) -> str:
    """The label-text pattern with {} where the verbalizer word sits ("It was {}."), if every label
    text holds its word; otherwise "{}" (candidates are the bare words)."""
    patterns = set()
    for text, word in zip(task.label_texts, task.verbalizer):
        text, word = words_of(text)[0], words_of(word)[0]
        at = text.lower().find(word.lower())
        if at < 0 or "{" in text or "}" in text:
            return "{}"
        patterns.add(text[:at] + "{}" + text[at + len(word):])
    return patterns.pop() if len(patterns) == 1 else "{}"
