"""BBTv2's reuse of the layers below the tuned one.

While BBTv2 tunes layer l, every candidate of a generation carries the same prompts below l, so
the hidden states entering l are the same for all of them: they are computed once per example
(not once per candidate) and only layers l.. run per candidate. They are also kept for the next
request on the same inputs: the next generation tunes the layer above, so only one more layer has
to run on them (none when nothing below changed).

Shapes: K candidates, T_i tokens of example i (prompt included), L prompt tokens, H hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bbt.errors import ConfigError

KEPT_INPUT_SETS = 2  # train inputs, and one more set (a server may serve several runs)


def first_varying_layer(prompts: torch.Tensor) -> int:
    """The lowest layer at which candidates' prompts [K, layers, L, H] differ (the top one if none do)."""
    for layer in range(prompts.shape[1] - 1):
        if not torch.equal(prompts[1:, layer], prompts[:-1, layer]):  # all equal: each equals the next
            return layer
    return prompts.shape[1] - 1


def shared_below(prompts: torch.Tensor, layer: int | None) -> int:
    """The layer from which candidates must run separately: `layer` as the request states it
    (checked: the prompts below it must be the same for every candidate), else found by comparing."""
    if layer is None:
        return first_varying_layer(prompts)
    if layer >= prompts.shape[1]:
        raise ConfigError(f"candidates.layer is {layer}, but the prompts have {prompts.shape[1]} layers")
    if layer > 0 and not torch.equal(prompts[1:, :layer], prompts[:-1, :layer]):
        raise ConfigError(f"candidates.layer is {layer}, but the candidates' prompts differ below it: "
                          "send the lowest layer at which they differ, or leave it out")
    return layer


@dataclass
class KeptStates:
    """Hidden states entering `layer` for the inputs `enc`, under lower prompts `prefix` (layer, L, H)."""

    enc: object
    layer: int
    prefix: torch.Tensor
    states: list[torch.Tensor]  # per example, (T_i, H)


StatesFn = Callable[[int, "KeptStates | None"], list[torch.Tensor]]


def lower_states(kept: dict[int, KeptStates], enc, layer: int, prompt: torch.Tensor,
                 compute: StatesFn) -> list[torch.Tensor]:
    """The states entering `layer` under prompt (layers, L, H), continued from the states kept from
    the last request on these inputs wherever its lower prompts are still these.

    `compute(layer, base)` runs the layers below `layer` (from `base.layer` up, on its states, if
    given). A BBTv2 round tunes layer l right after layer l-1, with the prompts below l-1
    unchanged: the states entering l-1 from that generation need only layer l-1 run on them, so the
    lower pass costs one layer per generation instead of l. When no lower prompt changed (a layer
    that did not improve in a whole round) it costs nothing.
    """
    base = kept.pop(id(enc), None)
    if base is not None and not (base.enc is enc and base.layer <= layer
                                 and torch.equal(base.prefix, prompt[: base.layer])):
        base = None
    states = base.states if base is not None and base.layer == layer else compute(layer, base)
    kept[id(enc)] = KeptStates(enc, layer, prompt[:layer].clone(), states)
    while len(kept) > KEPT_INPUT_SETS:
        kept.pop(next(iter(kept)))
    return states


def padded(per_example: list[torch.Tensor] | tuple[torch.Tensor, ...], ex_idx: list[int], t: int) -> torch.Tensor:
    """(B, t, ...) holding per_example[ex_idx[b]] (T_i, ...) in row b, zeros after its T_i."""
    out = torch.nn.utils.rnn.pad_sequence([per_example[i] for i in ex_idx], batch_first=True)
    return out if out.shape[1] >= t else F.pad(out, (0, 0, 0, t - out.shape[1]))


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a transformer layer is called with (positional or keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A pre-hook's answer: the same call with other hidden states."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def resume_hook(states: list[torch.Tensor], ex_idx: list[int], t: int):
    """A pre-hook that replaces a chunk's hidden states (B, t, H) with the known `states` of its
    examples: what the skipped layers below would have given."""
    rows = padded(states, ex_idx, t)

    def hook(module, args, kwargs):
        return with_hidden(args, kwargs, rows.to(hidden_of(args, kwargs).dtype))

    return hook


class Stop(Exception):
    """Raised by a pre-hook to end a forward pass once the states it needs are captured."""


class Skip(torch.nn.Module):
    """Stands in for a layer whose output is already known: returns its input unchanged."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        if hasattr(layer, "attention_type"):  # some decoder loops look this up on every layer
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states
