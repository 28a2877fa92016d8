"""torch.compile of the layers' dense blocks (bbt serve --compile): the same scores, and a clear error
where torch cannot compile."""

from __future__ import annotations

import numpy as np
import pytest

from bbt.errors import ConfigError
from bbt.protocol import EvaluateRequest, Example, PromptTensor, Tensor
from bbt.tasks import BUILTIN_TASKS

torch = pytest.importorskip("torch")

TEXTS = ["a fine and moving film", "dull", "the plot goes nowhere at all , sadly", "great fun"]


def _request(hidden: int, length: int = 3, k: int = 3) -> EvaluateRequest:
    prompts = np.random.default_rng(0).normal(scale=0.5, size=(k, 1, length, hidden)).astype(np.float32)
    return EvaluateRequest(model="m", task=BUILTIN_TASKS["sst2"], inputs=[Example(text=t) for t in TEXTS],
                           labels=[1, 0, 0, 1], candidates=PromptTensor(prompts=Tensor.from_numpy(prompts)),
                           return_logits=True)


@pytest.mark.parametrize("fixture", ["tiny_bert_mlm", "tiny_gpt2"])
def test_compiled_blocks_score_like_eager_ones(fixture, request):
    """A masked LM (its top layer runs at the mask only) and a causal LM (GPT-2's mlp blocks)."""
    from servers.service import ModelService

    path = request.getfixturevalue(fixture)
    eager = ModelService([f"m={path}"], device="cpu")
    fast = ModelService([f"m={path}"], device="cpu", compile=True)
    model = fast.get("m")
    assert model is not eager.get("m") and model.compiled and not eager.get("m").compiled
    assert model._blocks
    assert all(type(getattr(owner, attr)).__name__ == "OptimizedModule" for owner, attr, _ in model._blocks)
    req = _request(model.hidden_size)
    want, got = eager.evaluate(req), fast.evaluate(req)
    np.testing.assert_allclose(got.logits.to_numpy(), want.logits.to_numpy(), rtol=1e-4, atol=1e-5)
    assert np.ptp(want.losses) > 1e-4  # the candidates differ, so equal scores are not an accident

    model.compile(False)  # back to eager: the original modules, the same scores
    try:
        assert not model.compiled
        assert all(getattr(owner, attr) is block for owner, attr, block in model._blocks)
        np.testing.assert_allclose(fast.evaluate(req).logits.to_numpy(), want.logits.to_numpy(), rtol=1e-5, atol=1e-6)
    finally:
        model.compile()  # the shared copy stays as the service that loaded it asked


def test_a_machine_that_cannot_compile_gets_a_clear_error(tiny_encoder, monkeypatch):
    """Inductor fails on the first call (no C++ compiler, say): a ConfigError at load time, and the
    model is left in eager mode, still scoring."""
    from servers.engine import load_model
    from servers.service import ModelService

    class Broken(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    model = load_model(str(tiny_encoder), name="m", device="cpu")
    req = _request(model.hidden_size)
    service = ModelService([], device="cpu")
    service._models["m"] = model
    before = service.evaluate(req).losses
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: Broken())
    with pytest.raises(ConfigError, match="torch.compile does not work for m here .*InvalidCxxCompiler.*C\\+\\+ compiler"):
        model.compile()
    assert not model.compiled
    assert all(getattr(owner, attr) is block for owner, attr, block in model._blocks)
    assert service.evaluate(req).losses == before


def test_two_models_first_loaded_under_one_name_keep_their_own_encodings(tiny_bert_mlm, tiny_gpt2):
    """A model directory is loaded once per process under the first name asked for; a service that
    serves two such copies must not share their tokenized inputs (found through this file's tests:
    BERT token ids reached GPT-2)."""
    from servers.service import ModelService

    ModelService([f"m={tiny_bert_mlm}"], device="cpu"), ModelService([f"m={tiny_gpt2}"], device="cpu")
    both = ModelService([f"bert={tiny_bert_mlm}", f"gpt={tiny_gpt2}"], device="cpu")
    for name in ("bert", "gpt"):
        model = both.get(name)
        req = _request(model.hidden_size).model_copy(update={"model": name})
        assert len(both.evaluate(req).losses) == 3
