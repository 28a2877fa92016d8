"""The vLLM adapter's pure parts: version gate and how vLLM's refusals are put to the user. (The
adapter against a real engine: tests/test_vllm.py.)"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from bbt.errors import ConfigError, RequestRejected  # noqa: E402
from servers.upstream import MIN_VLLM, _explained, _version_tuple  # noqa: E402


@pytest.mark.parametrize("version, ok", [("0.32.0", True), ("0.26.0", True), ("0.25.2", False), ("0.11.1rc2.dev3", False),
                                         ("1.0.0+cpu", True), ("nonsense", False)])
def test_version_gate(version, ok):
    assert (_version_tuple(version) >= MIN_VLLM) is ok


@pytest.mark.parametrize("message, expected", [
    # vLLM 0.32's own words for these refusals (vllm/renderers/embed_utils.py)
    ("You must set `--enable-prompt-embeds` to input `prompt_embeds`.", "start vLLM with --enable-prompt-embeds"),
    ("`prompt_embeds` hidden_size 576 does not match the model's hidden_size 960.", "another hidden size"),
])
def test_refusals_say_what_to_change(message, expected):
    err = _explained(RequestRejected(400, f"BadRequestError: {message}"), "http://127.0.0.1:8001")
    assert isinstance(err, ConfigError) and expected in str(err)


def test_other_refusals_keep_vllm_reason():
    exc = RequestRejected(400, "BadRequestError: token_id(s) [99999] in logprob_token_ids contain out-of-vocab token ids")
    assert _explained(exc, "http://x") is exc
