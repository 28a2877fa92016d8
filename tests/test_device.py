"""Where the model runs: --device for bbt serve and in-process runs, and what a bad one says.

CI has no GPU, so these tests check the choice and the errors; the CPU path itself is what every
other model test runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from bbt.errors import ConfigError
from bbt.protocol import EvaluateRequest, Example, PromptTensor, Tensor
from bbt.tasks import BUILTIN_TASKS
from test_cli import _assert_clean_error, bbt

torch = pytest.importorskip("torch")
NO_CUDA = not torch.cuda.is_available()


def test_auto_is_a_gpu_when_torch_sees_one_else_the_cpu():
    from servers.loading import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec, words", [
    ("gpu0", ["unknown device 'gpu0'", "cuda:N"]),
    ("meta", ["bbt runs models on cpu, cuda or mps"]),
    ("cuda:99", ["cuda:99"]),
])
def test_a_bad_device_is_a_config_error(spec, words):
    from servers.loading import resolve_device

    with pytest.raises(ConfigError) as err:
        resolve_device(spec)
    for word in words:
        assert word in str(err.value)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_says_what_to_do():
    from servers.loading import resolve_device

    with pytest.raises(ConfigError, match="sees no CUDA GPU; use --device cpu"):
        resolve_device("cuda")


def test_the_device_is_checked_before_any_model_loads(tmp_path):
    """A bad device fails at once, even with a model that does not exist."""
    from bbt.backends.local import LocalBackend

    with pytest.raises(ConfigError, match="unknown device"):
        LocalBackend([str(tmp_path / "no-model")], device="nosuch")


def test_a_model_runs_where_it_is_told_and_answers_the_same(tiny_encoder):
    """device='cpu' and 'auto' (the CPU here) load one copy each and score alike; logits come back on
    the CPU whatever the device, as the service turns them into numpy."""
    from servers.service import ModelService

    cpu = ModelService([f"m={tiny_encoder}"], device="cpu")
    again = ModelService([f"m={tiny_encoder}"], device="cpu")
    assert cpu.get("m") is again.get("m")  # one copy per model directory and device
    assert cpu.get("m").device == torch.device("cpu")
    prompts = np.random.default_rng(0).normal(size=(3, 1, 4, cpu.get("m").hidden_size)).astype(np.float32)
    req = EvaluateRequest(model="m", task=BUILTIN_TASKS["sst2"], inputs=[Example(text="a fine film"), Example(text="dull")],
                          labels=[1, 0], candidates=PromptTensor(prompts=Tensor.from_numpy(prompts)), return_logits=True)
    auto = ModelService([f"m={tiny_encoder}"], device="auto")
    a, b = cpu.evaluate(req), auto.evaluate(req)
    if NO_CUDA:
        assert a.losses == b.losses
    else:  # another device: the same function, up to float rounding
        np.testing.assert_allclose(a.logits.to_numpy(), b.logits.to_numpy(), atol=1e-3)


def test_serve_with_a_bad_device_fails_fast():
    out = bbt("serve", "--device", "nosuch", "--port", "0", timeout=60)
    _assert_clean_error(out, "unknown device 'nosuch'")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
def test_serve_on_cuda_without_a_gpu_fails_fast():
    out = bbt("serve", "--device", "cuda", "--port", "0", timeout=60)
    _assert_clean_error(out, "sees no CUDA GPU")


def test_device_with_an_endpoint_is_refused(data_dir, tmp_path):
    out = bbt("tune", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--endpoint", "http://127.0.0.1:9",
              "--device", "cpu")
    _assert_clean_error(out, "--device", "bbt serve --device")
    assert not (tmp_path / "r").exists()
