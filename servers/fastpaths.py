"""Shortcuts inside BERT-style layers, and torch.compile of the layers' dense blocks.

Each gives the logits of a plain forward pass within float rounding (tests in
`tests/test_models.py` and `tests/test_layer_reuse.py`). Llama-style layers have their own
path in `servers/decoder.py`.

Shapes: B rows, T tokens, R rows read, L prompt tokens, H hidden size, K candidates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from servers.reuse import padded


class BertLayer(torch.nn.Module):
    """A BERT-style encoder layer computed with two shortcuts, each optional.

    - `rows` (B, R): only those output positions are computed (the top layer, where the head
      reads: the text without the prompt for a sentence encoder, the mask for a masked LM). Every
      position still serves as a key and a value, but the queries, the attention output and the
      feed-forward block run for those rows alone; with a 50-token prompt on MiniLM that skips
      about half of the layer. Other positions keep their input; the head never reads them.
    - `qkv` (B, T, 3H): the query, key and value projections, already known (`SharedQKV`: the
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


class SharedQKV:
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
        qkv = padded(self.per_example, ex_idx, t)
        qkv[:, at : at + self.per_candidate.shape[1]] += self.per_candidate[cand]
        return qkv


class PassEmbeddings(torch.nn.Module):
    """Stands in for an embedding module whose output a hook replaces: gives back inputs_embeds."""

    def forward(self, *args, inputs_embeds=None, **kwargs):
        return inputs_embeds


def dense_blocks(layers) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(owner, attribute, block) of every layer's dense parts: BERT's attention output,
    intermediate and output; a decoder's MLP. What `torch.compile` gets (attention stays eager)."""
    blocks = []
    for layer in layers:
        for owner, attr in ((getattr(layer, "attention", None), "output"), (layer, "intermediate"),
                            (layer, "output"), (layer, "mlp")):
            block = getattr(owner, attr, None)
            if isinstance(block, torch.nn.Module):
                blocks.append((owner, attr, block))
    return blocks


def compiled(block: torch.nn.Module) -> torch.nn.Module:
    # dynamic: passes vary in rows and length; freezing: the weights are constants, so inductor
    # may lay them out for the CPU's matmul kernels once
    return torch.compile(block, dynamic=True, options={"freezing": True})
