"""The model families, built tiny from a config: loading, templates and verbalizers at the token
level, prompt insertion (input and deep), batching, wire encodings and usage."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bbt import metrics
from bbt.errors import ConfigError, ModelNotFound
from bbt.projection import normal_spec, project
from bbt.protocol import EvaluateRequest, Example, IntrinsicPrompts, PromptTensor, StatsRequest, TaskSpec, Tensor
from bbt.tasks import BUILTIN_TASKS
from conftest import EXPECTED_FAMILY, loaded_model

TEXTS = ["the film was great and good", "this movie was dull",
         "the story was awful and boring and the acting was terrible and the ending was weak", "nice"]


@pytest.fixture
def loaded(tiny_model):
    """(kind, PromptModel): each tiny model loaded once per process."""
    kind, path = tiny_model
    return kind, loaded_model(str(path))


def _examples(texts=TEXTS):
    return [Example(text=t) for t in texts]


def _prompts(model, k: int, layers: int, length: int = 3, seed: int = 0, scale: float = 1.0):
    """Random prompts (K, layers, L, H) at a given scale."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, layers, length, model.hidden_size, generator=g) * scale


def test_family_is_detected_and_info_is_sane(loaded):
    kind, model = loaded
    assert model.family.name == EXPECTED_FAMILY[kind]
    info = model.info()
    assert info.hidden_size == 32 and info.num_layers == 2
    assert len(info.hidden_std) == 2 and all(s > 0 for s in info.hidden_std)
    assert info.embedding_std == pytest.approx(float(model.word_embeddings.weight.std()), rel=1e-4)
    assert 1 <= info.max_prompt_tokens <= info.max_input_tokens
    assert set(info.modes) == {"bbt", "bbtv2"}


def test_a_bare_base_model_is_an_encoder_and_unknown_architectures_are_refused(tiny_encoder, tmp_path):
    from servers.loading import detect_family, resolve_model_path

    bare = tmp_path / "bare"
    shutil.copytree(tiny_encoder, bare)
    (bare / "modules.json").unlink()
    assert detect_family(bare) == "encoder"  # architectures: ["BertModel"]
    cfg = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForSequenceClassification"]}))
    with pytest.raises(ModelNotFound, match="cannot tell the model family"):
        detect_family(bare)
    with pytest.raises(ModelNotFound, match="never downloaded"):
        resolve_model_path(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))


# ---- templates and verbalizers at the token level -------------------------------------------

@pytest.mark.parametrize("task_name", ["sst2", "agnews", "snli"])
def test_verbalizer_words_are_distinct_single_tokens(loaded, task_name):
    kind, model = loaded
    task = BUILTIN_TASKS[task_name]
    ids = model.family.verbalizer_ids(task)[0]
    assert len(set(ids)) == len(task.verbalizer)
    words = [model.tokenizer.decode([i]).strip().lower() for i in ids]
    assert words == [w.lower() for w in task.verbalizer]


def test_template_tokens(loaded, sst2_task):
    kind, model = loaded
    enc = model.encode(sst2_task, _examples())
    assert enc.tokens == [len(s) for s in enc.ids]
    for ids, at in zip(enc.ids, enc.readout):
        if model.family.name == "encoder":
            assert at == -1  # pooled: the template is not used, the text is
            assert "it was" not in model.tokenizer.decode(ids).lower()
        elif model.family.name == "masked":
            assert ids[at] == model.tokenizer.mask_token_id
            assert ids.count(model.tokenizer.mask_token_id) == 1
            assert model.tokenizer.decode(ids[:at]).strip().lower().endswith("it was")
        else:  # causal: the next token after "TEXT . It was" is the verbalizer
            assert at == len(ids) - 1
            assert model.tokenizer.decode(ids).strip().endswith("It was")
    text = model.tokenizer.decode(enc.ids[0]).lower()
    assert "the film was great and good" in text


def test_masked_template_needs_exactly_one_mask(loaded):
    kind, model = loaded
    if model.family.name != "masked":
        pytest.skip("only masked LMs read the mask position")
    two = TaskSpec(name="two", labels=["a", "b"], template="{text} {mask} and {mask}", verbalizer=["bad", "great"],
                   label_texts=["a", "b"])
    with pytest.raises(ConfigError, match="gives 2 mask tokens"):
        model.encode(two, _examples()[:1])


def test_verbalizer_mapping_two_labels_to_one_token_is_refused(loaded):
    kind, model = loaded
    if model.family.name == "encoder":
        pytest.skip("sentence encoders compare with label texts, not verbalizer tokens")
    same = TaskSpec(name="same", labels=["a", "b"], verbalizer=["great", "great"], label_texts=["a", "b"])
    with pytest.raises(ConfigError, match="maps two labels to the same tokens"):
        model.family.verbalizer_ids(same)


CAUSAL_PAIR = TaskSpec(name="rte-causal", labels=["entailment", "not_entailment"], pair=True,
                      template="{text} ? {text_pair} . It was {mask}", verbalizer=["Yes", "No"], label_texts=["yes", "no"])


def test_pair_inputs_reach_the_model(loaded):
    """Changing only text_pair changes the scores: the second sentence is read, not dropped."""
    kind, model = loaded
    task = CAUSAL_PAIR if model.family.name == "causal" else BUILTIN_TASKS["rte"]
    pairs = [Example(text="the film was great", text_pair=t) for t in ("the film was good", "the story was awful and dull")]
    enc = model.encode(task, pairs)
    text = model.tokenizer.decode(enc.ids[1]).lower()
    assert "the film was great" in text and "awful and dull" in text
    logits = model.logits(task, enc, _prompts(model, k=1, layers=1))
    assert not np.allclose(logits[0, 0].numpy(), logits[0, 1].numpy(), atol=1e-5)


@pytest.mark.parametrize("task_name", ["agnews", "dbpedia", "rte"])
def test_causal_lm_refuses_templates_that_put_the_input_after_the_mask(tiny_gpt2, task_name):
    """A causal LM reads the class at the token after the input: text after {mask} would be silently dropped."""
    model = loaded_model(str(tiny_gpt2))
    task = BUILTIN_TASKS[task_name]
    ex = Example(text="the team won", text_pair="they lost" if task.pair else None)
    with pytest.raises(ConfigError, match=r"must put .* before \{mask\}"):
        model.encode(task, [ex])


def test_long_texts_are_cut_to_fit(loaded, sst2_task):
    kind, model = loaded
    long = Example(text=" ".join(["the film was great"] * 200))
    enc = model.encode(sst2_task, [long])
    assert enc.tokens[0] <= model.max_input_tokens
    if model.family.name == "masked":
        assert model.tokenizer.mask_token_id in enc.ids[0]  # the template survives the cut


# ---- scoring prompts ------------------------------------------------------------------------

def test_logits_shape_and_the_prompt_matters(loaded, sst2_task):
    kind, model = loaded
    enc = model.encode(sst2_task, _examples())
    zero = model.logits(sst2_task, enc, None)
    assert zero.shape == (1, 4, 2) and bool(zero.isfinite().all())
    again = model.logits(sst2_task, enc, None)
    assert bool((zero == again).all())
    p = _prompts(model, k=3, layers=1)
    out = model.logits(sst2_task, enc, p)
    assert out.shape == (3, 4, 2)
    assert not np.allclose(out[0].numpy(), out[1].numpy(), atol=1e-5)
    assert not np.allclose(out[0].numpy(), zero[0].numpy(), atol=1e-5)


def test_logits_match_a_reference_forward(loaded, sst2_task):
    """Class scores recomputed one example at a time with the transformers model's own forward, the
    prompt spliced in by hand after the leading special tokens."""
    import torch
    import torch.nn.functional as F

    from servers.families import ENCODER_LOGIT_SCALE

    kind, model = loaded
    enc = model.encode(sst2_task, _examples())
    p = _prompts(model, k=2, layers=1, seed=4)
    got = model.logits(sst2_task, enc, p)
    length, at = p.shape[2], model.prompt_at
    tok = model.tokenizer
    if model.family.name == "encoder":
        labels = []
        for text in sst2_task.label_texts:
            hidden = model.model(**tok(text, return_tensors="pt")).last_hidden_state[0]
            labels.append(F.normalize(hidden.mean(0), dim=-1))
        labels = torch.stack(labels)  # (C, H)
    verb = None if model.family.name == "encoder" else model.family.verbalizer_ids(sst2_task)[0]
    with torch.no_grad():
        for i, ids in enumerate(enc.ids):
            for k in range(2):
                emb = model.word_embeddings(torch.tensor([ids]))  # (1, T, H)
                emb = torch.cat([emb[:, :at], p[k : k + 1, 0], emb[:, at:]], dim=1)  # (1, T + L, H)
                if model.family.name == "encoder":
                    hidden = model.model(inputs_embeds=emb).last_hidden_state[0]
                    text_only = torch.cat([hidden[:at], hidden[at + length :]])  # pool the text, not the prompt
                    expected = ENCODER_LOGIT_SCALE * F.normalize(text_only.mean(0), dim=-1) @ labels.T
                else:
                    if model.family.name == "masked":
                        where = ids.index(tok.mask_token_id)
                    else:
                        where = len(ids) - 1  # the next token after the text before {mask}
                    vocab = model.model(inputs_embeds=emb).logits[0]  # (T + L, V)
                    expected = vocab[where + length, verb]
                np.testing.assert_allclose(got[k, i].numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_each_candidate_and_example_is_scored_as_if_alone(loaded, sst2_task):
    """Padding, length sorting and the candidate x example batching must not change any score."""
    kind, model = loaded
    enc = model.encode(sst2_task, _examples())
    p = _prompts(model, k=3, layers=1, seed=1)
    together = model.logits(sst2_task, enc, p)
    for i, text in enumerate(TEXTS):
        alone_enc = model.encode(sst2_task, [Example(text=text)])
        for k in range(3):
            alone = model.logits(sst2_task, alone_enc, p[k : k + 1])
            np.testing.assert_allclose(together[k, i].numpy(), alone[0, 0].numpy(), rtol=1e-4, atol=1e-4)


def test_chunks_respect_the_token_budget():
    from servers.batching import chunks as _chunks

    lengths = [3, 4, 4, 6, 9, 30]
    chunks = _chunks(list("abcdef"), lengths, tokens=12)
    assert chunks == [["a", "b", "c"], ["d"], ["e"], ["f"]]  # 3 x 4 <= 12; 2 x 6 = 12 but d, e need 2 x 9
    assert sum(chunks, []) == list("abcdef")  # order kept, nothing lost or repeated
    assert _chunks(list("ab"), [5, 5], tokens=100) == [["a", "b"]]


@pytest.mark.parametrize("layers", ["input", "deep"])
def test_chunk_size_does_not_change_scores(loaded, sst2_task, monkeypatch, layers):
    """Tiny chunks (one or two sequences per forward pass) give the scores of one big pass, for input
    prompts and for deep prompts that share their lower layers (BBTv2's reuse path)."""
    import servers.batching as models

    kind, model = loaded
    enc = model.encode(sst2_task, _examples())
    n_layers = 1 if layers == "input" else model.num_layers
    p = _prompts(model, k=3, layers=n_layers, seed=2)
    if layers == "deep":
        p[:, :-1] = p[0, :-1]  # only the top layer differs: the lower ones are computed once
    big = model.logits(sst2_task, enc, p)
    monkeypatch.setattr(models, "TOKENS_PER_CHUNK", 8)
    small = model.logits(sst2_task, enc, p)
    np.testing.assert_allclose(small.numpy(), big.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layers", ["input", "deep"])
def test_top_layer_at_the_read_rows_only_gives_the_same_scores(loaded, sst2_task, layers):
    """The top layer run only where the head reads (text rows, or the mask) equals the full layer,
    for input prompts and for deep prompts, with and without the reuse of lower layers."""
    from servers.fastpaths import BertLayer as _BertLayer

    kind, model = loaded
    assert _BertLayer.fits(model.layers[-1]) == (model.family.name != "causal")
    enc = model.encode(sst2_task, _examples())
    n_layers = 1 if layers == "input" else model.num_layers
    p = _prompts(model, k=3, layers=n_layers, seed=5)
    if layers == "deep":
        p[:, :-1] = p[0, :-1]  # only the top layer's prompt differs: reuse computes the rest once
    try:
        model.top_rows_only = False
        full = model.logits(sst2_task, enc, p)
    finally:
        model.top_rows_only = True
    rows = model.logits(sst2_task, enc, p)
    np.testing.assert_allclose(rows.numpy(), full.numpy(), rtol=1e-4, atol=1e-5)
    assert isinstance(model.layers[-1], type(model.layers[0]))  # the top layer is put back


def test_deep_prompt_reaches_the_upper_layer(loaded, sst2_task):
    """BBTv2: entry 1 is added to the hidden states entering layer 1; zeros there change nothing."""
    kind, model = loaded
    enc = model.encode(sst2_task, _examples())
    import torch

    shallow = _prompts(model, k=2, layers=1, seed=2)
    with_zero_deep = torch.cat([shallow, torch.zeros_like(shallow)], dim=1)  # (K, 2, L, H)
    np.testing.assert_allclose(model.logits(sst2_task, enc, with_zero_deep).numpy(),
                               model.logits(sst2_task, enc, shallow).numpy(), rtol=1e-5, atol=1e-5)
    deep = torch.cat([shallow, _prompts(model, k=2, layers=1, seed=3, scale=float(model.info().hidden_std[1]))], dim=1)
    assert not np.allclose(model.logits(sst2_task, enc, deep).numpy(),
                           model.logits(sst2_task, enc, shallow).numpy(), atol=1e-4)
    # the hook is removed after the pass: a later shallow pass is unaffected
    np.testing.assert_allclose(model.logits(sst2_task, enc, shallow).numpy(),
                               model.logits(sst2_task, enc, with_zero_deep).numpy(), rtol=1e-5, atol=1e-5)


def _request(model_name, task, z, specs, length, encoding, labels=(1, 0, 0, 1)):
    if encoding == "intrinsic":
        cand = IntrinsicPrompts(z=Tensor.from_numpy(z), projections=specs, prompt_length=length)
    else:
        p = np.stack([project(z[:, layer], specs[layer]) for layer in range(z.shape[1])], axis=1)  # (K, layers, D)
        cand = PromptTensor(prompts=Tensor.from_numpy(p.reshape(z.shape[0], z.shape[1], length, -1), dtype=encoding))
    return EvaluateRequest(model=model_name, task=task, inputs=_examples(), labels=list(labels), return_logits=True,
                           candidates=cand)


def test_wire_encodings_agree_and_usage_is_counted(tiny_model, local_backend, sst2_task):
    kind, path = tiny_model
    name = str(path)
    info = local_backend.model_info(name)
    length, d, k = 3, 6, 4
    specs = [normal_spec(seed=s, d=d, D=length * info.hidden_size, target_std=info.embedding_std) for s in (1, 2)]
    z = np.random.default_rng(0).standard_normal((k, 2, d))
    got = {enc: local_backend.evaluate(_request(name, sst2_task, z, specs, length, enc))
           for enc in ("intrinsic", "float32", "float16")}
    np.testing.assert_allclose(got["float32"].losses, got["intrinsic"].losses, rtol=1e-6)
    np.testing.assert_allclose(got["float16"].losses, got["intrinsic"].losses, rtol=2e-2, atol=2e-3)
    usage = got["intrinsic"].usage
    tokens = local_backend.stats(StatsRequest(model=name, task=sst2_task, inputs=_examples())).tokens
    assert (usage.queries, usage.requests, usage.examples) == (k, 1, k * 4)
    assert usage.tokens == k * (sum(tokens) + 4 * length)
    logits = got["intrinsic"].logits.to_numpy()
    assert logits.shape == (k, 4, 2)
    np.testing.assert_allclose(got["intrinsic"].losses, metrics.cross_entropy(logits, np.array([1, 0, 0, 1])), rtol=1e-5)


@pytest.mark.parametrize("change,message", [
    (dict(z_shape=(2, 3, 6)), "expected \\[K, 1 or 2, d\\]"),
    (dict(d_spec=7), "z and the model need"),
    (dict(length=200), "prompt length 200 tokens"),
    (dict(n_specs=2), "2 projection specs for 1 prompted layers"),
])
def test_service_refuses_inconsistent_candidates(tiny_encoder, local_backend, sst2_task, change, message):
    name = str(tiny_encoder)
    length = change.get("length", 3)
    z = np.zeros(change.get("z_shape", (2, 1, 6)))
    z[0, 0, 0] = 1.0
    spec = normal_spec(seed=0, d=change.get("d_spec", 6), D=length * 32, target_std=1.0)
    req = EvaluateRequest(model=name, task=sst2_task, inputs=_examples(), labels=[0, 1, 0, 1], candidates=IntrinsicPrompts(
        z=Tensor.from_numpy(z), projections=[spec] * change.get("n_specs", 1), prompt_length=length))
    with pytest.raises(ConfigError, match=message):
        local_backend.evaluate(req)


def test_service_refuses_non_finite_prompts(tiny_encoder, local_backend, sst2_task):
    p = np.zeros((1, 1, 2, 32), dtype=np.float32)
    p[0, 0, 1, 3] = np.inf
    req = EvaluateRequest(model=str(tiny_encoder), task=sst2_task, inputs=_examples(), labels=[0, 1, 0, 1],
                          candidates=PromptTensor(prompts=Tensor.from_numpy(p)))
    with pytest.raises(ConfigError, match="NaN or infinite"):
        local_backend.evaluate(req)
