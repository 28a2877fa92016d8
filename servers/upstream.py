"""Scoring on an engine that takes soft prompts as prompt embeddings: vLLM's OpenAI-compatible API.

Both ways bbt reaches vLLM go through this module:

- `bbt tune --endpoint URL` against vLLM: `bbt.backends.vllm.VLLMBackend` runs a `ModelService`
  on an `UpstreamModel` in the client's own process;
- `bbt serve --upstream URL`: the bundled server does the same next to the engine, so a
  torch-free client sends z and projection seeds (a few kB a query) instead of embeddings, and
  keeps API keys, quotas and idempotent replays.

The model is split in two. The tokenizer and the input-embedding table (from a local folder or
a package bbt knows: `smollm2`) stay here; the layers run on the engine. Each (candidate, input)
pair becomes one `prompt_embeds` tensor [L + T, H]: the input's token embeddings with the L prompt
vectors after the leading special tokens, where bbt's own engine puts them. vLLM answers the
log-probability of every verbalizer token at the next position (`logprob_token_ids`), and class
scores are built from those as bbt's engine builds them from logits. A log-probability is the
logit minus one number per input (the log of the softmax's normaliser), so every loss, accuracy,
ranking and word choice bbt makes comes out the same.

Prompt embeddings reach the input layer only: deep prompts (BBTv2) cannot be expressed, and
`ModelInfo.modes` says so before anything is spent.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from bbt.backends.http import FIRST_CONTACT_WAIT, HTTPBackend
from bbt.errors import ConfigError, ModelNotFound, RequestRejected
from bbt.protocol import ModelInfo, TaskSpec
from servers import calibration
from servers.engine import PromptModel
from servers.families import CausalFamily, Encoded, class_scores

log = logging.getLogger(__name__)

MIN_VLLM = (0, 26)  # older versions decode prompt embeddings unsafely (CVE-2025-62164 and later)
MAX_IDS = 128  # vLLM's cap on logprob_token_ids per request
TOP_TOKENS = 1000  # tokens asked for when reading the likeliest words (the engine's --max-logprobs caps it)
ROWS_PER_REQUEST = 32  # prompt_embeds per request: about 4 MB on SmolLM2 SST-2 inputs (experiments/bench_vllm.py)
IN_FLIGHT = 4  # requests sent at once: the engine batches them, and encoding the next overlaps a pass
CHECK_TOLERANCE = 0.05  # log-probability gap between a sentence as embeddings and as tokens that still matches
_CHECK_TEXT = "The weather was lovely, so we walked to the old harbour and ate fish by the water."


# ---- vLLM's wire format: what bbt reads of it ---------------------------------------------------

class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class _Logprobs(_Lenient):
    top_logprobs: list[dict[str, float] | None] = []


class _Choice(_Lenient):
    index: int
    logprobs: _Logprobs | None = None


class _CompletionUsage(_Lenient):
    prompt_tokens: int = 0


class Completion(_Lenient):
    """A /v1/completions answer: one choice per prompt, in the order sent (by `index`)."""

    choices: list[_Choice]
    usage: _CompletionUsage


class _Card(_Lenient):
    id: str
    owned_by: str | None = None
    max_model_len: int | None = None


class ModelCards(_Lenient):
    data: list[_Card]


class Version(_Lenient):
    version: str


class Tokenized(_Lenient):
    tokens: list[int]


# ---- the engine -----------------------------------------------------------------------------------

class VLLMEngine:
    """One vLLM server: checks it once, then scores rows of prompt embeddings.

    Args:
        url: the server's base URL ('http://host:8001').
        api_key: sent as a bearer token (vLLM's --api-key); None: none.
        timeout, wait, retries, first_contact_wait: as `bbt.backends.http.HTTPBackend` (its retries
            and errors are used).
        rows_per_request: prompt_embeds per /v1/completions request.
        in_flight: requests sent at once.
    """

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 600.0, wait: float = 300.0,
                 retries: int | None = None, first_contact_wait: float | None = FIRST_CONTACT_WAIT,
                 rows_per_request: int = ROWS_PER_REQUEST, in_flight: int = IN_FLIGHT):
        self.http = HTTPBackend(url, api_key=api_key or "", timeout=timeout, wait=wait, retries=retries,
                                first_contact_wait=first_contact_wait)
        self.url = self.http.endpoints[0]
        self.rows_per_request, self.in_flight = rows_per_request, in_flight
        self.version = self.http.call(0, "GET", "/version", None, Version).version
        if _version_tuple(self.version) < MIN_VLLM:
            raise ConfigError(f"{self.url} runs vLLM {self.version}; bbt needs {'.'.join(map(str, MIN_VLLM))} or newer: "
                              "older versions decode prompt embeddings unsafely (CVE-2025-62164). Upgrade the engine")
        self.cards = {c.id: c for c in self.http.call(0, "GET", "/v1/models", None, ModelCards).data}
        self.top_tokens = TOP_TOKENS  # lowered to the engine's --max-logprobs when it refuses more
        self._pool = ThreadPoolExecutor(in_flight, thread_name_prefix="bbt-vllm")

    @property
    def name(self) -> str:
        return f"vllm {self.version}"

    def close(self) -> None:
        self.http.close()
        self._pool.shutdown(wait=False)

    # ---- scoring ------------------------------------------------------------------------------
    def logprobs(self, model: str, payloads: list, token_ids: list[int], *,
                 key: str = "prompt_embeds") -> tuple[np.ndarray, int]:
        """Log-probabilities [B, W] of `token_ids` as the next token after each input, and the
        prompt tokens the engine reported. Inputs are `serialize`d rows of embeddings (`key`
        'prompt_embeds') or lists of token ids (`key` 'prompt'). More than 128 ids take one pass
        per 128 (each billed by the engine)."""
        unique = list(dict.fromkeys(token_ids))
        columns: dict[int, np.ndarray] = {}
        tokens = 0
        for start in range(0, len(unique), MAX_IDS):
            ids = unique[start : start + MAX_IDS]
            answers, billed = self._complete(model, key, payloads, {"logprobs": len(ids), "logprob_token_ids": ids})
            tokens += billed
            for t in ids:
                try:
                    columns[t] = np.array([a[f"token_id:{t}"] for a in answers], dtype=np.float64)
                except KeyError:
                    raise ConfigError(f"{self.url} answered without the log-probability of token {t}: is it vLLM with "
                                      "logprob_token_ids (0.26 or newer)?") from None
        return np.stack([columns[t] for t in token_ids], axis=1), tokens

    def top(self, model: str, payloads: list[str]) -> tuple[list[list[tuple[int, float]]], int]:
        """Per `serialize`d row, the engine's likeliest next tokens (up to `top_tokens`: its
        --max-logprobs) as (token id, log-probability), likeliest first; and the prompt tokens it
        reported."""
        try:
            answers, billed = self._complete(model, "prompt_embeds", payloads, {"logprobs": self.top_tokens})
        except RequestRejected as exc:
            allowed = re.search(r"max allowed: (\d+)", str(exc))
            if exc.status != 400 or allowed is None or int(allowed.group(1)) >= self.top_tokens:
                raise
            self.top_tokens = int(allowed.group(1))
            log.warning("%s returns at most %d log-probabilities per token (--max-logprobs); the likeliest words "
                        "are drawn from that many tokens", self.url, self.top_tokens)
            answers, billed = self._complete(model, "prompt_embeds", payloads, {"logprobs": self.top_tokens})
        out = []
        for a in answers:
            pairs = [(int(k.removeprefix("token_id:")), v) for k, v in a.items()]
            out.append(sorted(pairs, key=lambda p: -p[1]))
        return out, billed

    def _complete(self, model: str, key: str, inputs: list, extra: dict) -> tuple[list[dict[str, float]], int]:
        """The first-position top_logprobs of every input, in order, over as many requests as it
        takes (`in_flight` at once); and the prompt tokens reported."""
        parts = [inputs[i : i + self.rows_per_request] for i in range(0, len(inputs), self.rows_per_request)]

        def send(part: list) -> Completion:
            body = {"model": model, key: part, "max_tokens": 1, "temperature": 0, "return_tokens_as_token_ids": True,
                    **extra}
            try:
                answer = self.http.call(0, "POST", "/v1/completions", json.dumps(body), Completion)
            except RequestRejected as exc:
                raise _explained(exc, self.url) from None
            if len(answer.choices) != len(part):
                raise ConfigError(f"{self.url} answered {len(answer.choices)} choices for {len(part)} prompts")
            return answer

        answers = list(self._pool.map(send, parts)) if len(parts) > 1 else [send(parts[0])]
        out: list[dict[str, float]] = []
        for answer in answers:
            for choice in sorted(answer.choices, key=lambda c: c.index):
                lp = choice.logprobs.top_logprobs[0] if choice.logprobs and choice.logprobs.top_logprobs else None
                out.append(lp or {})
        return out, sum(a.usage.prompt_tokens for a in answers)

    # ---- the check before any paid query ---------------------------------------------------------
    def require(self, model: str) -> None:
        """ModelNotFound unless the engine serves `model`."""
        if model not in self.cards:
            raise ModelNotFound(f"{self.url} (vLLM {self.version}) serves {', '.join(self.cards) or 'no model'}, not "
                                f"{model!r}: pass --model with the name it serves (vLLM's --served-model-name)")

    def check(self, model: str, tokenizer, embeddings: torch.Tensor, source: Path) -> float:
        """That `model` is served here, with the vocabulary of `tokenizer` and the input embeddings
        `embeddings` [V, H] (two one-sentence passes, not queries). Returns the largest gap of
        log-probabilities between the sentence sent as embeddings and as token ids."""
        self.require(model)
        ids = tokenizer(_CHECK_TEXT, add_special_tokens=False).input_ids
        body = json.dumps({"model": model, "prompt": _CHECK_TEXT, "add_special_tokens": False})
        theirs = self.http.call(0, "POST", "/tokenize", body, Tokenized).tokens
        if theirs != ids:
            raise ConfigError(f"{model!r} on {self.url} tokenizes text differently from the tokenizer in {source}: "
                              "pass --model-files with the served model's own folder")
        probe = sorted(set(ids))[:8]
        as_embeds, _ = self.logprobs(model, [serialize(embeddings[ids])], probe)
        as_tokens, _ = self.logprobs(model, [ids], probe, key="prompt")
        gap = float(np.max(np.abs(as_embeds - as_tokens)))
        if gap > CHECK_TOLERANCE:
            raise ConfigError(f"the input embeddings from {source} are not those of {model!r} on {self.url}: one sentence "
                              f"sent as embeddings and as tokens gives log-probabilities {gap:.3g} apart; pass "
                              "--model-files with the served model's own folder")
        return gap


def _version_tuple(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def serialize(row: torch.Tensor) -> str:
    """base64 of a `torch.save`d float32 tensor [T, H], the form vLLM's prompt_embeds takes (a clone:
    a view would carry its whole storage)."""
    buf = io.BytesIO()
    torch.save(row.detach().to(torch.float32).contiguous().clone(), buf)
    return base64.b64encode(buf.getvalue()).decode()


def _explained(exc: RequestRejected, url: str) -> Exception:
    """A refused request in words that say what to change."""
    text = str(exc)
    if "enable-prompt-embeds" in text:
        return ConfigError(f"{url} does not take prompt embeddings: start vLLM with --enable-prompt-embeds "
                           "(python -m servers.vllm_launch does)")
    if "hidden_size" in text:
        return ConfigError(f"{url} serves a model of another hidden size than the embeddings bbt has ({text}); pass "
                           "--model-files with the served model's own folder")
    if exc.status == 413:
        return ConfigError(f"{url} refused a request as too large ({text}); lower rows_per_request")
    return exc


# ---- the model: tokenizer and embeddings here, layers there ---------------------------------------

class UpstreamModel:
    """What `ModelService` needs of a model, with its layers on a vLLM engine (input prompts only)."""

    def __init__(self, name: str, path: Path, tokenizer, embeddings: torch.Tensor, num_layers: int,
                 max_positions: int, engine: VLLMEngine):
        self.name, self.path, self.tokenizer, self.engine = name, path, tokenizer, engine
        self.device = torch.device("cpu")
        self.word_embeddings = torch.nn.Embedding.from_pretrained(embeddings, freeze=True)
        self.hidden_size, self.num_layers = int(embeddings.shape[1]), num_layers
        served = engine.cards[name].max_model_len if name in engine.cards else None
        # bbt's engine's limits, within what the engine was started with
        self.max_prompt_tokens, self.max_input_tokens = calibration.prompt_limits(min(max_positions,
                                                                                      served or max_positions))
        self.family = CausalFamily(tokenizer, self.word_embeddings, self.max_input_tokens)
        self.prompt_at = self.family.prompt_at
        self.lock = threading.Lock()
        self.reported_tokens: int | None = None  # prompt tokens the engine reported for the last pass
        self._init_cache: dict = {}
        self._info: ModelInfo | None = None
        self.check_gap = engine.check(name, tokenizer, embeddings, path)

    # p0 is made from the tokenizer and the embedding table, as on bbt's own engine
    init_prompt = PromptModel.init_prompt
    encode = PromptModel.encode
    tensor = PromptModel.tensor

    def hidden_std(self, enc: Encoded) -> list[float]:
        """The spread of the input embeddings of the tokens (what a BBT prompt replaces); the
        layers above are the engine's and report none."""
        with torch.inference_mode():
            return [calibration.clipped_std(self.word_embeddings(self.tensor([t for ids in enc.ids for t in ids])))]

    def info(self) -> ModelInfo:
        if self._info is None:
            self._info = calibration.model_info(self, modes=("bbt",), engine=self.engine.name)
        return self._info

    def rows(self, enc: Encoded, prompts: torch.Tensor | None) -> list[torch.Tensor]:
        """Candidate-major rows of embeddings [T_i (+ L), H]: row k * N + i is input i under prompt k."""
        if prompts is not None and prompts.shape[1] != 1:
            raise ConfigError(f"{self.engine.name} takes soft prompts as prompt embeddings, which reach the input layer "
                              "only: a prompt at every layer (BBTv2) cannot be sent; use --method bbt")
        a = self.prompt_at
        with torch.inference_mode():
            embedded = [self.word_embeddings(self.tensor(ids)) for ids in enc.ids]
            if prompts is None:
                return embedded
            return [torch.cat([e[:a], p, e[a:]]) for p in prompts[:, 0].float() for e in embedded]

    def payloads(self, enc: Encoded, prompts: torch.Tensor | None) -> list[str]:
        """`rows`, serialized for the engine (about 4 bytes x T x H each)."""
        return [serialize(r) for r in self.rows(enc, prompts)]

    def logits(self, task: TaskSpec, enc: Encoded, prompts: torch.Tensor | None, layer: int | None = None,
               *, vocabulary: bool = False, payloads: list[str] | None = None) -> torch.Tensor:
        """Class scores [K, N, C] from the engine's log-probabilities of the verbalizer tokens."""
        if vocabulary:
            raise ConfigError("the engine answers log-probabilities of listed tokens, not the vocabulary: use top_words")
        ids, classes = self.family.verbalizer_ids(task)
        k = 1 if prompts is None else prompts.shape[0]
        words, self.reported_tokens = self.engine.logprobs(self.name, payloads or self.payloads(enc, prompts), ids)
        return class_scores(torch.from_numpy(words).float(), classes, len(task.labels)).reshape(k, len(enc.ids), -1)

    def top_words(self, task: TaskSpec, enc: Encoded, prompts: torch.Tensor | None, layer: int | None,
                  n: int) -> tuple[np.ndarray, list]:
        """Class scores [1, N, C] and each input's `n` likeliest words, read from the engine's
        likeliest tokens (its --max-logprobs of them; 1000 from `servers.vllm_launch`)."""
        payloads = self.payloads(enc, prompts)
        logits = self.logits(task, enc, prompts, payloads=payloads).numpy()
        billed = self.reported_tokens or 0
        top, more = self.engine.top(self.name, payloads)
        self.reported_tokens = billed + more
        word_ids, names = self.family.word_tokens(task)
        spelt = dict(zip(word_ids.tolist(), names))
        words = [[(spelt[t], round(lp, 6)) for t, lp in row if t in spelt][:n] for row in top]
        return logits, words


def load(name: str, path: str, engine: VLLMEngine) -> UpstreamModel:
    """The model `name` served by `engine`, with the tokenizer and input embeddings of `path` (a
    folder, a .gguf file, or a name bbt knows such as smollm2), checked against the engine."""
    from transformers import AutoConfig, AutoTokenizer

    from servers.loading import detect_family, gguf_folder, resolve_model_path

    engine.require(name)  # before reading any files: the name may simply be wrong
    where = resolve_model_path(path)
    if detect_family(where) != "causal":
        raise ConfigError(f"{path} is not a causal LM: vLLM's prompt embeddings are read by a causal LM's next token")
    folder = gguf_folder(where) if where.suffix == ".gguf" else where
    if folder is None:
        raise ConfigError("reading a GGUF model's embeddings needs the model cache: unset BBT_MODEL_CACHE=off")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"cannot read the tokenizer and config in {folder}: {exc}") from exc
    embeddings = _embedding_table(folder, config)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 1024)
    model = UpstreamModel(name, where, tokenizer, embeddings, config.num_hidden_layers, max_pos, engine)
    log.info("%s: tokenizer and input embeddings from %s match %s (gap %.2g)", name, folder, engine.url, model.check_gap)
    return model


_EMBEDDING_KEYS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def _embedding_table(folder: Path, config) -> torch.Tensor:
    """The input-embedding matrix [V, H] in float32, read alone from the folder's safetensors files."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    tied = getattr(config, "tie_word_embeddings", False)
    fallback = None
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if key.endswith(_EMBEDDING_KEYS):
                    return f.get_tensor(key).float()
                if tied and key == "lm_head.weight":
                    fallback = (file, key)
    if fallback is not None:
        with safe_open(str(fallback[0]), framework="pt") as f:
            return f.get_tensor(fallback[1]).float()
    raise ModelNotFound(f"no input-embedding matrix found in the safetensors files of {folder} "
                        f"({', '.join(f.name for f in files) or 'none'})")
