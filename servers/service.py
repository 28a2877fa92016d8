"""Answers protocol requests with loaded models: validation, prompt building, scoring, usage.

Both the in-process backend and the HTTP app call `ModelService`, so a request gets the same
answer, bit for bit, whichever way it arrives. Every problem with a request raises a bbt error
(`ConfigError` for a bad request, `ModelNotFound` for an unknown model) whose message says what to
mend; nothing here unpickles or `torch.load`s request data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict

import numpy as np
import torch
from pydantic import BaseModel, Field

from bbt import metrics
from bbt.config import DEFAULT_MODEL
from bbt.errors import ConfigError, ModelNotFound
from bbt.projection import project
from bbt.protocol import (
    EvaluateRequest,
    EvaluateResponse,
    IntrinsicPrompts,
    PromptTensor,
    StatsRequest,
    StatsResponse,
    Tensor,
    Usage,
)
from servers import precision
from servers.engine import PromptModel, as_tensor, load_model
from servers.families import Encoded
from servers.loading import resolve_device

log = logging.getLogger(__name__)


class Limits(BaseModel):
    """What one request may ask for. Larger requests get a 413/422 that names the limit."""

    max_candidates: int = Field(default=256, ge=1, description="K, candidates per request")
    max_examples: int = Field(default=10000, ge=1, description="N, inputs per request")
    max_text_chars: int = Field(default=20000, ge=1, description="characters per text field")
    max_intrinsic_dim: int = Field(default=10000, ge=1, description="d of intrinsic vectors")
    max_body_bytes: int = Field(default=64 * 2**20, ge=1024, description="bytes of a request body")


class ModelService:
    """The models a process serves, by name, and the one `evaluate` every path goes through.

    Args:
        models: specs 'NAME=PATH', 'PATH' or 'minilm' loaded up front; with `lazy`, other names
            are loaded on first use (the in-process backend), otherwise they are unknown (a server).
        device: where the models run: 'auto' (a GPU if torch sees one, else the CPU), 'cpu',
            'cuda', 'cuda:N' or 'mps'.
        compile: run the models' layer blocks through torch.compile (`PromptModel.compile`):
            slightly faster passes after a compile of up to a minute at load time.
        dtype: the precision the models run in: 'float32', 'bfloat16' (norms, softmax and
            read-out stay float32) or 'auto' (bfloat16 where this hardware multiplies it faster:
            `servers/precision.py`).
    """

    def __init__(self, models: list[str], *, limits: Limits | None = None, lazy: bool = True,
                 device: str = "auto", compile: bool = False, upstream=None, dtype: str = "float32"):
        self.limits = limits or Limits()
        self.upstream = upstream  # a servers.upstream.VLLMEngine that runs the layers; None: run them here
        self.compile = compile
        self.lazy = lazy
        self.device = str(resolve_device(device))  # a bad device or dtype fails here, before any model loads
        precision.resolve(dtype, torch.device(self.device))  # a bad dtype fails here too
        self.dtype = dtype  # auto is resolved per model, by its family (`precision.resolve`)
        self._models: dict[str, PromptModel] = {}
        self._lock = threading.Lock()  # guards the encodings cache; each model has its own lock for passes
        self._encodings: OrderedDict[str, Encoded] = OrderedDict()
        for spec in models:
            self.add(spec)

    def add(self, spec: str) -> PromptModel:
        name, _, path = spec.partition("=") if "=" in spec else (spec, "", spec)
        if self.upstream is not None:
            from servers import upstream

            model = upstream.load(name, path, self.upstream)
        else:
            model = _shared_model(path, name, self.device, self.compile, self.dtype)
        self._models[name] = model
        return model

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str) -> PromptModel:
        if name not in self._models:
            if not self.lazy:
                raise ModelNotFound(f"model {name!r} is not served here; models: {', '.join(self._models) or 'none'}")
            return self.add(name)
        return self._models[name]

    # ---- requests -------------------------------------------------------------------------
    def stats(self, req: StatsRequest) -> StatsResponse:
        model = self.get(req.model)
        self._check_inputs(req.inputs)
        enc = self._encode(model, req)
        with model.lock:
            std = model.hidden_std(enc)
        return StatsResponse(
            model=req.model,
            tokens=enc.tokens,
            hidden_std=std,
            usage=Usage(requests=1, examples=len(enc.tokens), tokens=sum(enc.tokens)),
        )

    def evaluate(self, req: EvaluateRequest) -> EvaluateResponse:
        model = self.get(req.model)
        self._check_inputs(req.inputs)
        prompts = self._prompts(model, req)  # (K, layers, L, H) or None
        k = 1 if prompts is None else prompts.shape[0]
        length = 0 if prompts is None else prompts.shape[2]
        enc = self._encode(model, req)
        layer = None if req.candidates is None else req.candidates.layer
        words = None
        if req.top_words:
            if k != 1:
                raise ConfigError(f"top_words reads the vocabulary for one candidate; this request has K = {k}")
            model.family.verbalizer_ids(req.task)  # a bad verbalizer fails before the pass
        tensor = None if prompts is None else as_tensor(prompts)
        with model.lock:  # one pass at a time per model, whichever service or thread asks
            if req.top_words:
                logits, words = model.top_words(req.task, enc, tensor, layer, req.top_words)
            else:
                logits = model.logits(req.task, enc, tensor, layer).numpy()
            reported = getattr(model, "reported_tokens", None)  # an upstream engine's own count
        if not np.isfinite(logits).all():
            raise ConfigError("the model produced non-finite scores for these prompts; their values are too large")
        losses = None
        if req.labels is not None:
            losses = [float(x) for x in metrics.loss(req.loss, logits, np.asarray(req.labels))]
        n = len(req.inputs)
        return EvaluateResponse(
            model=req.model,
            losses=losses,
            logits=Tensor.from_numpy(logits) if req.return_logits else None,
            prompts=Tensor.from_numpy(prompts) if req.return_prompts and prompts is not None else None,
            words=words,
            usage=Usage(queries=k, requests=1, examples=k * n,
                        tokens=k * (sum(enc.tokens) + n * length) if reported is None else reported),
        )

    # ---- helpers --------------------------------------------------------------------------
    def _check_inputs(self, inputs) -> None:
        lim = self.limits
        if len(inputs) > lim.max_examples:
            raise ConfigError(f"{len(inputs)} inputs in one request; the limit is {lim.max_examples}: split the set")
        for i, ex in enumerate(inputs):
            for field in ("text", "text_pair"):
                value = getattr(ex, field)
                if value is not None and len(value) > lim.max_text_chars:
                    raise ConfigError(f"inputs[{i}].{field} has {len(value)} characters; the limit is {lim.max_text_chars}")

    def _encode(self, model: PromptModel, req) -> Encoded:
        key = hashlib.sha1(
            # the model's directory, not its name: a copy loaded under one name may be served under others
            json.dumps([str(model.path), req.task.model_dump(), [e.model_dump() for e in req.inputs]]).encode()
        ).hexdigest()
        with self._lock:
            if key in self._encodings:
                self._encodings.move_to_end(key)
                return self._encodings[key]
        enc = model.encode(req.task, req.inputs)  # tokenizing needs no model lock
        with self._lock:
            enc = self._encodings.setdefault(key, enc)  # a thread that got there first keeps its object (reuse keys on it)
            if len(self._encodings) > 32:
                self._encodings.popitem(last=False)
        return enc

    def _prompts(self, model: PromptModel, req: EvaluateRequest) -> np.ndarray | None:
        c = req.candidates
        if c is None:
            return None
        h, n_layers, lim = model.hidden_size, model.num_layers, self.limits
        if isinstance(c, PromptTensor):
            shape = c.prompts.shape
            if len(shape) != 4 or shape[3] != h or shape[1] not in (1, n_layers):
                raise ConfigError(f"prompts have shape {shape}; expected [K, 1 or {n_layers}, L, {h}] for model {req.model!r}")
            _check_k_l(shape[0], shape[2], lim.max_candidates, model.max_prompt_tokens)
            prompts = _finite(c.prompts, "prompts")
        else:
            prompts = self._project(model, c)
        if not np.isfinite(prompts).all():
            raise ConfigError("the projected prompts are not finite: z or the projection scale is too large")
        if c.init_seed is not None or c.init_text is not None:
            prompts = np.array(prompts)  # the decoded tensor may be a read-only view of the request body
            prompts[:, 0] += model.init_prompt(c.init_seed if c.init_text is None else c.init_text, prompts.shape[2])
        return prompts

    def _project(self, model: PromptModel, c: IntrinsicPrompts) -> np.ndarray:
        h, n_layers, lim = model.hidden_size, model.num_layers, self.limits
        shape = c.z.shape
        if len(shape) != 3 or shape[1] not in (1, n_layers):
            raise ConfigError(f"z has shape {shape}; expected [K, 1 or {n_layers}, d]")
        k, layers, d = shape
        length = c.prompt_length
        _check_k_l(k, length, lim.max_candidates, model.max_prompt_tokens)
        if d > lim.max_intrinsic_dim:
            raise ConfigError(f"intrinsic dimension {d} is over the limit {lim.max_intrinsic_dim}")
        if len(c.projections) != layers:
            raise ConfigError(f"{len(c.projections)} projection specs for {layers} prompted layers; give one per layer")
        for i, spec in enumerate(c.projections):
            if spec.d != d or spec.D != length * h:
                raise ConfigError(f"projections[{i}] is {spec.D}x{spec.d}; z and the model need D = L*H = {length * h}, d = {d}")
        z = _finite(c.z, "z")
        out = np.zeros((k, layers, length * h), dtype=np.float32)
        for layer, spec in enumerate(c.projections):
            zl = z[:, layer]
            if zl.any():  # BBTv2 sends zeros for layers without a prompt yet: skip their matmul
                out[:, layer] = project(zl, spec)  # as the client would: the float32 wire form gives the same prompts
        return out.reshape(k, layers, length, h)


_LOADED: dict[tuple[str, str, bool, str], PromptModel] = {}
_LOAD_LOCK = threading.Lock()


def _shared_model(path: str, name: str, device: str, compile: bool = False, dtype: str = "float32") -> PromptModel:
    """Load each model directory once per process, device, compile choice and precision, whatever
    name it is served under."""
    with _LOAD_LOCK:
        key = (path, device, compile, dtype)
        if key not in _LOADED:
            model = load_model(path or DEFAULT_MODEL, name=name, device=device, dtype=dtype)
            if compile:
                model.compile()
            _LOADED[key] = model
        return _LOADED[key]


def _check_k_l(k: int, length: int, max_k: int, max_l: int) -> None:
    if not 1 <= k <= max_k:
        raise ConfigError(f"{k} candidates in one request; the limit is {max_k}: split the population")
    if not 1 <= length <= max_l:
        raise ConfigError(f"prompt length {length} tokens; this model takes 1 to {max_l}")


def _finite(t: Tensor, what: str) -> np.ndarray:
    try:
        arr = t.to_numpy()
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from exc
    if not np.isfinite(arr).all():
        raise ConfigError(f"{what} holds NaN or infinite values")
    return arr
