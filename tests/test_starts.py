"""Starting points from text (--init instruction / demos): what the client writes, what the server
embeds, and that a run started from one records and reproduces it, in process and over HTTP."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from bbt import starts
from bbt.budget import Budget, Ledger
from bbt.config import TuneConfig
from bbt.projection import normal_spec
from bbt.protocol import Example, IntrinsicPrompts, TaskSpec, Tensor
from bbt.tasks import BUILTIN_TASKS, for_family
from bbt.tuner import tune


def test_default_instruction_names_the_verbalizer_words():
    sst2 = for_family(BUILTIN_TASKS["sst2"], "causal")
    assert starts.instruction(sst2) == "Classify the sentiment of each review as negative or positive."
    agnews = BUILTIN_TASKS["agnews"]
    assert starts.instruction(agnews).endswith("World, Sports, Business or Tech.")
    user = TaskSpec(name="tickets", labels=["bug", "feature", "question"], verbalizer=["bug", "feature", "question"],
                    label_texts=["a", "b", "c"])
    assert starts.instruction(user) == "Classify the text as bug, feature or question."
    # the instruction ends like a line of the template, so the input starts fresh
    assert starts.init_text("instruction", sst2, None, None, [], 10, 0).endswith(".\n")
    assert starts.init_text("instruction", BUILTIN_TASKS["sst2"], "Rate it ", None, [], 10, 0) == "Rate it "
    assert starts.init_text("zero", sst2, None, None, [], 10, 0) is None


def test_demonstrations_take_the_shortest_of_each_class_in_rounds():
    task = TaskSpec(name="t", labels=["neg", "pos"], template="Review: {text}\nSentiment: {mask}",
                    verbalizer=[" negative", " positive"], label_texts=["a", "b"])
    texts = ["awful and long", "dull", "lovely", "fine work here", "bad", "good"]
    labels = [0, 0, 1, 1, 0, 1]
    tokens = [8, 5, 5, 8, 5, 6]
    examples = [Example(text=t) for t in texts]
    one_round = starts.demonstrations(task, examples, labels, tokens, length=10, seed=0)
    lines = one_round.strip().split("\n")
    assert len(lines) == 4 and one_round.endswith("\n")  # one example per class, even past the length
    reviews = set(lines[0::2])
    assert "Review: lovely" in reviews  # the shortest positive
    assert len(reviews & {"Review: dull", "Review: bad"}) == 1  # a tie for the shortest negative: the seed breaks it
    assert {lines[1], lines[3]} == {"Sentiment: negative", "Sentiment: positive"}
    # rounds cost 14, 15 and 20 tokens (+2 per example for its label word and separator)
    assert starts.demonstrations(task, examples, labels, tokens, length=40, seed=0).count("Review:") == 4
    assert starts.demonstrations(task, examples, labels, tokens, length=49, seed=0).count("Review:") == 6
    assert starts.demonstrations(task, examples, labels, tokens, length=10, seed=0) == one_round  # seeded
    pair = TaskSpec(name="p", labels=["no", "yes"], template="{text} ? {mask} , {text_pair}", verbalizer=["No", "Yes"],
                    label_texts=["a", "b"], pair=True)
    text = starts.demonstrations(pair, [Example(text="A", text_pair="B"), Example(text="C", text_pair="D")], [0, 1],
                                 [3, 3], length=5, seed=1)
    assert "A ? No , B" in text and "C ? Yes , D" in text
    assert text.endswith(("B ", "D "))  # the last demonstration's pair closes the text


def test_init_seed_and_init_text_are_exclusive():
    z = Tensor.from_numpy(np.zeros((1, 1, 2)))
    with pytest.raises(ValidationError, match="not both"):
        IntrinsicPrompts(z=z, projections=[normal_spec(seed=0, d=2, D=8, target_std=1.0)], prompt_length=2,
                         init_seed=1, init_text="hi")
    with pytest.raises(ValidationError, match="init_text is the instruction"):
        TuneConfig(init="demos", init_text="hello")


def test_server_embeds_the_text_ending_at_the_input(tiny_gpt2, local_backend):
    model = local_backend.service.get(str(tiny_gpt2))
    ids = model.tokenizer("good bad great", add_special_tokens=False)["input_ids"]
    emb = model.word_embeddings.weight.detach().numpy()
    n = len(ids)
    p0 = model.init_prompt("good bad great", n + 2)
    np.testing.assert_allclose(p0, emb[ids[-2:] + ids], rtol=0, atol=0)  # repeated; the whole text last
    np.testing.assert_allclose(model.init_prompt("good bad great", 2), emb[ids[-2:]], rtol=0, atol=0)
    from bbt.errors import ConfigError

    with pytest.raises(ConfigError, match="no tokens"):
        model.init_prompt("", 3)


@pytest.mark.parametrize("init", ["instruction", "demos"])
def test_a_run_from_text_starts_at_that_text_and_records_it(tiny_gpt2, local_backend, tiny_data, sst2_task, init):
    cfg = TuneConfig(model=str(tiny_gpt2), seed=0, prompt_length=6, intrinsic_dim=10, popsize=4, init=init,
                     budget=Budget(queries=12))
    result = tune(local_backend, cfg, sst2_task, tiny_data.train, tiny_data.dev, Ledger(cfg.budget))
    text = result.prompt.init_text
    assert text and result.prompt.init_seed is None
    if init == "demos":
        assert sst2_task.verbalizer[0].strip() in text and tiny_data.train.examples[0].text.split()[0] in "".join(
            e.text for e in tiny_data.train.examples)
    # z = 0 is the text itself: the server's p0, not zeros
    model = local_backend.service.get(str(tiny_gpt2))
    untuned = result.prompt.untuned()
    from bbt.protocol import EvaluateRequest

    def logits(prompts):
        req = EvaluateRequest(model=cfg.model, task=sst2_task, inputs=tiny_data.dev.examples, return_logits=True,
                              candidates=prompts)
        return local_backend.evaluate(req).logits.to_numpy()

    from bbt.protocol import PromptTensor

    p0 = model.init_prompt(text, 6)[None, None]
    np.testing.assert_allclose(logits(untuned.candidates()), logits(PromptTensor(prompts=Tensor.from_numpy(p0))), atol=1e-5)


def test_cli_init_text_implies_instruction_and_lands_in_the_artifact(tiny_gpt2, data_dir, tmp_path):
    from bbt.cli import main

    out = tmp_path / "run"
    rc = main(["tune", "--model", str(tiny_gpt2), "--task", "sst2", "--data", str(data_dir), "--seed", "13",
               "--prompt-length", "4", "--intrinsic-dim", "8", "--popsize", "4", "--budget", "8",
               "--init-text", "Say great or bad.", "--out", str(out), "--no-cache", "--quiet"])
    assert rc == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["init"] == "instruction" and config["init_text"] == "Say great or bad."
    artifact = json.loads((out / "prompt.json").read_text())
    assert artifact["init_text"] == "Say great or bad.\n" and artifact["init_seed"] is None
