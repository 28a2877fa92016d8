"""Protocol v1: the one contract between the bbt client and a model server.

Every request and answer that crosses the client/model boundary is one of these pydantic
models, whether it travels as JSON over HTTP (`bbt.backends.http`) or as Python objects to an
in-process model (`bbt.backends.local`). Keeping both paths on the same objects is what makes an
HTTP run reproduce an in-process run bit for bit.

Tensors travel as compact binary: base64 of little-endian float32 or float16 with an explicit
shape (never pickle, never ``torch.load``). A population of K candidate prompts is either

- ``PromptTensor``: the prompts themselves, shape [K, layers, L, H], or
- ``IntrinsicPrompts``: the intrinsic vectors z, shape [K, layers, d], plus one projection spec
  per layer; the server rebuilds each A from its seed (about D/d = 40x less upload).

``layers`` is 1 for BBT (a prompt at the input embeddings) or the model's number of layers for
BBTv2 (entry 0 replaces the input embeddings at the prompt positions, entry l >= 1 is added to
the hidden states entering layer l).
"""

from __future__ import annotations

import base64
import math
import re
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PROTOCOL_VERSION = "1"

LossKind = Literal["ce", "hinge", "perf"]
DType = Literal["float32", "float16"]

_NP_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Tensor(_Model):
    """A dense array as base64 of little-endian bytes in C order."""

    dtype: DType = "float32"
    shape: list[Annotated[int, Field(ge=0)]]
    data: str = Field(description="base64 of the little-endian array bytes, C order")

    @model_validator(mode="after")
    def _size_matches_shape(self) -> Tensor:
        expected = math.prod(self.shape) * _NP_DTYPES[self.dtype].itemsize
        # base64 length is 4 * ceil(n / 3): check before decoding anything large.
        if len(self.data) != 4 * math.ceil(expected / 3):
            raise ValueError(
                f"data holds {len(self.data)} base64 characters, but shape {self.shape} of "
                f"{self.dtype} needs {4 * math.ceil(expected / 3)} ({expected} bytes)"
            )
        return self

    @classmethod
    def from_numpy(cls, array: np.ndarray, dtype: DType = "float32") -> Tensor:
        arr = np.ascontiguousarray(array, dtype=_NP_DTYPES[dtype])
        return cls(dtype=dtype, shape=list(arr.shape), data=base64.b64encode(arr.tobytes()).decode())

    def to_numpy(self) -> np.ndarray:
        """Decode to a float32 array (float16 payloads are widened)."""
        try:
            raw = base64.b64decode(self.data, validate=True)
        except ValueError as exc:
            raise ValueError(f"data is not valid base64: {exc}") from exc
        arr = np.frombuffer(raw, dtype=_NP_DTYPES[self.dtype]).reshape(self.shape)
        return arr.astype(np.float32)


class ProjectionSpec(_Model):
    """Everything needed to regenerate a random projection A (D x d) exactly."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # hashable: a cache key for A

    kind: Literal["uniform", "normal"] = Field(
        description="uniform: U(-scale, scale), PyTorch Linear's default init when scale = 1/sqrt(d); "
        "normal: N(0, scale^2)"
    )
    seed: int = Field(ge=0, description="seed of numpy's PCG64 generator that draws A")
    d: int = Field(ge=1, description="intrinsic dimension (columns of A)")
    D: int = Field(ge=1, description="prompt dimension L * H (rows of A)")
    scale: float = Field(gt=0, description="uniform: half-width; normal: standard deviation")

    @field_validator("scale")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("scale must be finite")
        return v


class _Candidates(_Model):
    init_seed: int | None = Field(
        default=None, ge=0, lt=2**32,
        description="p0 of the input prompt: the input embeddings of L ordinary vocabulary tokens that the server "
        "draws with this seed (BBT's initialisation), added to every candidate; none: p0 = 0",
    )
    init_text: str | None = Field(
        default=None, min_length=1, max_length=20_000,
        description="p0 of the input prompt: the input embeddings of this text's tokens (an instruction, or "
        "demonstrations): its last L tokens, the text repeated as often as it takes to fill L; none: see init_seed",
    )
    layer: int | None = Field(
        default=None, ge=0,
        description="BBTv2: the lowest prompted layer in which the candidates differ (the layer this generation "
        "tunes); below it every candidate carries the same prompts, so the server runs those layers once per "
        "example instead of once per candidate. The server checks it; absent: the server compares the prompts",
    )


    @model_validator(mode="after")
    def _one_p0(self) -> _Candidates:
        if self.init_seed is not None and self.init_text is not None:
            raise ValueError("give init_seed or init_text, not both: p0 is vocabulary tokens or a text")
        return self


class PromptTensor(_Candidates):
    """Candidate prompts sent as they are, shape [K, layers, L, H] (plus p0 where init_seed or init_text is set)."""

    type: Literal["prompts"] = "prompts"
    prompts: Tensor


class IntrinsicPrompts(_Candidates):
    """Candidates as intrinsic vectors z [K, layers, d]; the server computes p_l = A_l z_l (+ p0 at the input)."""

    type: Literal["intrinsic"] = "intrinsic"
    z: Tensor = Field(description="shape [K, layers, d]")
    projections: list[ProjectionSpec] = Field(min_length=1, description="one spec per prompted layer")
    prompt_length: int = Field(ge=1, description="L, the number of prompt tokens")


Candidates = Annotated[PromptTensor | IntrinsicPrompts, Field(discriminator="type")]


MAX_LABELS = 1000
MAX_WORDS_PER_LABEL = 32


def words_of(entry: str | list[str]) -> list[str]:
    """The words of one verbalizer or label-text entry (a single word or a list of them)."""
    return [entry] if isinstance(entry, str) else list(entry)


class TaskSpec(_Model):
    """How a model turns an input into class scores: template, verbalizer, label texts."""

    name: str = Field(min_length=1, max_length=100)
    labels: list[str] = Field(
        min_length=2, max_length=MAX_LABELS,
        description="label names, index order (many labels: e.g. every candidate word of a verbalizer search)",
    )
    template: str = Field(
        default="{text} . It was {mask} .",
        max_length=1000,
        description="input pattern with {text}, optionally {text_pair}, and {mask} where the "
        "verbalizer word goes (masked LMs: the mask token; causal LMs: the text before {mask})",
    )
    verbalizer: list[str | list[str]] = Field(
        description="per label a word scored at {mask}, or several words (class score: the mean of theirs)"
    )
    label_texts: list[str | list[str]] = Field(
        description="per label a description for sentence encoders, or several (class score: the mean cosine)"
    )
    pair: bool = False
    metric: Literal["acc", "f1"] = "acc"

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        n = len(self.labels)
        for field in ("verbalizer", "label_texts"):
            entries = getattr(self, field)
            if len(entries) != n:
                raise ValueError(f"{field} has {len(entries)} entries, labels has {n}")
            for i, entry in enumerate(entries):
                if isinstance(entry, list) and not 1 <= len(entry) <= MAX_WORDS_PER_LABEL:
                    raise ValueError(f"{field}[{i}] has {len(entry)} words; give 1 to {MAX_WORDS_PER_LABEL}")
                if any(not w.strip() for w in words_of(entry)):
                    raise ValueError(f"{field}[{i}] holds an empty word")
        if "{text}" not in self.template or "{mask}" not in self.template:
            raise ValueError(f"template must contain {{text}} and {{mask}}: {self.template!r}")
        # templates are filled with str.format: any other field ('{x}', '{text.__class__}',
        # '{text:>999999999}', a stray '}') would fail, leak attributes or allocate without bound
        rest = re.sub(r"\{(?:text|text_pair|mask)\}", "", self.template)
        if "{" in rest or "}" in rest:
            raise ValueError(f"template {self.template[:200]!r}: braces are only allowed in {{text}}, {{text_pair}} "
                             "and {mask}")
        if self.pair and "{text_pair}" not in self.template:
            raise ValueError("a pair task's template must contain {text_pair}")
        if self.metric == "f1" and n != 2:
            raise ValueError("metric f1 is for two-class tasks")
        return self


class Example(_Model):
    text: str
    text_pair: str | None = None


class Usage(_Model):
    """What a request spent. queries = candidates scored (K); examples = K * N."""

    queries: int = 0
    requests: int = 0
    examples: int = 0
    tokens: int = 0


class EvaluateRequest(_Model):
    """Score K candidate prompts (or none: the zero-prompt model) on N inputs."""

    model: str
    task: TaskSpec
    inputs: list[Example] = Field(min_length=1)
    labels: list[int] | None = Field(default=None, description="needed for losses")
    loss: LossKind = "ce"
    return_logits: bool = False
    return_prompts: bool = Field(
        default=False, description="also return the prompts as the model received them: [K, layers, L, H], p0 added"
    )
    candidates: Candidates | None = Field(
        default=None, description="absent: the frozen model with the template and no soft prompt (K=1)"
    )
    top_words: int = Field(
        default=0, ge=0, le=1000,
        description="masked and causal LMs, one candidate (K=1): also return, per input, this many vocabulary "
        "words most likely at {mask} with their log-probabilities (what an automatic verbalizer is chosen from)",
    )

    @model_validator(mode="after")
    def _labels_fit(self) -> EvaluateRequest:
        if self.labels is not None:
            if len(self.labels) != len(self.inputs):
                raise ValueError(f"{len(self.labels)} labels for {len(self.inputs)} inputs")
            bad = [y for y in self.labels if not 0 <= y < len(self.task.labels)]
            if bad:
                raise ValueError(f"labels {bad[:5]} outside 0..{len(self.task.labels) - 1}")
        if self.labels is None and not (self.return_logits or self.return_prompts):
            raise ValueError("nothing to return: give labels (for losses), or set return_logits or return_prompts")
        return self


class EvaluateResponse(_Model):
    model: str
    losses: list[float] | None = Field(default=None, description="one per candidate")
    logits: Tensor | None = Field(default=None, description="class scores, shape [K, N, C]")
    prompts: Tensor | None = Field(default=None, description="with return_prompts: shape [K, layers, L, H]")
    words: list[list[tuple[str, float]]] | None = Field(
        default=None, description="with top_words: per input, (word, log-probability) pairs, most likely first; "
        "each word spelt as a verbalizer entry (it maps back to that one token)",
    )
    usage: Usage


class StatsRequest(_Model):
    """Token counts and hidden-state statistics of a task's inputs (no prompt)."""

    model: str
    task: TaskSpec
    inputs: list[Example] = Field(min_length=1)


class StatsResponse(_Model):
    model: str
    tokens: list[int] = Field(description="tokens per input with the template, prompt excluded")
    hidden_std: list[float] = Field(description="std of the hidden states entering each layer")
    usage: Usage


class ModelInfo(_Model):
    name: str
    family: Literal["encoder", "masked", "causal"]
    hidden_size: int
    num_layers: int
    max_prompt_tokens: int
    max_input_tokens: int
    embedding_std: float = Field(description="std of the word embedding table")
    hidden_std: list[float] = Field(description="std of the hidden states entering each layer, on sample text")
    modes: list[str] = Field(description="'bbt' (input prompt) and/or 'bbtv2' (deep prompt)")
    prompt_placement: Literal["after_leading_special_tokens"] = Field(
        default="after_leading_special_tokens",
        description="where the L prompt vectors sit: right after the special tokens the tokenizer puts before the "
        "text ([CLS], <s>, BOS), before the first text token; prompt entry l >= 1 is added to the hidden states "
        "entering layer l at those positions",
    )
    prompt_position: int = Field(
        default=0, ge=0, description="index of the first prompt vector: the number of leading special tokens "
        "(0 for a tokenizer that adds none, as SmolLM2's: then the prompt comes first, as PEFT places it)",
    )
    engine: str = Field(
        default="bbt", description="what runs the layers: 'bbt' (this server's own engine), or the engine a bbt server "
        "relays to or a client talks to, e.g. 'vllm 0.32.0' (prompt embeddings: input prompts only, modes ['bbt'])",
    )
    dtype: Literal["float32", "bfloat16"] | None = Field(
        default="float32", description="the precision the layers run in (bbt serve --dtype): float32, or bfloat16 "
        "with norms, softmax and read-out in float32; null where an upstream engine runs them in its own",
    )


class ModelList(_Model):
    models: list[ModelInfo]


class KeyUsage(_Model):
    """GET /v1/usage: what the caller's API key has spent of its quota (bbt serve --quota)."""

    queries_used: int = Field(description="queries charged to this key in its current quota window")
    quota: int | None = Field(description="queries per window; null: no quota")
    window_seconds: float = Field(description="length of a quota window")
    resets_in: float | None = Field(description="seconds until the current window ends; null: no window open")


class Health(_Model):
    status: Literal["ok"] = "ok"
    protocol: str = PROTOCOL_VERSION
    models: list[str]


class ErrorBody(_Model):
    """The JSON body of every 4xx/5xx answer."""

    error: str = Field(description="a short machine-readable kind, e.g. 'invalid_request'")
    detail: str = Field(description="what was wrong and how to mend it")
