"""Automatic verbalizers (--verbalizer auto): several words per class, the vocabulary read through
`top_words`, the choice made on train (its size on train + dev), within the budget, and a run
that records and reuses what it chose."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from bbt import verbalizers
from bbt.backends.http import HTTPBackend
from bbt.budget import Budget, Ledger
from bbt.config import TuneConfig, with_family_defaults
from bbt.errors import ConfigError
from bbt.protocol import EvaluateRequest, TaskSpec
from bbt.tasks import BUILTIN_TASKS
from bbt.session import Session
from recording import RecordingBackend

SST2 = BUILTIN_TASKS["sst2"]


def logits(backend, model, task, split, **extra) -> np.ndarray:
    req = EvaluateRequest(model=model, task=task, inputs=split.examples, return_logits=True, **extra)
    return backend.evaluate(req).logits.to_numpy()[0]


def test_task_entries_may_hold_several_words():
    task = SST2.model_copy(update={"verbalizer": [["bad", "awful"], "great"]})
    assert TaskSpec(**task.model_dump()).verbalizer == [["bad", "awful"], "great"]
    for bad, match in [([[], "great"], "has 0 words"), ([["bad", " "], "great"], "empty word"),
                       ([["w"] * 33, "great"], "has 33 words")]:
        with pytest.raises(ValidationError, match=match):
            TaskSpec(**{**SST2.model_dump(), "verbalizer": bad})


@pytest.mark.parametrize("kind", ["tiny_gpt2", "tiny_bert_mlm", "tiny_encoder"])
def test_a_class_with_several_words_scores_their_mean(kind, request, local_backend, tiny_data):
    """LMs: the mean of the words' logits; a sentence encoder: the mean cosine over its texts."""
    model = str(request.getfixturevalue(kind))
    field = "label_texts" if kind == "tiny_encoder" else "verbalizer"
    words = [["bad", "awful", "dull"], ["great", "good"]] if field == "verbalizer" else \
        [["It was bad.", "Awful."], ["It was great.", "Good.", "Lovely film."]]
    singles = [w for group in words for w in group]
    flat = SST2.model_copy(update={"labels": [f"w{i}" for i in range(len(singles))], field: singles,
                                   "verbalizer" if field == "label_texts" else "label_texts": singles})
    each = logits(local_backend, model, flat, tiny_data.dev)  # (N, 5): one column per word
    grouped = logits(local_backend, model, SST2.model_copy(update={field: words}), tiny_data.dev)
    want = np.stack([each[:, :3].mean(1), each[:, 3:].mean(1)] if field == "verbalizer"
                    else [each[:, :2].mean(1), each[:, 2:].mean(1)], axis=1)
    np.testing.assert_allclose(grouped, want, rtol=1e-5, atol=1e-5)


def test_top_words_reads_the_vocabulary_and_leaves_the_class_scores(tiny_gpt2, local_backend, tiny_data):
    model = str(tiny_gpt2)
    task = SST2.model_copy(update={"verbalizer": [["bad", "dull"], "great"]})
    req = EvaluateRequest(model=model, task=task, inputs=tiny_data.dev.examples, labels=tiny_data.dev.labels,
                          return_logits=True, top_words=7)
    resp = local_backend.evaluate(req)
    np.testing.assert_allclose(resp.logits.to_numpy()[0], logits(local_backend, model, task, tiny_data.dev),
                               rtol=1e-5, atol=1e-5)
    assert len(resp.words) == len(tiny_data.dev) and all(len(row) == 7 for row in resp.words)
    tokenizer = local_backend.service.get(model).tokenizer
    for row in resp.words:
        values = [lp for _, lp in row]
        assert values == sorted(values, reverse=True) and values[0] <= 0
        for word, _ in row:  # each is spelt as a verbalizer entry: one token, letters only
            assert word.isalpha() and len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1
    assert resp.usage.queries == 1


def test_top_words_refusals_name_the_fix(tiny_gpt2, tiny_encoder, local_backend, tiny_data):
    from bbt.projection import normal_spec
    from bbt.protocol import IntrinsicPrompts, Tensor

    two = IntrinsicPrompts(z=Tensor.from_numpy(np.ones((2, 1, 4))), prompt_length=2,
                           projections=[normal_spec(seed=0, d=4, D=2 * 32, target_std=0.1)])
    with pytest.raises(ConfigError, match="one candidate; this request has K = 2"):
        local_backend.evaluate(EvaluateRequest(model=str(tiny_gpt2), task=SST2, inputs=tiny_data.dev.examples,
                                               return_logits=True, top_words=3, candidates=two))
    with pytest.raises(ConfigError, match="reads no vocabulary"):
        local_backend.evaluate(EvaluateRequest(model=str(tiny_encoder), task=SST2, inputs=tiny_data.dev.examples,
                                               return_logits=True, top_words=3))
    with pytest.raises(ValidationError):
        EvaluateRequest(model="m", task=SST2, inputs=tiny_data.dev.examples, return_logits=True, top_words=1001)


def test_rank_keeps_words_that_tell_one_class_from_the_others():
    names = ["good", "bad", "film", "great", "awful"]
    scores = np.array([[-1, -5, -2, -1.5, -6],  # class 1 inputs like "good" and "great"
                       [-1, -6, -2, -2.0, -5],
                       [-5, -1, -2, -6.0, -1.5],  # class 0 inputs like "bad" and "awful"
                       [-6, -1, -2, -5.0, -2.0]])
    labels = np.array([1, 1, 0, 0])
    ranked = verbalizers.rank(scores, labels, names, own=[["bad"], ["great"]])
    assert ranked == [["awful"], ["good"]]  # own words are not repeated; "film" tells no class apart


def test_k_is_scored_on_inputs_that_did_not_pick_the_words():
    # the own words tell nothing (ties read as class 0); "lucky" scores high on one input of class 1
    # only, so ranked on all of train it joins class 1 and reads that input right: 5 of 8 on train
    names = ["bad", "great", "lucky"]
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.zeros((8, 3))
    scores[4, 2] = 9.0
    own = [["bad"], ["great"]]
    ranked = verbalizers.rank(scores, labels, names, own)
    assert ranked == [[], ["lucky"]]
    on_train = verbalizers.class_scores(scores, [[0], [1, 2]]).argmax(1)
    assert (on_train == labels).sum() == 5
    # held out, the input "lucky" was found on is read without it: K = 2 buys nothing over K = 1
    right = verbalizers.held_out_right(scores, labels, names, own, ks=[1, 2])
    assert {k: int(r.sum()) for k, r in right.items()} == {1: 4, 2: 4}
    # folds are dealt per class in input order: the count does not depend on a random draw
    assert int(verbalizers.held_out_right(scores, labels, names, own, ks=[2], folds=8)[2].sum()) == 4
    np.testing.assert_allclose(verbalizers.class_scores(scores, [[0, 2], [1]])[4], [4.5, 0.0])


def test_more_words_must_beat_the_own_words_by_more_than_noise():
    own = np.array([True] * 46 + [False] * 18)  # K = 1: 46 of 64 held-out inputs right
    # K = 8 reads 2 more right (5 wins, 3 losses): the most accurate, but within noise
    close = own.copy()
    close[46:51], close[:3] = True, False
    assert verbalizers.sign_test(close, own) == pytest.approx(2 / np.sqrt(8))
    k, held_out, z = verbalizers.pick({1: own, 8: close})
    assert k == 1 and held_out[8] > held_out[1] and z[8] < 1.645
    # K = 3 wins 9 inputs and loses 1: z = 8 / sqrt(10) = 2.5, chosen over K = 1 ...
    far = own.copy()
    far[46:55], far[0] = True, False
    assert verbalizers.pick({1: own, 3: far})[0] == 3
    # ... and over a K that is as accurate but noisier, and where tied, fewer words win
    assert verbalizers.pick({1: own, 3: far, 8: close})[0] == 3
    assert verbalizers.pick({1: own, 2: far, 3: far.copy()})[0] == 2
    assert verbalizers.sign_test(own, own) == 0.0


def test_choice_looks_at_train_and_dev_only_and_is_paid_for(tiny_gpt2, local_backend, tiny_data):
    model = str(tiny_gpt2)
    backend = RecordingBackend(local_backend)
    ledger = Ledger(Budget(queries=100))
    choice = verbalizers.choose(Session(backend, model, ledger), SST2, tiny_data.train, tiny_data.dev)
    train = [e.text for e in tiny_data.train.examples]
    dev = [e.text for e in tiny_data.dev.examples]
    sent = [[e.text for e in r.inputs] for r in backend.requests]
    # the words come from train alone: its likeliest words at {mask}, then the shortlist's exact scores
    assert sent[:2] == [train, train] and [r.top_words for r in backend.requests] == [verbalizers.TOP_WORDS, 0, 0]
    shortlist = backend.requests[1].task.verbalizer
    assert shortlist[:2] == SST2.verbalizer and len(shortlist) > 2
    # several K to tell apart: one more query, on dev, scores the same words
    assert sent[2:] == [dev] and backend.requests[2].task.verbalizer == shortlist
    assert set(choice.held_out) <= set(verbalizers.CHOICES) and len(choice.held_out) > 1
    assert choice.label_words in choice.held_out and all(0 <= v <= 1 for v in choice.held_out.values())
    # each K > 1 tested against the own words; one is taken only past the sign test's threshold
    assert set(choice.beats_own) == set(choice.held_out) - {1}
    assert choice.label_words == 1 or choice.beats_own[choice.label_words] > verbalizers.CHANCE_MARGIN
    assert ledger.tuning.queries == choice.queries == len(sent) == 3
    assert verbalizers.queries("causal", None) == ["train", "train", "dev"]  # what bbt tune --dry-run counts
    for own, entry in zip(SST2.verbalizer, choice.task.verbalizer):  # the task's own word comes first
        assert (entry if isinstance(entry, str) else entry[0]) == own
    assert choice.task.labels == SST2.labels and choice.task.template == SST2.template

    fixed = verbalizers.choose(Session(local_backend, model, Ledger(Budget(queries=100))), SST2, tiny_data.train,
                               tiny_data.dev, label_words=3)
    assert fixed.queries == 2 and fixed.label_words == 3 and fixed.held_out == {}
    assert all(isinstance(e, list) and len(e) <= 3 for e in fixed.task.verbalizer)

    broke = Ledger(Budget(examples=len(tiny_data.train) - 1))  # cannot pay for one query on train
    assert verbalizers.choose(Session(local_backend, model, broke), SST2, tiny_data.train, tiny_data.dev).task == SST2
    assert broke.tuning.queries == 0


def test_an_lm_chooses_on_the_scores_the_model_reads_its_words_by(tiny_gpt2, local_backend, tiny_data):
    # the held-out check must see what the tuned run will: the exact class scores of a verbalizer
    # with several words, not the top-words estimates the shortlist comes from
    model = str(tiny_gpt2)
    ledger = Ledger(Budget(queries=10))
    session = Session(local_backend, model, ledger)
    train_tokens, dev_tokens = (verbalizers._tokens(session, SST2, s) for s in (tiny_data.train, tiny_data.dev))
    names = verbalizers._shortlist(session, SST2, tiny_data.train, [["bad"], ["great"]], train_tokens)
    exact = verbalizers._scores(session, SST2, tiny_data.dev, names, dev_tokens)
    assert exact.shape == (len(tiny_data.dev), len(names)) and ledger.tuning.queries == 2
    assert names[:2] == ["bad", "great"] and len(names) <= 2 + 2 * verbalizers.SHORTLIST
    # no candidate may be the token an own word is read by (a probe with two labels on one token fails)
    assert not any(own.startswith(w) for w in names[2:] for own in ("bad", "great"))
    task = SST2.model_copy(update={"verbalizer": [["bad", names[2]], ["great", names[3], names[4]]]})
    want = logits(local_backend, model, task, tiny_data.dev)
    got = verbalizers.class_scores(exact, [[0, 2], [1, 3, 4]])
    # the same scores up to one offset per input (an LM's rows are centred: see verbalizers._scores),
    # which no class decision sees
    centred = lambda x: x - x.mean(1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(centred(got), centred(want), rtol=1e-5, atol=1e-5)


def test_a_sentence_encoder_chooses_label_texts_from_the_training_words(tiny_encoder, local_backend, tiny_data):
    assert verbalizers._pattern(SST2) == "It was {}."
    agnews = BUILTIN_TASKS["agnews"]
    assert verbalizers._pattern(agnews) == "{}"  # "Technology news." does not hold "Tech"
    choice = verbalizers.choose(Session(local_backend, str(tiny_encoder), Ledger(Budget(queries=100))), SST2,
                                tiny_data.train, tiny_data.dev, label_words=2)
    words = {w.lower() for e in tiny_data.train.examples for w in e.text.split()}
    for own, entry in zip(SST2.label_texts, choice.task.label_texts):
        texts = [entry] if isinstance(entry, str) else entry
        assert texts[0] == own
        for t in texts[1:]:
            assert t.startswith("It was ") and t[len("It was "):-1] in words


def test_a_run_chooses_once_records_the_words_and_evaluates_with_them(tiny_gpt2, data_dir, tmp_path, capsys,
                                                                      monkeypatch):
    from bbt.backends.local import LocalBackend
    from bbt.cli import main

    asked, stats = [], LocalBackend.stats

    def counted(self, request):
        asked.append((request.task.template, tuple(e.text for e in request.inputs)))
        return stats(self, request)

    monkeypatch.setattr(LocalBackend, "stats", counted)
    out = tmp_path / "run"
    args = ["tune", "--model", str(tiny_gpt2), "--task", "sst2", "--data", str(data_dir), "--seed", "13",
            "--prompt-length", "4", "--intrinsic-dim", "8", "--popsize", "4", "--budget", "20",
            "--verbalizer", "auto", "--label-words", "3", "--out", str(out), "--no-cache", "--quiet"]
    assert main(args) == 0  # 3 words each, so that the words differ from the task's own
    assert len(asked) == len(set(asked)) == 2  # train's stats, shared by the word choice and the search; dev's
    metrics = json.loads((out / "metrics.json").read_text())
    v = metrics["verbalizer"]
    assert metrics["queries_used"] <= 20 and v["queries"] == 2 and v["label_words"] == 3
    assert 0 <= metrics["no_prompt_verbalizer_test_acc"] <= 1 and "no_prompt_test_acc" in metrics
    artifact = json.loads((out / "prompt.json").read_text())
    assert artifact["task"]["verbalizer"] == v["entries"]
    assert json.loads((out / "config.json").read_text())["config"]["verbalizer"] == "auto"
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--split", "test"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["acc"] == pytest.approx(metrics["test_acc"])  # read through the chosen words again
    # the plain model is the baseline with the task's own words, in evaluate as in metrics.json
    assert artifact["plain_task"]["verbalizer"] != v["entries"]
    assert report["no_prompt_acc"] == pytest.approx(metrics["no_prompt_test_acc"])
    assert report["no_prompt_verbalizer_acc"] == pytest.approx(metrics["no_prompt_verbalizer_test_acc"])
    with pytest.raises(ValidationError, match="label_words is the number of words"):
        TuneConfig(verbalizer="manual", label_words=3)


def test_top_words_over_http_equal_in_process(tiny_gpt2, local_backend, tiny_data):
    from appserver import serving
    from servers.app import create_app
    from servers.service import ModelService

    model = str(tiny_gpt2)
    req = EvaluateRequest(model=model, task=SST2, inputs=tiny_data.train.examples, labels=tiny_data.train.labels,
                          return_logits=True, top_words=5)
    want = local_backend.evaluate(req)
    with serving(create_app(ModelService([model], lazy=False))) as url, HTTPBackend([url]) as http:
        got = http.evaluate(req)
        assert [[w for w, _ in row] for row in got.words] == [[w for w, _ in row] for row in want.words]
        np.testing.assert_allclose([[lp for _, lp in r] for r in got.words], [[lp for _, lp in r] for r in want.words],
                                   rtol=0, atol=1e-6)
        ledger = Ledger(Budget(queries=50))
        over_http = verbalizers.choose(Session(http, model, ledger), SST2, tiny_data.train, tiny_data.dev)
    in_process = verbalizers.choose(Session(local_backend, model, Ledger(Budget(queries=50))), SST2, tiny_data.train,
                                    tiny_data.dev)
    assert over_http.task == in_process.task and over_http.held_out == in_process.held_out


def test_black_box_runs_choose_words_by_default_and_gradient_runs_keep_their_own():
    assert TuneConfig().verbalizer == "auto" and TuneConfig(method="bbtv2").verbalizer == "auto"
    for family in ("encoder", "causal"):
        assert with_family_defaults(TuneConfig(), family).verbalizer == "auto"
        assert with_family_defaults(TuneConfig(method="prompt-tuning"), family).verbalizer == "manual"
        assert with_family_defaults(TuneConfig(verbalizer="manual"), family).verbalizer == "manual"
    # asked for in so many words, a gradient method's auto is kept, for run_gradient to refuse with a reason
    assert with_family_defaults(TuneConfig(method="p-tuning", verbalizer="auto"), "encoder").verbalizer == "auto"
