"""BBTv2's layer reuse on the model side: while only layer l's prompt differs between candidates,
the states entering layer l are computed once per example, and only layers l.. run per candidate.

Checked on 4-layer tiny models of every family: the same logits as the full pass at every l, the
lower layers really see one pass instead of K, the model is left as it was, and the intrinsic wire
form (the server projecting z itself) triggers it too. The states are kept between requests: over a
round (layer l right after layer l-1) each lower pass runs one layer, and kept states whose lower
prompts have changed since are not used.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from bbt.projection import normal_spec
from bbt.protocol import EvaluateRequest, Example, IntrinsicPrompts, Tensor
from conftest import FAMILIES

LAYERS = 4
TEXTS = ["the film was great and good", "this movie was dull", "nice", "the story was awful and boring and weak"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def deep_model(request, tmp_path_factory):
    """(kind, PromptModel): the tiny model of a family rebuilt with 4 layers (random weights, seeded)."""
    import torch
    import transformers

    from servers.engine import load_model

    kind = request.param
    src = request.getfixturevalue(FAMILIES[kind])
    dst = tmp_path_factory.mktemp(f"deep-{kind}")
    for f in src.iterdir():  # tokenizer and layout files; the weights are made anew below
        if f.is_file() and f.suffix not in (".safetensors", ".bin"):
            shutil.copy(f, dst / f.name)
    cfg = transformers.AutoConfig.from_pretrained(src)
    cfg.num_hidden_layers = LAYERS
    torch.manual_seed(5)
    getattr(transformers, cfg.architectures[0])(cfg).save_pretrained(dst)
    return kind, load_model(str(dst))


def _prompts(model, k: int, shared_below: int, length: int = 3, seed: int = 0):
    """Deep prompts (K, LAYERS, L, H): one draw for layers < shared_below, per candidate above."""
    import torch

    g = torch.Generator().manual_seed(seed)
    std = model.info().hidden_std
    p = torch.randn(k, LAYERS, length, model.hidden_size, generator=g)
    p[:, :shared_below] = p[:1, :shared_below]
    return p * torch.tensor([std[0]] + std[1:LAYERS])[None, :, None, None]


def _rows_into(layer, model=None):
    """Counts the sequences a transformer layer runs on to the end; returns (counter, hook handle).

    The hook sits on the layer's last LayerNorm, which runs whether the layer is called as itself
    or through a stand-in that calls its parts (`_BertLayer`)."""
    seen = [0]

    def hook(mod, args, output):
        if model is not None and model.decoder is not None and model.decoder.in_prefix:
            return  # a causal LM's prefix (the prompt, once per candidate) is not a row per example
        seen[0] += args[0].shape[0]

    last_norm = [m for m in layer.modules() if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))][-1]
    return seen, last_norm.register_forward_hook(hook)


def _counted(model, fn):
    """fn()'s result and the sequences each layer ran on meanwhile (the top layer run whole)."""
    counters = [_rows_into(layer, model) for layer in model.layers]
    model.top_rows_only = False
    try:
        out = fn()
    finally:
        model.top_rows_only = True
        for _, handle in counters:
            handle.remove()
    return out, [c[0] for c, _ in counters]


def _logits(model, task, enc, p, reuse: bool):
    model.reuse_lower_layers = reuse
    try:
        return model.logits(task, enc, p).numpy()
    finally:
        model.reuse_lower_layers = True


@pytest.mark.parametrize("start", range(LAYERS))
def test_reuse_gives_the_logits_of_the_full_pass(deep_model, sst2_task, start):
    from servers.reuse import first_varying_layer

    kind, model = deep_model
    enc = model.encode(sst2_task, [Example(text=t) for t in TEXTS])
    p = _prompts(model, k=5, shared_below=start, seed=start)
    assert first_varying_layer(p) == start
    full = _logits(model, sst2_task, enc, p, reuse=False)
    reused = _logits(model, sst2_task, enc, p, reuse=True)
    np.testing.assert_allclose(reused, full, rtol=1e-4, atol=1e-4, err_msg=f"{kind}, layers below {start} shared")
    assert np.abs(full - full[:1]).max() > 1e-3  # the candidates do differ: the comparison means something


def test_lower_layers_run_once_per_example_not_per_candidate(deep_model, sst2_task):
    kind, model = deep_model
    enc = model.encode(sst2_task, [Example(text=t) for t in TEXTS])
    k, n, start = 5, len(TEXTS), 2
    p = _prompts(model, k=k, shared_below=start)
    _, reused = _counted(model, lambda: _logits(model, sst2_task, enc, p, reuse=True))
    _, full = _counted(model, lambda: _logits(model, sst2_task, enc, p, reuse=False))
    assert full == [k * n] * LAYERS
    assert reused == [n] * start + [k * n] * (LAYERS - start), kind
    assert all(type(layer).__name__ != "_Skip" for layer in model.layers)  # the stack is restored


def test_identical_candidates_and_bbt_prompts_are_unaffected(deep_model, sst2_task):
    kind, model = deep_model
    enc = model.encode(sst2_task, [Example(text=t) for t in TEXTS])
    same = _prompts(model, k=1, shared_below=LAYERS).expand(3, -1, -1, -1).clone()
    np.testing.assert_allclose(_logits(model, sst2_task, enc, same, reuse=True),
                               _logits(model, sst2_task, enc, same, reuse=False), rtol=1e-4, atol=1e-4)
    shallow = _prompts(model, k=3, shared_below=0)[:, :1]  # BBT: one layer, nothing to share
    np.testing.assert_array_equal(_logits(model, sst2_task, enc, shallow, reuse=True),
                                  _logits(model, sst2_task, enc, shallow, reuse=False))


def test_the_intrinsic_wire_form_triggers_reuse(deep_model, sst2_task):
    """The tuner sends z with every layer but one equal to the current best: the server's own
    projection must give bit-identical lower-layer prompts, or reuse would never start."""
    from bbt.backends.local import LocalBackend

    kind, model = deep_model
    info = model.info()
    d, length, k = 8, 3, 6
    specs = [normal_spec(seed=10 + layer, d=d, D=length * model.hidden_size,
                         target_std=info.embedding_std if layer == 0 else info.hidden_std[layer]) for layer in range(LAYERS)]
    rng = np.random.default_rng(0)
    z = np.repeat(rng.normal(size=(1, LAYERS, d)), k, axis=0)
    z[:, 2] = rng.normal(size=(k, d))  # generation tuning layer 2
    backend = LocalBackend()
    req = EvaluateRequest(model=str(model.path), task=sst2_task, inputs=[Example(text=t) for t in TEXTS],
                          labels=[1, 0, 1, 0], return_logits=True,
                          candidates=IntrinsicPrompts(z=Tensor.from_numpy(z), projections=specs, prompt_length=length))
    served = backend.service.get(str(model.path))
    # once first (the encoder embeds its label texts on first use), with other lower prompts, so
    # that the states it leaves behind do not serve the request counted below
    other = req.model_copy(deep=True)
    z_other = z.copy()
    z_other[:, :2] += 1.0
    other.candidates.z = Tensor.from_numpy(z_other)
    backend.evaluate(other)
    counter, handle = _rows_into(served.layers[0], served)
    try:
        backend.evaluate(req)
    finally:
        handle.remove()
    assert counter[0] == len(TEXTS), f"{kind}: layer 0 ran {counter[0]} sequences"


def test_over_a_round_each_lower_pass_runs_one_layer(deep_model, sst2_task):
    """BBTv2's schedule: layer l is tuned right after layer l-1, whose best prompt has just changed."""
    import torch

    kind, model = deep_model
    enc = model.encode(sst2_task, [Example(text=t) for t in TEXTS])
    k, n = 4, len(TEXTS)
    best = _prompts(model, k=1, shared_below=LAYERS, seed=1)  # (1, LAYERS, L, H): the best so far
    g = torch.Generator().manual_seed(2)
    for start in range(1, LAYERS):
        best[0, start - 1] += 0.5 * torch.randn(best.shape[2:], generator=g)  # layer start-1 found a better prompt
        p = best.expand(k, -1, -1, -1).clone()
        p[:, start] += torch.randn(p[:, start].shape, generator=g)  # the population of layer `start`
        reused, ran = _counted(model, lambda: _logits(model, sst2_task, enc, p, reuse=True))
        full = _logits(model, sst2_task, enc, p, reuse=False)
        np.testing.assert_allclose(reused, full, rtol=1e-4, atol=1e-4, err_msg=f"{kind}, layer {start}")
        lower = [n if start == 1 else 0] * (start - 1) + [n]  # only layer start-1 runs below `start`
        assert ran == lower + [k * n] * (LAYERS - start), f"{kind}, layer {start}: {ran}"
    # the same generation again (no lower prompt changed): the kept states serve it as they are
    reused, ran = _counted(model, lambda: _logits(model, sst2_task, enc, p, reuse=True))
    np.testing.assert_allclose(reused, full, rtol=1e-4, atol=1e-4)
    assert ran == [0] * (LAYERS - 1) + [k * n], kind


def test_kept_states_under_other_lower_prompts_are_not_used(deep_model, sst2_task):
    kind, model = deep_model
    texts = [Example(text=t) for t in TEXTS]
    enc = model.encode(sst2_task, texts)
    k, n = 3, len(TEXTS)
    p = _prompts(model, k=k, shared_below=2, seed=3)
    _logits(model, sst2_task, enc, p, reuse=True)  # keeps the states entering layer 2
    q = _prompts(model, k=k, shared_below=3, seed=4)  # other prompts at layers 0 and 1 too
    reused, ran = _counted(model, lambda: _logits(model, sst2_task, enc, q, reuse=True))
    np.testing.assert_allclose(reused, _logits(model, sst2_task, enc, q, reuse=False), rtol=1e-4, atol=1e-4)
    assert ran[:3] == [n, n, n], f"{kind}: {ran}"  # computed from the input again
    # other inputs (another Encoded) with the same prompts do not take these inputs' states either
    other = model.encode(sst2_task, texts[::-1])
    reused, ran = _counted(model, lambda: _logits(model, sst2_task, other, q, reuse=True))
    np.testing.assert_allclose(reused, _logits(model, sst2_task, other, q, reuse=False), rtol=1e-4, atol=1e-4)
    assert ran[:3] == [n, n, n], f"{kind}: {ran}"
