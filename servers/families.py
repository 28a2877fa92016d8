"""Model families: how a task's template becomes token ids, and how class scores are read out.

Shapes: B rows (candidate, example pairs), T tokens, L prompt tokens, H hidden size, C classes.

- ``encoder``  sentence encoder (default MiniLM): class logits = scale * cos(pooled embedding of
               "[CLS] prompt text [SEP]", embedding of each label text).
- ``masked``   BERT/RoBERTa masked LM: verbalizer logits at the mask of the template.
- ``causal``   GPT-2/Llama-style LM: next-token verbalizer logits after the template text before
               {mask}.

Nothing here turns autograd off: a gradient method can wrap the same template, verbalizer and
read-out. (Label embeddings, which no prompt changes, are computed once under `no_grad`.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bbt.errors import ConfigError
from bbt.protocol import Example, TaskSpec, words_of

log = logging.getLogger(__name__)

ENCODER_LOGIT_SCALE = 20.0  # cosine in [-1, 1] -> logits; sentence-transformers' usual scale


@dataclass
class Encoded:
    """A task's inputs tokenized for one model, prompt slots not yet inserted."""

    ids: list[list[int]]  # per example, with special tokens
    readout: list[int]  # per example: token index read for the class (mask / last token), -1 for pooling
    tokens: list[int]  # per example: tokens billed (prompt excluded)


class Head:
    """Class logits from the base model's last hidden states; `n_classes` columns."""

    n_classes: int

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, readout: torch.Tensor, at: int,
                 length: int) -> torch.Tensor:
        """hidden (B, T, H), mask (B, T), readout (B,) positions with the prompt inserted, the
        prompt at positions at..at+length -> logits (B, C)."""
        raise NotImplementedError


class Family:
    """The tokenizer-side and head-side of one model family."""

    name: str

    def __init__(self, tokenizer, model: torch.nn.Module, max_input_tokens: int):
        self.tokenizer, self.model, self.max_input_tokens = tokenizer, model, max_input_tokens
        self.prompt_at = leading_specials(tokenizer)
        self.space_prefix = space_sensitive(tokenizer)
        self.device = next(model.parameters()).device
        self._words: dict[bool, tuple[torch.Tensor, list[str]]] = {}

    def encode(self, task: TaskSpec, examples: list[Example]) -> Encoded:
        ids, readout, tokens = [], [], []
        for ex in examples:
            seq, pos = self.encode_one(task, ex)
            ids.append(seq)
            readout.append(pos)
            tokens.append(len(seq))
        return Encoded(ids, readout, tokens)

    def encode_one(self, task: TaskSpec, ex: Example) -> tuple[list[int], int]:
        raise NotImplementedError

    def head(self, task: TaskSpec) -> Head:
        raise NotImplementedError

    def vocab_head(self, task: TaskSpec) -> Head:
        """A head giving every vocabulary token's logit at the read position (B, vocabulary)."""
        raise ConfigError(f"a {self.name} model reads no vocabulary at {{mask}}: top_words is for masked and causal "
                          "LMs (a sentence encoder's label texts are chosen by scoring candidate texts as labels)")

    def read_rows(self, readout: torch.Tensor, t: int, length: int) -> torch.Tensor | None:
        """Positions (B, R) of the top layer's output that the head reads; None: all of them."""
        return None

    # ---- text fitting ---------------------------------------------------------------------
    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= max_tokens:
            return text
        return self.tokenizer.decode(ids[:max_tokens]).strip()

    def fit_texts(self, ex: Example, overhead: int) -> tuple[str, str | None]:
        """Cut the text (and pair) so that the template fits in max_input_tokens."""
        room = max(8, self.max_input_tokens - overhead)
        if ex.text_pair is None:
            return self.truncate(ex.text, room), None
        n_a = len(self.tokenizer.encode(ex.text, add_special_tokens=False))
        n_b = len(self.tokenizer.encode(ex.text_pair, add_special_tokens=False))
        if n_a + n_b <= room:
            return ex.text, ex.text_pair
        half = room // 2
        keep_a = n_a if n_a <= half else max(half, room - n_b)
        return self.truncate(ex.text, keep_a), self.truncate(ex.text_pair, room - min(n_a, keep_a))

    def template_overhead(self, task: TaskSpec) -> int:
        return len(self.tokenizer(task.template.format(text="", text_pair="", mask="x")).input_ids)

    def word_space(self, task: TaskSpec) -> bool:
        """Whether verbalizer words take a leading space (BPE vocabularies spell " great" apart)."""
        return self.space_prefix

    def verbalizer_ids(self, task: TaskSpec) -> tuple[list[int], list[int]]:
        """The first token of every verbalizer word, and the class of each (W words in all; a class
        with several words scores the mean of their logits)."""
        space = self.word_space(task)
        ids, classes, groups = [], [], []
        for c, entry in enumerate(task.verbalizer):
            group = []
            for word in words_of(entry):
                tokens = self.tokenizer.encode((" " + word) if space else word, add_special_tokens=False)
                if not tokens:
                    raise ConfigError(f"verbalizer word {word!r} has no tokens in this model")
                if len(tokens) > 1:
                    log.debug("verbalizer word %r is %d tokens; scoring its first", word, len(tokens))
                if tokens[0] not in group:  # two spellings of one token count once
                    group.append(tokens[0])
            ids.extend(group)
            classes.extend([c] * len(group))
            groups.append(frozenset(group))
        if len(set(groups)) < len(groups):
            raise ConfigError(f"verbalizer {task.verbalizer} maps two labels to the same tokens in this model")
        return ids, classes

    def word_tokens(self, task: TaskSpec) -> tuple[torch.Tensor, list[str]]:
        """Vocabulary ids that are whole words as a verbalizer entry spells them (letters only, two or
        more, mapping back to that one token), and those words: what `top_words` may return."""
        space = self.word_space(task)
        if space not in self._words:
            vocab = len(self.tokenizer)
            texts = [self.tokenizer.decode([i]) for i in range(vocab)]
            keep = [i for i, t in enumerate(texts)
                    if (t.startswith(" ") if space else not t.startswith(" ")) and t.strip().isalpha()
                    and len(t.strip()) >= 2 and t.strip().isascii()]
            words = [texts[i].strip() for i in keep]
            again = self.tokenizer([(" " + w) if space else w for w in words], add_special_tokens=False).input_ids
            pairs = [(i, w) for i, w, a in zip(keep, words, again) if a == [i]]
            self._words[space] = (self._tensor([i for i, _ in pairs]), [w for _, w in pairs])
        return self._words[space]

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


# ---- sentence encoder -----------------------------------------------------------------------

class EncoderFamily(Family):
    name = "encoder"

    def __init__(self, *args, pooling: str = "mean", **kwargs):
        super().__init__(*args, **kwargs)
        self.pooling = pooling
        self._label_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def encode_one(self, task: TaskSpec, ex: Example) -> tuple[list[int], int]:
        text, pair = self.fit_texts(ex, overhead=3)
        ids = self.tokenizer(text, pair).input_ids if pair is not None else self.tokenizer(text).input_ids
        return ids, -1

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor, skip: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """Unit-length sentence embeddings (B, H): CLS or mean over the real tokens but the prompt."""
        if self.pooling == "cls":
            return F.normalize(hidden[:, 0], dim=-1)
        weights = mask.to(hidden.dtype).clone()
        weights[:, skip[0] : skip[0] + skip[1]] = 0  # the prompt steers, the text is what is pooled
        pooled = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(pooled, dim=-1)

    def read_rows(self, readout: torch.Tensor, t: int, length: int) -> torch.Tensor | None:
        if self.pooling == "cls":
            return torch.zeros(len(readout), 1, dtype=torch.long, device=readout.device)
        a = self.prompt_at  # mean pooling reads every position but the prompt's (padding is masked there)
        cols = torch.cat([torch.arange(a), torch.arange(a + length, t)]).to(readout.device)
        return cols.expand(len(readout), -1)

    def label_embeddings(self, task: TaskSpec) -> torch.Tensor:
        """(C, H) label embeddings, computed once per label set: the unit embedding of each label
        text, or for a label with several texts the mean of theirs (a dot product with it is the
        mean cosine)."""
        key = tuple(tuple(words_of(e)) for e in task.label_texts)
        if key not in self._label_cache:
            texts = [t for group in key for t in group]
            # not an inference tensor, even when first asked for under inference mode: it may meet autograd later
            with torch.inference_mode(False), torch.no_grad():
                units = []
                for i in range(0, len(texts), 256):  # a verbalizer search may bring a thousand texts
                    batch = self.tokenizer(texts[i : i + 256], padding=True, return_tensors="pt").to(self.device)
                    hidden = self.model.base_model(**batch).last_hidden_state
                    units.append(self.pool(hidden.float(), batch["attention_mask"]))
                unit = torch.cat(units)
                if len(texts) == len(key):
                    self._label_cache[key] = unit
                else:
                    sizes = [len(g) for g in key]
                    self._label_cache[key] = torch.stack([u.mean(0) for u in torch.split(unit, sizes)])
            if len(self._label_cache) > 64:
                self._label_cache.pop(next(iter(self._label_cache)))
        return self._label_cache[key]

    def head(self, task: TaskSpec) -> Head:
        return _CosineHead(self, self.label_embeddings(task), len(task.labels))


class _CosineHead(Head):
    def __init__(self, family: EncoderFamily, labels: torch.Tensor, n: int):
        self.family, self.labels, self.n_classes = family, labels, n

    def __call__(self, hidden, mask, readout, at, length):
        return ENCODER_LOGIT_SCALE * self.family.pool(hidden.float(), mask, (at, length)) @ self.labels.T  # read out in float32


# ---- masked LM ------------------------------------------------------------------------------

class MaskedFamily(Family):
    name = "masked"

    def read_rows(self, readout: torch.Tensor, t: int, length: int) -> torch.Tensor | None:
        return readout[:, None]  # the mask position

    def encode_one(self, task: TaskSpec, ex: Example) -> tuple[list[int], int]:
        text, pair = self.fit_texts(ex, self.template_overhead(task))
        ids = self.tokenizer(task.template.format(text=text, text_pair=pair or "", mask=self.tokenizer.mask_token)).input_ids
        where = [i for i, t in enumerate(ids) if t == self.tokenizer.mask_token_id]
        if len(where) != 1:
            raise ConfigError(f"template of task {task.name!r} gives {len(where)} mask tokens; it needs exactly one {{mask}}")
        return ids, where[0]

    def lm_head(self) -> torch.nn.Module:
        for attr in ("cls", "lm_head"):
            if hasattr(self.model, attr):
                return getattr(self.model, attr)
        raise ConfigError("no masked-LM head (cls or lm_head) found in this model")

    def head(self, task: TaskSpec) -> Head:
        ids, classes = self.verbalizer_ids(task)
        return _RowHead(self.lm_head(), self._tensor(ids), class_means(classes, len(task.labels), self.device))

    def vocab_head(self, task: TaskSpec) -> Head:
        return _RowHead(self.lm_head(), None)


def class_means(classes: list[int], n: int, device) -> torch.Tensor | None:
    """(W, C) matrix that averages word logits into class logits; None when each class has one word."""
    if len(classes) == n:
        return None
    avg = torch.zeros(len(classes), n, device=device)
    avg[torch.arange(len(classes)), torch.tensor(classes)] = 1.0
    return avg / avg.sum(0, keepdim=True)


def class_scores(words: torch.Tensor, classes: list[int], n: int) -> torch.Tensor:
    """Word logits [..., W] (word w of class classes[w]) as class logits [..., C]: each class the
    mean of its words."""
    means = class_means(classes, n, words.device)
    return words if means is None else words @ means


class _RowHead(Head):
    """Verbalizer logits of an LM head applied at one position per row (`words` None: every token's)."""

    def __init__(self, lm_head, words: torch.Tensor | None, means: torch.Tensor | None = None):
        self.lm_head, self.words, self.means = lm_head, words, means
        self.n_classes = None if words is None else (len(words) if means is None else means.shape[1])

    def __call__(self, hidden, mask, readout, at, length):
        return self.at_rows(hidden[torch.arange(hidden.shape[0], device=hidden.device), readout])

    def at_rows(self, states: torch.Tensor) -> torch.Tensor:
        """(B, H) final states at the read position -> (B, C), or (B, vocabulary) without words."""
        out = self.lm_head(states.float())  # the head is float32 in a bfloat16 model too (servers/precision.py)
        if self.words is None:
            return out
        out = out[:, self.words]
        return out if self.means is None else out @ self.means


# ---- causal LM ------------------------------------------------------------------------------

class CausalFamily(Family):
    name = "causal"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._heads: dict[tuple[int, ...], Head] = {}

    def encode_one(self, task: TaskSpec, ex: Example) -> tuple[list[int], int]:
        before_mask = task.template.split("{mask}")[0]
        # the class is read at the next token after before_mask: text placed after {mask} would be dropped
        needed = ["{text}"] + (["{text_pair}"] if ex.text_pair is not None else [])
        if any(field not in before_mask for field in needed):
            raise ConfigError(
                f"task {task.name!r}: a causal LM reads the class right after the input, so its template must put "
                f"{' and '.join(needed)} before {{mask}}; got {task.template!r}. Use a task file with such a template, "
                "e.g. '{text} ? {text_pair} . Answer: {mask}'"
            )
        text, pair = self.fit_texts(ex, self.template_overhead(task))
        prefix = before_mask.format(text=text, text_pair=pair or "")
        if not prefix.endswith("\n"):
            prefix = prefix.rstrip()  # a trailing space belongs to the verbalizer token in BPE vocabularies
        ids = self.tokenizer(prefix).input_ids
        eos = self.tokenizer.eos_token_id
        if len(ids) > 1 and eos is not None and ids[-1] == eos:
            ids = ids[:-1]
        return ids, len(ids) - 1

    def word_space(self, task: TaskSpec) -> bool:
        # after a line break the label word starts a line: no space before it
        return self.space_prefix and not task.template.split("{mask}")[0].endswith("\n")

    def head(self, task: TaskSpec) -> Head:
        ids, classes = self.verbalizer_ids(task)
        key = (tuple(ids), tuple(classes))
        if key not in self._heads:  # made once per verbalizer, not on every request
            out = self.model.get_output_embeddings()
            means = class_means(classes, len(task.labels), self.device)
            # not inference tensors, even when first asked for under inference mode: autograd may meet them later
            with torch.inference_mode(False), torch.no_grad():
                verb = self._tensor(ids)
                if isinstance(out, torch.nn.Linear):  # only W rows of the vocabulary matrix, not all of them
                    weight, bias = out.weight[verb], None if out.bias is None else out.bias[verb]
                    head = _RowHead(lambda h: F.linear(h, weight, bias), torch.arange(len(ids), device=self.device), means)
                else:
                    head = _RowHead(out, verb, means)
            if len(self._heads) > 64:
                self._heads.pop(next(iter(self._heads)))
            self._heads[key] = head
        return self._heads[key]

    def vocab_head(self, task: TaskSpec) -> Head:
        return _RowHead(self.model.get_output_embeddings(), None)


FAMILY_CLASSES: dict[str, type[Family]] = {"encoder": EncoderFamily, "masked": MaskedFamily, "causal": CausalFamily}


def leading_specials(tokenizer) -> int:
    """Special tokens the tokenizer puts before the text ([CLS], <s>, BOS): the prompt goes after them."""
    ids = tokenizer("hello").input_ids
    specials = set(tokenizer.all_special_ids)
    count = 0
    while count < len(ids) and ids[count] in specials:
        count += 1
    return count


def space_sensitive(tokenizer) -> bool:
    return tokenizer.encode("hello", add_special_tokens=False) != tokenizer.encode(" hello", add_special_tokens=False)
