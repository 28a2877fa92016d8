"""Starting points of the search that cost no queries: p0 from an instruction or from demonstrations.

The search starts at z = 0, where the prompt is p0. Zeros are far off the embedding manifold and
random vocabulary tokens say nothing about the task; the text of an instruction, or a few
training examples written out with the template and their label word (in-context
demonstrations, as BBT-RGB initialises), start from a prompt the model can read. The client
only chooses the text: the server turns it into embeddings (`IntrinsicPrompts.init_text`).
"""

from __future__ import annotations

import numpy as np

from bbt.protocol import TaskSpec, words_of

# {labels}: the task's verbalizer words, "a, b or c", so an instruction names the words the head reads
INSTRUCTIONS: dict[str, str] = {
    "sst2": "Classify the sentiment of each review as {labels}.",
    "yelpp": "Classify the sentiment of each review as {labels}.",
    "agnews": "Classify each news article by its topic: {labels}.",
    "dbpedia": "Classify each text by the kind of thing it describes: {labels}.",
    "rte": "Read the text and answer whether the statement follows from it: {labels}.",
    "mrpc": "Decide whether the two sentences say the same thing: {labels}.",
    "snli": "Decide whether the first sentence implies the second: {labels}.",
}
GENERIC_INSTRUCTION = "Classify the text as {labels}."


def _word_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _separator(task: TaskSpec) -> str:
    """What goes between the prompt's text and the input: a newline where the template has lines."""
    return "\n" if "\n" in task.template else " "


def instruction(task: TaskSpec) -> str:
    """The default instruction for a task (built-in tasks by name; any other task from its labels)."""
    # a class with several words (an automatic verbalizer) is named by its first, the task's own
    words = [words_of(w)[0].strip() for w in task.verbalizer]
    return INSTRUCTIONS.get(task.name, GENERIC_INSTRUCTION).format(labels=_word_list(words))


def render(task: TaskSpec, text: str, text_pair: str | None, label: int) -> str:
    """One example written out with the task's template, its label word at {mask}."""
    return (task.template.replace("{text}", text).replace("{text_pair}", text_pair or "")
            .replace("{mask}", words_of(task.verbalizer[label])[0].strip()))


def demonstrations(task: TaskSpec, examples, labels: list[int], tokens: list[int], length: int, seed: int) -> str:
    """Training examples as in-context demonstrations filling about `length` tokens.

    One example per class in a seeded class order, the shortest of each class first (`tokens`:
    the server's count per example, template included), then the next-shortest round while it
    fits; the first round is always whole (the server keeps the last `length` tokens).
    """
    rng = np.random.default_rng(seed)
    n_classes = len(task.labels)
    order = rng.permutation(len(examples))  # breaks ties in length, and orders the classes
    by_class = [sorted((i for i in order if labels[i] == c), key=lambda i: tokens[i]) for c in range(n_classes)]
    classes = [c for c in rng.permutation(n_classes) if by_class[c]]
    sep = _separator(task)
    chosen: list[int] = []
    used = 0
    for r in range(max(map(len, by_class))):
        batch = [by_class[c][r] for c in classes if r < len(by_class[c])]
        cost = sum(tokens[i] + 2 for i in batch)  # + the label word and the separator
        if chosen and used + cost > length:
            break
        chosen += batch
        used += cost
    return sep.join(render(task, examples[i].text, examples[i].text_pair, labels[i]) for i in chosen) + sep


def init_text(init: str, task: TaskSpec, text: str | None, train, tokens: list[int], length: int, seed: int) -> str | None:
    """The text p0 is made from for `init` ("instruction" or "demos"); None for "zero" and "vocab"."""
    if init == "instruction":
        return (text or instruction(task)).rstrip() + _separator(task)
    if init == "demos":
        return demonstrations(task, train.examples, train.labels, tokens, length, seed)
    return None
