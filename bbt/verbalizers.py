"""Automatic verbalizers: several label words per class, chosen on the training split.

A class read through one hand-picked word ("great") is at the mercy of that word. BBT-RGB reads
it through several, found on the training data; the class score is the mean over the words
(`TaskSpec.verbalizer` entries may be lists). How the words are found:

1. One query on the training split scores, per input, every candidate word: for a sentence
   encoder, the cosine with each candidate label text, the candidates being the task's label-text
   pattern ("It was {}.") filled with the words of the training texts; for masked and causal LMs,
   the logit of each candidate word at {mask}, read as the model reads a verbalizer. An LM's
   candidates come from one more query on train before it: the words each input finds likeliest
   at {mask} (`EvaluateRequest.top_words`), of which the best `SHORTLIST` per class by the margin
   below go on. Those log-probabilities are known only where a word is among an input's 100
   likeliest, so they shortlist and never choose: on SmolLM2 SST-2 seed 42 they rated 2 words per
   class 8 points above the own words on held-out inputs, where the exact scores rate them 8 below.
2. For each class, the candidates are ranked by how much higher they score on its inputs than on
   those of any other class (mean over the class minus the best other class's mean); the class
   keeps its own word(s) first and adds the best K - 1 candidates, each candidate going to one
   class at most.
3. K is chosen from `CHOICES` by accuracy on inputs that did not pick the words, unless it is
   given: on each quarter of the training split, read through words ranked on the other three
   quarters, and on dev (one more query, scoring the same candidates). Ties go to fewer words;
   K = 1 is the task's own verbalizer, and a K > 1 is eligible only where it reads more of those
   inputs right than the own words by more than chance would (a paired sign test over the inputs
   the two read differently, one-sided 5%): a few dozen held-out inputs rank close Ks by noise. On
   SmolLM2 SST-2 seed 87, 8 words read 2 of 64 held-out inputs more right than the own word (in
   float32 and bfloat16 alike: z 0.4), and cost the plain model 7.8 points of test accuracy.
   Accuracies and tests are computed from the score matrices, so choosing K costs no query per
   K: 2 queries in all for a sentence encoder, 3 for an LM (1 and 2 with K given). Scoring train with words ranked on train itself flatters every K > 1: on MiniLM SST-2
   seed 13 it took 5 words that cost 16 points on test, where the held-out quarters keep the
   task's own words. A class score is the mean of its words' scores, as the model computes it.

Dev and test inputs never choose a word. Every query is booked on the run's ledger as tuning.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from bbt.data import Split
from bbt.metrics import CHANCE_MARGIN
from bbt.protocol import MAX_LABELS, MAX_WORDS_PER_LABEL, EvaluateRequest, TaskSpec, words_of
from bbt.session import Session

CHOICES = (1, 2, 3, 5, 8)  # words per class tried when the number is not given
FOLDS = 4  # quarters of the training split for the held-out check of K
TOP_WORDS = 100  # vocabulary words per training input an LM is asked for
SHORTLIST = 32  # an LM's candidates per class scored exactly (one query per split)
_WORD = re.compile(r"[A-Za-z]{3,}")


@dataclass
class Choice:
    """The verbalizer a search chose: the task with it, and what the choice saw."""

    task: TaskSpec
    label_words: int  # K, words per class (1: the task's own verbalizer)
    held_out: dict[int, float] = field(default_factory=dict)  # K -> accuracy on train folds + dev, each K tried
    beats_own: dict[int, float] = field(default_factory=dict)  # K > 1 -> sign-test z against K = 1 on those inputs
    queries: int = 0  # what choosing cost


def queries(family: str, label_words: int | None) -> list[str]:
    """The splits `choose` queries, in order: on train an LM's shortlist, then the probe; on dev the
    probe again when K is to be chosen. Each is sent only while the budget affords it, and dev only
    when more than one K reads different words."""
    return ["train"] * (1 if family == "encoder" else 2) + (["dev"] if label_words is None else [])


def choose(session: Session, task: TaskSpec, train: Split, dev: Split, label_words: int | None = None) -> Choice:
    """The task with words per class chosen on `train` (their number held out, unless given), by
    queries of the plain model booked on the session's ledger as tuning.

    Costs the queries `queries` lists; a budget that cannot pay for those on train leaves the task's
    own verbalizer, one that cannot pay for dev chooses on train folds.
    """
    ledger, family = session.ledger, session.info.family
    start = ledger.tuning.queries
    field_name = "label_texts" if family == "encoder" else "verbalizer"
    own = [words_of(e) for e in getattr(task, field_name)]
    train_tokens = _tokens(session, task, train)
    if family == "encoder":
        names = _candidates(train, own, _pattern(task))
    else:
        names = _shortlist(session, task, train, own, train_tokens)
        if names is None:
            return Choice(task=task, label_words=1)
    scores = _scores(session, task, train, names, train_tokens)
    if scores is None:
        return Choice(task=task, label_words=1, queries=ledger.tuning.queries - start)
    labels = np.asarray(train.labels)
    ranked = rank(scores, labels, names, own)
    options = [label_words] if label_words is not None else list(CHOICES)
    tasks = {}
    for k in options:
        entries = [g[0] if len(g) == 1 else g for g in _groups(own, ranked, k)]
        candidate = task.model_copy(update={field_name: entries})
        if candidate not in tasks.values():
            tasks[k] = candidate
    if len(tasks) == 1:
        (k, chosen), = tasks.items()
        return Choice(task=chosen, label_words=k, queries=ledger.tuning.queries - start)
    right = held_out_right(scores, labels, names, own, list(tasks))
    dev_scores = _scores(session, task, dev, names, _tokens(session, task, dev))
    if dev_scores is not None:
        index = {n: j for j, n in enumerate(names)}
        for k in tasks:
            right[k] = np.concatenate([right[k], _right(dev_scores, np.asarray(dev.labels), index,
                                                        _groups(own, ranked, k))])
    best, held_out, beats_own = pick(right)
    return Choice(task=tasks[best], label_words=best, held_out=held_out, beats_own=beats_own,
                  queries=ledger.tuning.queries - start)


def pick(right: dict[int, np.ndarray]) -> tuple[int, dict[int, float], dict[int, float]]:
    """K from which held-out inputs each K reads right (boolean [N] per K, K = 1 among them): the
    most accurate of K = 1 and the Ks whose sign test against it passes CHANCE_MARGIN, ties to fewer
    words. Also returns the accuracy per K and each K > 1's z."""
    held_out = {k: float(r.mean()) for k, r in right.items()}
    beats_own = {k: sign_test(right[k], right[1]) for k in right if k != 1}
    eligible = [1] + [k for k, z in beats_own.items() if z > CHANCE_MARGIN]
    return max(eligible, key=lambda k: (held_out[k], -k)), held_out, beats_own


def sign_test(right: np.ndarray, baseline: np.ndarray) -> float:
    """z of a paired sign test that `right` reads more inputs right than `baseline` (boolean [N],
    the same inputs): over the inputs the two read differently, (wins - losses) / sqrt(both); 0.0
    where they agree on every input."""
    wins, losses = int((right & ~baseline).sum()), int((~right & baseline).sum())
    return (wins - losses) / np.sqrt(wins + losses) if wins + losses else 0.0


def held_out_right(scores: np.ndarray, labels: np.ndarray, names: list[str], own: list[list[str]],
                   ks: list[int], folds: int = FOLDS) -> dict[int, np.ndarray]:
    """Per K in `ks`, which training inputs (boolean [N], fold by fold, the same order for every K)
    are read right through K words per class ranked on the other folds (each fold ranked once,
    whatever the number of K).

    Folds are dealt class by class in input order (the i-th input of a class goes to fold i mod
    `folds`), so each holds every class as far as the split allows and the count is reproducible.
    """
    fold = np.empty(len(labels), dtype=int)
    for c in np.unique(labels):
        at = np.flatnonzero(labels == c)
        fold[at] = np.arange(len(at)) % folds
    index = {n: j for j, n in enumerate(names)}
    right = {k: [] for k in ks}
    for f in range(min(folds, len(labels))):
        out = fold == f
        if out.all() or not out.any():
            continue
        ranked = rank(scores[~out], labels[~out], names, own)
        for k in ks:
            right[k].append(_right(scores[out], labels[out], index, _groups(own, ranked, k)))
    return {k: np.concatenate(r) if r else np.zeros(0, dtype=bool) for k, r in right.items()}


def _right(scores: np.ndarray, labels: np.ndarray, index: dict[str, int], groups: list[list[str]]) -> np.ndarray:
    """Which inputs (boolean [N]) are read right when each class scores as the mean of its group of
    words (columns by `index`)."""
    cols = [[index[w] for w in g] for g in groups]
    return class_scores(scores, cols).argmax(1) == labels


def class_scores(scores: np.ndarray, columns: list[list[int]]) -> np.ndarray:
    """[N, C] class scores: per class, the mean of its words' columns of `scores` [N, W]."""
    return np.stack([scores[:, cols].mean(1) for cols in columns], axis=1)


def _groups(own: list[list[str]], ranked: list[list[str]], k: int) -> list[list[str]]:
    """Per class, its own words and then its best-ranked candidates, K words in all (more if it owns more)."""
    return [o + r[: max(0, k - len(o))] for o, r in zip(own, ranked)]


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


def _candidates(train: Split, own: list[list[str]], pattern: str) -> list[str]:
    """A sentence encoder's candidate label texts: the classes' own texts, then the pattern filled
    with the training texts' words."""
    names = list(dict.fromkeys(t for o in own for t in o))
    words = (pattern.format(w) for w in _text_words(train, limit=MAX_LABELS))
    return (names + [t for t in words if t not in names])[:MAX_LABELS]


def _shortlist(session: Session, task: TaskSpec, train: Split, own: list[list[str]], tokens: int) -> list[str] | None:
    """An LM's candidate words (1 query, None if unaffordable): the classes' own words, then per
    class the `SHORTLIST` with the best margins among the words each training input finds likeliest
    at {mask}, a word missing from an input's `TOP_WORDS` counting as that list's last."""
    resp = _query(session, task, train, tokens, labels=False, top_words=TOP_WORDS)
    if resp is None:
        return None
    names = list(dict.fromkeys(w for o in own for w in o))
    # a word that begins an own word may be the token that word is read by: the probe of `_scores`
    # would then hold two labels on one token, which a server refuses
    found = sorted(w for w in {w for row in resp.words for w, _ in row} - set(names)
                   if not any(n.startswith(w) for n in names))
    limit = min(SHORTLIST, (MAX_LABELS - len(names)) // len(own))
    ranked = rank(_columns(resp.words, names + found), np.asarray(train.labels), names + found, own, limit=limit)
    return names + list(dict.fromkeys(w for r in ranked for w in r))


def _scores(session: Session, task: TaskSpec, split: Split, names: list[str], tokens: int) -> np.ndarray | None:
    """[N, W] scores of the candidates `names` on `split` from one query (None if unaffordable),
    each read as its own label: a sentence encoder's scaled cosines with the label texts, an LM's
    logits of the words at {mask}. `tokens` is what one query of `split` bills (`_tokens`)."""
    family = session.info.family
    placeholders = [f"w{i}" for i in range(len(names))]
    probe = TaskSpec(name=f"{task.name}-words", labels=placeholders, template=task.template, pair=task.pair,
                     verbalizer=placeholders if family == "encoder" else names, label_texts=names)
    resp = _query(session, probe, split, tokens, labels=False)
    if resp is None:
        return None
    scores = resp.logits.to_numpy()[0]
    if family != "encoder":
        # An LM's logits for one input carry an offset, the log of its softmax normaliser, that no
        # class decision sees but `rank`'s means across inputs would; an engine answering only
        # log-probabilities (vLLM) reports them without it. Centred rows are the same either way.
        scores = scores - scores.mean(1, keepdims=True)
    return scores


def _columns(words: list[list[tuple[str, float]]], names: list[str]) -> np.ndarray:
    """[N, W] log-probabilities of `names` from each input's likeliest words; a name missing from an
    input's list scores as that list's last (at most that)."""
    index = {w: j for j, w in enumerate(names)}
    out = np.empty((len(words), len(names)))
    for i, row in enumerate(words):
        out[i] = min(lp for _, lp in row) if row else 0.0
        for w, lp in row:
            if w in index:
                out[i, index[w]] = lp
    return out


def _tokens(session: Session, task: TaskSpec, split: Split) -> int:
    """Tokens one query of `split` bills (the words change none: `Session.stats`)."""
    return sum(session.stats(task, split).tokens)


def _query(session: Session, task: TaskSpec, split: Split, tokens: int, *, labels: bool = True, top_words: int = 0):
    """One tuning query of the plain model on `split`, or None when the budget cannot pay for it."""
    if session.affordable(1, examples=len(split), tokens=tokens) < 1:
        return None
    req = EvaluateRequest(model=session.model, task=task, inputs=split.examples, labels=split.labels if labels else None,
                          return_logits=True, top_words=top_words)
    return session.query(req, tuning=True, queries=1, examples=len(split), tokens=tokens)


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
