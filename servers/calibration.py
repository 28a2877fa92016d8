"""What a client needs to scale its prompts: hidden-state spread, the model's card, p0.

The client draws A_l with std alpha * sigma_l / (sqrt(d) * sigma), sigma_l being the spread of
the states a prompt at layer l is added to; it never sees the model, so the server measures them.

Each function takes a loaded `servers.engine.PromptModel`, which this module does not import: the
engine imports it.
"""

from __future__ import annotations

import math
import numpy as np
import torch

from bbt.errors import ConfigError
from bbt.protocol import Example, ModelInfo, TaskSpec

# A few plain sentences (our own) to estimate hidden-state scales when a model loads.
SAMPLE_TEXT = [
    "The train was late again this morning.",
    "She planted tomatoes and basil in the garden.",
    "Our team won the match in the final minute.",
    "The new phone has a brighter screen and a longer battery life.",
    "Prices at the market went up after the storm.",
    "He wrote the report before lunch and sent it to his manager.",
    "The museum opens a new exhibition on ancient maps next week.",
    "This soup is too salty for me.",
]
PROMPT_PLACEMENT = "after_leading_special_tokens"


def clipped_std(values: torch.Tensor, rounds: int = 3) -> float:
    """Std after dropping values beyond 3 std, a few rounds (outlier features of LLMs would dominate)."""
    v = values.double()
    for _ in range(rounds):
        mean, std = v.mean(), v.std()
        kept = v[(v - mean).abs() <= 3 * std]
        if kept.numel() == v.numel() or kept.numel() < 2:
            break
        v = kept
    std = float(v.std())
    return std if math.isfinite(std) and std > 0 else 1.0


@torch.inference_mode()
def hidden_std(model, enc) -> list[float]:
    """Std of the hidden states entering each layer over the real tokens (3-sigma clipped).

    Entry 0 is the word-embedding std of the tokens, the scale of what a BBT prompt replaces.
    """
    stats: list[list[torch.Tensor]] = [[] for _ in range(model.num_layers)]
    for start in range(0, len(enc.ids), 64):
        ids, mask = model.batch(enc, list(range(start, min(start + 64, len(enc.ids)))), 0)
        out = model.model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        mask = mask.bool()
        stats[0].append(model.word_embeddings(ids)[mask].flatten())
        for layer in range(1, model.num_layers):
            stats[layer].append(out.hidden_states[layer][mask].flatten())
    return [clipped_std(torch.cat(s)) for s in stats]


def prompt_limits(max_positions: int) -> tuple[int, int]:
    """(max_prompt_tokens, max_input_tokens) for a model of `max_positions` positions: a quarter
    for the soft prompt (at most 128 tokens), the rest for the input (at most 256)."""
    prompt = min(128, max_positions // 4)
    return prompt, min(256, max_positions - prompt)


def model_info(model, modes: tuple[str, ...] = ("bbt", "bbtv2"), engine: str = "bbt") -> ModelInfo:
    """The card `GET /v1/models/{name}` serves (`model` may be an upstream model: its own
    hidden_std and the modes and engine it can serve)."""
    sample_task = TaskSpec(name="sample", labels=["a", "b"], verbalizer=["good", "bad"], label_texts=["good", "bad"])
    sample = model.encode(sample_task, [Example(text=t) for t in SAMPLE_TEXT])
    return ModelInfo(
        name=model.name,
        family=model.family.name,  # type: ignore[arg-type]
        hidden_size=model.hidden_size,
        num_layers=model.num_layers,
        max_prompt_tokens=model.max_prompt_tokens,
        max_input_tokens=model.max_input_tokens,
        embedding_std=float(model.word_embeddings.weight.detach().float().std()),
        hidden_std=model.hidden_std(sample),
        modes=list(modes),
        prompt_placement=PROMPT_PLACEMENT,
        prompt_position=model.prompt_at,
        engine=engine,
        dtype=getattr(model, "dtype", None),  # an upstream engine's precision is its own: not known here
    )


def ordinary_ids(model) -> np.ndarray:
    """Vocabulary ids that are neither special tokens nor unused slots, in id order."""
    special = set(model.tokenizer.all_special_ids)
    vocab = model.tokenizer.get_vocab()
    n = min(model.word_embeddings.num_embeddings, len(vocab))
    return np.array(sorted(
        i for tok, i in vocab.items() if i < n and i not in special and not tok.startswith("[unused")
    ))


@torch.inference_mode()
def vocab_prompt(model, seed: int, length: int) -> np.ndarray:
    """p0 [L, H]: input embeddings of `length` ordinary vocabulary tokens drawn with `seed`.

    BBT starts the search from real token embeddings rather than zeros: a prompt of zero vectors
    is far off the embedding manifold and drags accuracy well below the no-prompt model.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    ids = rng.choice(ordinary_ids(model), size=length, replace=False)
    return model.word_embeddings(model.tensor(ids.tolist())).float().cpu().numpy()


@torch.inference_mode()
def text_prompt(model, text: str, length: int) -> np.ndarray:
    """p0 [L, H]: input embeddings of the last `length` tokens of `text` (no special tokens),
    repeated as often as it takes to fill `length` tokens.

    An instruction or a few demonstrations as the starting point puts z = 0 on the embedding
    manifold and, unlike random vocabulary tokens, says something about the task. The prompt
    ends where the input begins, so the text's end is kept whole: a cut goes at the front.
    """
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"the init text {text[:80]!r} has no tokens for model {model.name!r}")
    ids = (ids * -(-length // len(ids)))[-length:]
    return model.word_embeddings(model.tensor(ids)).float().cpu().numpy()
