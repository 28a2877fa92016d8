"""Llama-style decoders (RMSNorm, rotary positions, grouped-query attention) on bbt's own layer loop.

In a causal LM the prompt comes before the text (right after any BOS), so the states at the
prompt positions never see the text: for a candidate they are the same for every example. bbt
therefore runs each candidate's prefix (leading specials + L prompt vectors) through the layers
once, keeps its keys and values, and runs each (candidate, example) row on the text tokens alone,
attending to that cached prefix. With a 50-token prompt and SST-2 sentences of about 25 tokens,
that is a third of the tokens a plain forward pass would run. On top of that:

- the top layer runs only at the position the head reads (the last token: one row per example);
- BBTv2: the text states entering the tuned layer are the same for every candidate (the prompts
  below it are), so they are computed once per example, kept for the next generation and
  continued one layer at a time (`servers/reuse.py`); the prefix below the tuned layer runs once.

Logits equal those of the transformers forward pass within float rounding (tests in
`tests/test_decoder.py`). Shapes: K candidates, B rows, P prefix tokens, T text tokens,
L prompt tokens, H hidden, h heads, g key/value heads, D head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from servers import batching, reuse
from servers.families import Encoded, Head

# Layer types whose forward is: x + attn(norm(x)); x + mlp(norm(x)), with rotary q/k and no
# extra norms inside attention. (Qwen3 adds q/k norms, Gemma scales embeddings: not these.)
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x (B, heads, T, D) with cos/sin (B or 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class DecoderStack:
    """Scores prompts on a Llama-style causal LM; see the module docstring."""

    def __init__(self, pm):  # a servers.engine.PromptModel (the engine imports this module, not the reverse)
        self.pm = pm
        base = pm.model.base_model
        cfg = pm.model.config
        self.embed, self.norm, self.rotary = base.embed_tokens, base.norm, base.rotary_emb
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self._kept: dict[int, reuse.KeptStates] = {}  # text states entering the tuned layer, per input set
        self.in_prefix = False  # True while the prefix runs (tests count rows per example apart from it)

    @staticmethod
    def fits(model: torch.nn.Module) -> bool:
        cfg, base = model.config, model.base_model
        window = getattr(cfg, "sliding_window", None)
        if getattr(cfg, "model_type", None) not in SUPPORTED_TYPES or (window is not None and window < 4096
                                                                        and getattr(cfg, "use_sliding_window", True)):
            return False
        if not all(hasattr(base, n) for n in ("embed_tokens", "norm", "rotary_emb", "layers")):
            return False
        return all(
            all(hasattr(layer, n) for n in ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp"))
            and all(hasattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            for layer in base.layers
        )

    # ---- one layer ----------------------------------------------------------------------
    def _positions(self, start: int, t: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + t, device=like.device)[None]
        return self.rotary(like, position_ids=pos)  # (1, t, D) each

    def _layer(self, layer, h: torch.Tensor, rope, past: tuple[torch.Tensor, torch.Tensor] | None,
               mask: torch.Tensor, rows: torch.Tensor | None = None, kv_only: bool = False):
        """One decoder layer on h (B, T, H) after a cached prefix `past` (keys, values, each
        (B or 1, g, P, D)); `mask` (B or 1, 1, T or 1, P + T) True where a query may look.

        With `rows` (B,), only the output at position rows[b] is computed: (B, 1, H). Returns the
        output and this layer's keys and values (B, g, T, D), rotated; with `kv_only`, those alone."""
        att = layer.self_attn
        b, t, _ = h.shape
        x = layer.input_layernorm(h)
        cos, sin = rope
        k = _rotate(att.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = att.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if kv_only:
            return None, k, v
        if rows is not None:
            pick = rows[:, None, None].expand(-1, 1, h.shape[2])
            h, x = h.gather(1, pick), x.gather(1, pick)  # (B, 1, H)
            cos, sin = cos[0][rows][:, None], sin[0][rows][:, None]  # (B, 1, D)
        q = _rotate(att.q_proj(x).view(b, -1, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        keys, values = k, v
        if past is not None:
            keys = torch.cat([past[0].expand(b, -1, -1, -1), k], dim=2)
            values = torch.cat([past[1].expand(b, -1, -1, -1), v], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=getattr(att, "scaling", None),
                                             enable_gqa=self.kv_heads != self.heads)
        h = h + att.o_proj(out.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, k, v

    # ---- the prefix -----------------------------------------------------------------------
    def _prefix(self, specials: list[int], prompts: torch.Tensor | None, start: int):
        """Keys and values of the prefix (leading specials, then the prompt) at every layer:
        per layer (keys, values), each (K or 1, g, P, D), 1 below `start` (shared by every
        candidate); None when the prefix is empty."""
        a = len(specials)
        length = 0 if prompts is None else prompts.shape[2]
        if a + length == 0:
            return None
        k_all = 1 if prompts is None else prompts.shape[0]
        shared = start > 0 or k_all == 1  # run the lowest layers once while every candidate agrees
        rows = 1 if shared else k_all
        parts = []
        if a:
            parts.append(self.embed(self.pm.tensor(specials))[None].expand(rows, -1, -1))
        if prompts is not None:
            parts.append(prompts[:rows, 0].to(self.embed.weight.dtype))
        x = torch.cat(parts, dim=1)  # (rows, P, H)
        p = x.shape[1]
        rope = self._positions(0, p, x)
        mask = torch.ones(p, p, dtype=torch.bool, device=x.device).tril()[None, None]
        cache = []
        layers = self.pm.layers
        self.in_prefix = True
        try:
            for j, layer in enumerate(layers):
                if shared and j == start and k_all > 1:
                    x, rows = x.expand(k_all, -1, -1), k_all  # from the tuned layer up: one row per candidate
                if prompts is not None and 1 <= j < prompts.shape[1]:
                    x = x.clone()
                    x[:, a:] = x[:, a:] + prompts[:rows, j].to(x.dtype)
                x, k, v = self._layer(layer, x, rope, None, mask, kv_only=j == len(layers) - 1)
                cache.append((k, v))
        finally:
            self.in_prefix = False
        return cache

    # ---- the text -----------------------------------------------------------------------
    def _text_batch(self, enc: Encoded, ex_idx: list[int]) -> tuple[torch.Tensor, list[int]]:
        a = self.pm.prompt_at
        seqs = [enc.ids[i][a:] for i in ex_idx]
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), self.pm.pad_id, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
        return ids.to(self.pm.device), [len(s) for s in seqs]

    def _run_text(self, h: torch.Tensor, first: int, last: int, cache, cand: torch.Tensor | None, p: int,
                  read: torch.Tensor | None = None) -> torch.Tensor:
        """Layers first..last-1 on text states h (B, T, H) placed after a prefix of p tokens whose
        keys/values per layer are `cache` (row b takes candidate cand[b]'s). With `read` (B,),
        the top layer runs only there and (B, H) comes back."""
        b, t, _ = h.shape
        rope = self._positions(p, t, h)
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        mask = torch.cat([torch.ones(t, p, dtype=torch.bool, device=h.device), causal], dim=1)[None, None]
        top = len(self.pm.layers) - 1
        for j in range(first, last):
            past = None
            if cache is not None:
                k, v = cache[j]
                past = (k, v) if k.shape[0] == 1 else (k[cand], v[cand])
            if j == top and read is not None:
                row_mask = mask[0, 0][read][:, None, None]  # (B, 1, 1, P + T)
                h, _, _ = self._layer(self.pm.layers[j], h, rope, past, row_mask, rows=read)
                return h[:, 0]
            h, _, _ = self._layer(self.pm.layers[j], h, rope, past, mask)
        return h

    def _text_states(self, layer: int, enc: Encoded, cache, p: int, base: reuse.KeptStates | None) -> list[torch.Tensor]:
        """Per example, the text states (T_i, H) entering `layer` after the shared prefix (its
        keys/values in `cache` are one row, the same for every candidate)."""
        first = 0 if base is None else base.layer
        a = self.pm.prompt_at
        states: list[torch.Tensor] = [torch.empty(0)] * len(enc.ids)
        order = sorted(range(len(enc.ids)), key=lambda i: len(enc.ids[i]))
        for ex_idx in batching.chunks(order, [len(enc.ids[i]) - a for i in order], self.pm.chunk_tokens()):
            ids, lengths = self._text_batch(enc, ex_idx)
            h = self.embed(ids) if base is None else reuse.padded(base.states, ex_idx, ids.shape[1])
            h = self._run_text(h, first, layer, cache, None, p)
            for row, i in enumerate(ex_idx):
                states[i] = h[row, : lengths[row]].clone()
        return states

    def scores(self, enc: Encoded, prompts: torch.Tensor | None, head: Head, start: int) -> torch.Tensor:
        """Class logits [K, N, C] for prompts [K, layers, L, H] (None: K=1, no prompt), the
        candidates sharing their prompts below layer `start`."""
        a = self.pm.prompt_at
        n = len(enc.ids)
        k = 1 if prompts is None else prompts.shape[0]
        specials = enc.ids[0][:a]
        cache = self._prefix(specials, prompts, start)
        p = a + (0 if prompts is None else prompts.shape[2])
        lower = None
        if start > 0:
            lower = reuse.lower_states(self._kept, enc, start, prompts[0],
                                       lambda layer, base: self._text_states(layer, enc, cache, p, base))
        read_top = self.pm.top_rows_only
        order = sorted(range(n), key=lambda i: len(enc.ids[i]))
        pairs = [(kk, i) for i in order for kk in range(k)]
        parts, flat = [], []
        for chunk in batching.chunks(pairs, [len(enc.ids[i]) - a for _, i in pairs], self.pm.chunk_tokens()):
            cand = self.pm.tensor([c for c, _ in chunk])
            ex_idx = [i for _, i in chunk]
            ids, _ = self._text_batch(enc, ex_idx)
            read = self.pm.tensor([enc.readout[i] - a for i in ex_idx])  # the last text token
            h = self.embed(ids) if lower is None else reuse.padded(lower, ex_idx, ids.shape[1])
            out = self._run_text(h, start if lower is not None else 0, len(self.pm.layers), cache, cand, p,
                                 read if read_top else None)
            if not read_top:
                out = out[torch.arange(len(ex_idx), device=out.device), read]
            parts.append(head.at_rows(self.norm(out)))
            flat.extend(c * n + i for c, i in chunk)
        return batching.scatter_rows(parts, flat, k, n)

    def warm_up(self) -> None:
        """One tiny pass (compiles what `PromptModel.compile` swapped in)."""

        class _Id(Head):
            n_classes = 1

            def at_rows(self, states):
                return states[:, :1]

        enc = Encoded(ids=[[self.pm.pad_id + 1] * 6, [self.pm.pad_id + 1] * 4], readout=[5, 3], tokens=[6, 4])
        self.scores(enc, None, _Id(), 0)
