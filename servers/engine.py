"""The engine: where prompts go, and how a population of K candidates is batched and scored.

Shapes: K candidates, N examples, B rows (candidate, example pairs) of one pass, T tokens,
L prompt tokens, H hidden size, C classes.

Prompt placement (stated in `/v1/models` as `prompt_placement` and `prompt_position`, and
recorded in the artifact): the L prompt vectors sit right after the special tokens the tokenizer
puts before the text ([CLS], <s>, BOS), at positions a..a+L-1 with a the number of those tokens.
Prompt entry 0 replaces the word embeddings there (BBT); entry l >= 1, when given, is added to
the hidden states entering layer l at those positions (BBTv2's deep prompt).

Every pass pads only to its own longest row: the K x N pairs are sorted by length and cut into
passes of at most `chunk_tokens()` padded tokens. Llama-style decoders run on bbt's own layer loop
(`servers/decoder.py`); other models run through their transformers forward with hooks.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from bbt.errors import ConfigError, ModelNotFound
from bbt.protocol import Example, ModelInfo, TaskSpec
from servers import batching, calibration, fastpaths, precision, reuse
from servers.decoder import DecoderStack
from servers.families import FAMILY_CLASSES, Encoded, Family, Head, class_scores
from servers.loading import load_pretrained

log = logging.getLogger(__name__)



class PromptModel:
    """A frozen transformer that scores candidate prompts, with the read-out of its family.

    `lock` serialises passes on this model: scoring swaps modules in and out of the layer list,
    so two threads must not run it at once (torch already uses every core for one pass).
    """

    def __init__(self, name: str, path: Path, tokenizer, model: torch.nn.Module, family: str, **family_args):
        self.name, self.path, self.tokenizer, self.model = name, path, tokenizer, model.eval()
        self.device: torch.device = next(model.parameters()).device
        self.dtype: str = precision.dtype_of(model)  # what the layers run in: float32 or bfloat16
        cfg = model.config
        self.hidden_size: int = cfg.hidden_size
        self.num_layers: int = cfg.num_hidden_layers
        self.layers = _find_layers(model, self.num_layers)
        self.word_embeddings: torch.nn.Embedding = model.get_input_embeddings()
        if tokenizer.pad_token_id is not None:
            self.pad_id = tokenizer.pad_token_id
        else:
            self.pad_id = (tokenizer.eos_token_id or 0) if family == "causal" else 0
        max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024)
        if getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            max_pos -= 2  # RoBERTa's positions start after the padding index
        self.max_prompt_tokens, self.max_input_tokens = calibration.prompt_limits(max_pos)
        self.family: Family = FAMILY_CLASSES[family](tokenizer, model, self.max_input_tokens, **family_args)
        self.prompt_at = self.family.prompt_at
        self.lock = threading.Lock()
        self._info: ModelInfo | None = None
        self._init_cache: dict[tuple[int | str, int], np.ndarray] = {}
        self.reuse_lower_layers = True  # see scores(); a switch for tests and benchmarks
        self.top_rows_only = True  # the top layer only where the head reads; a switch for tests and benchmarks
        self._kept: dict[int, reuse.KeptStates] = {}  # id(Encoded) -> the last lower states computed for it
        self.decoder = DecoderStack(self) if family == "causal" and DecoderStack.fits(model) else None
        self.use_decoder = self.decoder is not None  # bbt's own layer loop; off: the transformers forward
        self._blocks = fastpaths.dense_blocks(self.layers)
        self._compiled_blocks: list[torch.nn.Module] | None = None
        self.compiled = False

    # ---- inputs -------------------------------------------------------------------------
    def encode(self, task: TaskSpec, examples: list[Example]) -> Encoded:
        """Token ids of each input with the task's template, without prompt slots."""
        return self.family.encode(task, examples)

    def tensor(self, values: list[int]) -> torch.Tensor:
        """A long tensor on the model's device."""
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def chunk_tokens(self) -> int:
        """Padded tokens per forward pass on this model's device."""
        return batching.TOKENS_PER_CHUNK if self.device.type == "cpu" else batching.ACCELERATOR_TOKENS_PER_CHUNK

    def batch(self, enc: Encoded, ex_idx: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (B, T), with `length` prompt slots after the leading specials."""
        seqs = [enc.ids[i] for i in ex_idx]
        t = max(len(s) for s in seqs) + length
        a = self.prompt_at
        ids = torch.full((len(seqs), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), t, dtype=torch.long)
        for row, s in enumerate(seqs):
            full = s[:a] + [self.pad_id] * length + s[a:]
            ids[row, : len(full)] = torch.tensor(full)
            mask[row, : len(full)] = 1
        return ids.to(self.device), mask.to(self.device)  # built on the CPU: one copy each, not one per row

    # ---- scoring ------------------------------------------------------------------------
    def logits(self, task: TaskSpec, enc: Encoded, prompts: torch.Tensor | None, layer: int | None = None,
               *, vocabulary: bool = False) -> torch.Tensor:
        """Class logits [K, N, C] on the CPU for prompts [K, layers, L, H] (None: no soft prompt,
        K=1), under inference mode. `layer`: the lowest layer whose prompt differs between the
        candidates, where the request says (`reuse.shared_below`). `vocabulary` (masked and causal
        LMs): the logits of every token at the read position instead, [K, N, vocabulary]."""
        with torch.inference_mode():
            return self.scores(task, enc, prompts, layer, vocabulary=vocabulary).float().cpu()

    def scores(self, task: TaskSpec, enc: Encoded, prompts: torch.Tensor | None, layer: int | None = None,
               *, vocabulary: bool = False) -> torch.Tensor:
        """Class logits [K, N, C] on the model's device; differentiable in `prompts` when called
        outside inference mode (a gradient method can use the same template and read-out).

        When every candidate carries the same prompt below layer l (BBTv2 tunes one layer at a
        time), the hidden states entering layer l are computed once per example and only layers
        l.. run per candidate (`reuse_lower_layers`; off: every candidate runs the whole stack).
        """
        prompts = None if prompts is None else prompts.to(self.device)
        k = 1 if prompts is None else prompts.shape[0]
        head = self.family.vocab_head(task) if vocabulary else self.family.head(task)
        start = 0
        if prompts is not None and k > 1 and self.reuse_lower_layers and not torch.is_grad_enabled():
            start = reuse.shared_below(prompts, layer)
        if self.use_decoder:
            return self.decoder.scores(enc, prompts, head, start)
        return self._hooked_scores(enc, prompts, head, start)

    def top_words(self, task: TaskSpec, enc: Encoded, prompts: torch.Tensor | None, layer: int | None,
                  n: int) -> tuple[np.ndarray, list]:
        """Class logits [1, N, C] of one candidate and each input's `n` likeliest words at the read
        position, as (word, log-probability) pairs, from one pass over the vocabulary."""
        vocab = self.logits(task, enc, prompts, layer, vocabulary=True)[0]  # (N, vocabulary)
        ids, classes = self.family.verbalizer_ids(task)
        logits = class_scores(vocab[:, ids], classes, len(task.labels))[None].numpy()
        word_ids, names = self.family.word_tokens(task)
        logprobs = torch.log_softmax(vocab.double(), dim=-1)[:, word_ids]  # (N, words)
        top = torch.topk(logprobs, min(n, logprobs.shape[1]), dim=-1)
        return logits, [[(names[j], round(float(v), 6)) for v, j in zip(vals.tolist(), idx.tolist())]
                        for vals, idx in zip(top.values, top.indices)]

    def _hooked_scores(self, enc: Encoded, prompts: torch.Tensor | None, head: Head, start: int) -> torch.Tensor:
        n = len(enc.ids)
        k = 1 if prompts is None else prompts.shape[0]
        length = 0 if prompts is None else prompts.shape[2]
        lower = None
        if start > 0:
            lower = reuse.lower_states(self._kept, enc, start, prompts[0],
                                       lambda layer, base: self._states_entering(layer, enc, prompts[0], base))
        shared = None  # the tuned layer's query/key/value matmuls, split into shared and per-candidate parts
        if lower is not None and fastpaths.BertLayer.fits(self.layers[start]):
            shared = fastpaths.SharedQKV(self.layers[start], lower, prompts[:, start])
        rows_out, parts = [], []
        # Example-major order over length-sorted examples: each chunk pads to its own longest.
        order = sorted(range(n), key=lambda i: len(enc.ids[i]))
        pairs = [(kk, i) for i in order for kk in range(k)]
        for chunk in batching.chunks(pairs, [len(enc.ids[i]) + length for _, i in pairs], self.chunk_tokens()):
            cand = self.tensor([c for c, _ in chunk])
            ex_idx = [i for _, i in chunk]
            parts.append(self._forward_chunk(enc, ex_idx, cand, prompts, head, lower, start, shared))
            rows_out.extend(c * n + i for c, i in chunk)
        return batching.scatter_rows(parts, rows_out, k, n)

    def _forward_chunk(self, enc: Encoded, ex_idx, cand, prompts, head, lower=None, start: int = 0,
                       shared: fastpaths.SharedQKV | None = None) -> torch.Tensor:
        length = 0 if prompts is None else prompts.shape[2]
        a = self.prompt_at
        ids, mask = self.batch(enc, ex_idx, length)
        readout = self.tensor([enc.readout[i] for i in ex_idx])
        shift = torch.where(readout >= a, readout + length, readout)
        read = self.family.read_rows(shift, ids.shape[1], length) if self.top_rows_only else None
        if lower is None:
            hidden = self._run(ids, mask, prompts, [], read, cand=cand)
        else:
            with self._skipping(start):  # their output is known: `lower`, put in place at `start`
                resume = reuse.resume_hook(lower, ex_idx, ids.shape[1])
                qkv = None if shared is None else shared.chunk(ex_idx, cand, ids.shape[1], a)
                hidden = self._run(ids, mask, prompts, [(start, resume)], read, cand=cand, first=start, qkv=qkv)
        return head(hidden, mask, shift, a, length)  # (B, C)

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, prompts: torch.Tensor | None, hooks: list,
             rows: torch.Tensor | None = None, cand: torch.Tensor | None = None, first: int = 0,
             qkv: torch.Tensor | None = None) -> torch.Tensor:
        """The base model's last hidden states for prompts (B, layers, L, H), extra pre-hooks
        (layer index, hook) registered first so that they run before the prompt adders.

        With `cand` (B,), prompts are (K, layers, L, H) and row b takes candidate cand[b]'s: each
        layer gathers its own slice, so no (B, layers, L, H) copy is made. Prompts of layers below
        `first` are left out (their layers are skipped). With `rows` (B, R), the top layer is
        computed only at those positions (where it can be: `BertLayer`); its output elsewhere is
        its input, which the read-out must not use. With `qkv` (B, T, 3H), layer `first` takes
        its query/key/value projections from there (`SharedQKV`)."""
        a = self.prompt_at
        if first > 0:  # the skipped layers' output comes from a hook: the embeddings are not needed
            embeds = torch.zeros(*ids.shape, self.hidden_size, dtype=self.word_embeddings.weight.dtype, device=self.device)
        else:
            embeds = self.word_embeddings(ids)  # (B, T, H)
        keys = mask.bool()
        swapped = {}  # layer index -> the original, put back at the end
        if rows is not None and fastpaths.BertLayer.fits(self.layers[-1]):
            swapped[self.num_layers - 1] = self.layers[-1]
        if qkv is not None:
            swapped[first] = self.layers[first]
        for j, layer in swapped.items():  # before any hook, so the hooks land on the stand-ins
            top = j == self.num_layers - 1
            self.layers[j] = fastpaths.BertLayer(layer, keys, rows if top else None, qkv if j == first else None)
        handles = [self.layers[layer].register_forward_pre_hook(hook, with_kwargs=True) for layer, hook in hooks]
        try:
            if prompts is not None:
                length = prompts.shape[2]
                if first == 0:
                    p0 = prompts[:, 0] if cand is None else prompts[cand, 0]
                    embeds = embeds.clone()  # the embedding output may be a view autograd tracks
                    embeds[:, a : a + length] = p0.to(embeds.dtype)
                for layer in range(max(first, 1), prompts.shape[1]):
                    adder = _adder(prompts[:, layer], a, cand)
                    handles.append(self.layers[layer].register_forward_pre_hook(adder, with_kwargs=True))
            with self._embedding_skipped(first > 0):
                return self.model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        finally:
            for h in handles:
                h.remove()
            for j, layer in swapped.items():
                self.layers[j] = layer

    def _states_entering(self, layer: int, enc: Encoded, prompt: torch.Tensor,
                         base: reuse.KeptStates | None = None) -> list[torch.Tensor]:
        """Per example, the hidden states (T_i, H) entering `layer` under prompt (layers, L, H);
        only the layers below it run (from `base.layer` up, starting from its states, if given)."""
        length = prompt.shape[1]
        below = prompt[None, :layer]  # the adders of layers >= `layer` are not needed
        first = 0 if base is None else base.layer
        states: list[torch.Tensor] = [torch.empty(0)] * len(enc.ids)
        order = sorted(range(len(enc.ids)), key=lambda i: len(enc.ids[i]))
        for ex_idx in batching.chunks(order, [len(enc.ids[i]) + length for i in order], self.chunk_tokens()):
            ids, mask = self.batch(enc, ex_idx, length)
            captured: list[torch.Tensor] = []

            def capture(module, args, kwargs):
                captured.append(reuse.hidden_of(args, kwargs))
                raise reuse.Stop

            hooks = [(layer, capture)]
            if base is not None:
                hooks.insert(0, (first, reuse.resume_hook(base.states, ex_idx, ids.shape[1])))
            with self._skipping(first):
                try:
                    self._run(ids, mask, below, hooks, cand=self.tensor([0] * len(ex_idx)), first=first)
                except reuse.Stop:
                    pass
            hidden = captured[0]
            for row, i in enumerate(ex_idx):
                states[i] = hidden[row, : len(enc.ids[i]) + length].clone()
        return states

    @contextmanager
    def _embedding_skipped(self, skip: bool):
        """While `skip`, a BERT-style embedding module (positions, token types, LayerNorm) passes
        its input through: its output would be replaced anyway."""
        base = self.model.base_model
        embeddings = getattr(base, "embeddings", None)
        if not skip or not isinstance(embeddings, torch.nn.Module):
            yield
            return
        base.embeddings = fastpaths.PassEmbeddings()
        try:
            yield
        finally:
            base.embeddings = embeddings

    @contextmanager
    def _skipping(self, n: int):
        """Layers 0..n-1 replaced by `reuse.Skip` for the duration (their output comes from a hook)."""
        skipped = [self.layers[j] for j in range(n)]
        for j in range(n):
            self.layers[j] = reuse.Skip(skipped[j])
        try:
            yield
        finally:
            for j in range(n):
                self.layers[j] = skipped[j]

    # ---- calibration ----------------------------------------------------------------------
    def init_prompt(self, source: int | str, length: int) -> np.ndarray:
        """p0 [L, H]: vocabulary embeddings drawn with a seed (`calibration.vocab_prompt`) or the
        embeddings of a text's tokens (`calibration.text_prompt`)."""
        key = (source, length)
        if key not in self._init_cache:
            if isinstance(source, str):
                self._init_cache[key] = calibration.text_prompt(self, source, length)
            else:
                self._init_cache[key] = calibration.vocab_prompt(self, source, length)
            if len(self._init_cache) > 64:
                self._init_cache.pop(next(iter(self._init_cache)))
        return self._init_cache[key]

    def hidden_std(self, enc: Encoded) -> list[float]:
        """Per layer, the spread of the hidden states a prompt there is added to (`calibration`)."""
        return calibration.hidden_std(self, enc)

    def info(self) -> ModelInfo:
        if self._info is None:
            self._info = calibration.model_info(self)
        return self._info

    # ---- torch.compile ----------------------------------------------------------------------
    def compile(self, on: bool = True) -> None:
        """Run each layer's dense blocks through `torch.compile`, or back in eager mode (`on=False`).

        The blocks are the attention output and feed-forward part of every BERT layer, or a
        decoder layer's MLP, where inductor fuses the element-wise work into the matmuls;
        attention and the prompt hooks stay eager. On MiniLM on a 2-core CPU that was 1.03x to
        1.12x the queries/s of eager mode (`experiments/bench_speed.py --compile`, two runs), after
        11 s (inductor's disk cache warm) to 43 s (cold) of compiling, done here at once so that no
        request waits for it: a small gain, for a server that runs long. Logits agree with eager
        mode within float rounding. A ConfigError says when torch cannot compile on this machine.
        """
        if on == self.compiled:
            return
        if on and self._compiled_blocks is None:
            self._compiled_blocks = [fastpaths.compiled(block) for _, _, block in self._blocks]
        for (owner, attr, eager), fast in zip(self._blocks, self._compiled_blocks or []):
            setattr(owner, attr, fast if on else eager)
        self.compiled = on
        if not on:
            return
        try:
            with torch.inference_mode():  # compile now, on a small batch
                ids = torch.full((2, 8), self.pad_id + 1, dtype=torch.long, device=self.device)
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
                if self.use_decoder:
                    self.decoder.warm_up()
        except Exception as exc:  # noqa: BLE001 - inductor raises many kinds; all mean the same to the user
            self.compile(False)
            raise ConfigError(f"torch.compile does not work for {self.name} here ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); run without compiling (on a "
                              "CPU it needs a C++ compiler such as gcc)") from exc


def load_model(name_or_path: str, *, name: str | None = None, family: str | None = None,
               device: str | None = None, dtype: str | None = None) -> PromptModel:
    """Load a frozen model from an installed package, a local directory or a GGUF file (never the
    network), onto `device` (default: a GPU if there is one, else the CPU), in `dtype` (float32,
    bfloat16 or auto; default float32: `servers/precision.py`)."""
    path, family, tokenizer, model = load_pretrained(name_or_path, family, device, dtype)
    args = {}
    if family == "encoder":
        args["pooling"] = _pooling_mode(path)
    if family == "masked" and tokenizer.mask_token_id is None:
        raise ModelNotFound(f"{path}: the tokenizer has no mask token, so it cannot be a masked LM")
    return PromptModel(name or name_or_path, path, tokenizer, model, family, **args)


# ---- helpers ------------------------------------------------------------------------------

def _find_layers(model: torch.nn.Module, n: int) -> torch.nn.ModuleList:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"cannot find the {n} transformer layers of {type(model).__name__}")


def _adder(prompt: torch.Tensor, at: int, cand: torch.Tensor | None = None):
    """A forward pre-hook that adds prompt (B, L, H), or prompt[cand] for prompts (K, L, H), to
    the hidden states at positions at..at+L."""
    length = prompt.shape[1]

    def hook(module, args, kwargs):
        hidden = reuse.hidden_of(args, kwargs)
        add = (prompt if cand is None else prompt[cand]).to(hidden.dtype)
        if torch.is_grad_enabled():  # out of place: autograd may have saved the layer below's output
            hidden = hidden.clone()
            hidden[:, at : at + length] = hidden[:, at : at + length] + add
            return reuse.with_hidden(args, kwargs, hidden)
        # In place: the states entering a layer are the layer below's fresh output (or our own
        # resumed copy), which nothing else reads once this layer has them.
        hidden[:, at : at + length] += add
        return None

    return hook


def _pooling_mode(path: Path) -> str:
    import json

    cfg = path / "1_Pooling" / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("pooling_mode_cls_token"):
        return "cls"
    return "mean"


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
