"""Causal-LM templates for the built-in tasks, chosen on the 16-shot train + dev splits (never test).

    cd /work/main && . .venv/bin/activate
    python experiments/choose_templates.py                       # SmolLM2, every task, seeds 13 42 87
    python experiments/choose_templates.py --tasks sst2 rte --model smollm2

Each candidate (template, verbalizer) is scored with no soft prompt on train + dev of the given
seeds; the table prints accuracy per candidate, best first, and which one `bbt.tasks` uses
(`CAUSAL_TEMPLATES`). Results are appended to `--results` so a rerun only scores what is new.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bbt.backends import LocalBackend
from bbt.data import load_task_folder
from bbt.protocol import EvaluateRequest
from bbt.tasks import BUILTIN_TASKS, CAUSAL_TEMPLATES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"

_CHAT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"  # SmolLM2-Instruct's chat turns
_SENT_Q = "Is the sentiment of this review positive or negative?\n{text}"
CANDIDATES: dict[str, list[tuple[str, list[str]]]] = {
    "sst2": [
        ("{text} It was {mask}", ["bad", "great"]),
        ("Review: {text}\nSentiment: {mask}", ["negative", "positive"]),
        ("{text}\nIs this review positive or negative? Answer: {mask}", ["negative", "positive"]),
        ("Review: {text}\nDid the reviewer like the movie? {mask}", ["No", "Yes"]),
        (_CHAT.format(q=_SENT_Q) + "{mask}", ["Negative", "Positive"]),
        (_CHAT.format(q="Did the reviewer like the movie? Answer Yes or No.\n{text}") + "{mask}", ["No", "Yes"]),
    ],
    "agnews": [
        ("{text}\nTopic: {mask}", ["World", "Sports", "Business", "Tech"]),
        ("Article: {text}\nThis article is about {mask}", ["world", "sports", "business", "technology"]),
        ("{text}\nCategory (World, Sports, Business or Technology): {mask}", ["World", "Sports", "Business", "Technology"]),
        (_CHAT.format(q="Is this news article about World, Sports, Business or Technology?\n{text}") + "{mask}",
         ["World", "Sports", "Business", "Technology"]),
    ],
    "rte": [
        ("{text}\nQuestion: {text_pair} True or False?\nAnswer: {mask}", ["True", "False"]),
        ("{text} Question: {text_pair} Yes or No? Answer: {mask}", ["Yes", "No"]),
        ("{text}\nDoes this mean that \"{text_pair}\" is true? {mask}", ["Yes", "No"]),
        (_CHAT.format(q="{text}\nDoes it follow that \"{text_pair}\"? Answer Yes or No.") + "{mask}", ["Yes", "No"]),
    ],
    "mrpc": [
        ("Sentence 1: {text}\nSentence 2: {text_pair}\nDo both sentences mean the same thing? {mask}", ["No", "Yes"]),
        ("{text} Question: Does this mean the same as \"{text_pair}\"? Answer: {mask}", ["No", "Yes"]),
        (_CHAT.format(q="Do these two sentences mean the same thing? Answer Yes or No.\n1. {text}\n2. {text_pair}")
         + "{mask}", ["No", "Yes"]),
    ],
    "snli": [
        ("{text}\nQuestion: {text_pair} True, False or Neither?\nAnswer: {mask}", ["True", "Neither", "False"]),
        ("{text} Question: {text_pair} Yes, No or Maybe? Answer: {mask}", ["Yes", "Maybe", "No"]),
        (_CHAT.format(q="{text}\nIs it true that \"{text_pair}\"? Answer Yes, No or Maybe.") + "{mask}",
         ["Yes", "Maybe", "No"]),
    ],
    "dbpedia": [
        ("{text}\nCategory: {mask}", ["Company", "School", "Artist", "Athlete", "Politician", "Transportation",
                                       "Building", "Nature", "Village", "Animal", "Plant", "Album", "Film", "Book"]),
        ("{text}\nThis text is about a {mask}", ["company", "school", "artist", "athlete", "politician", "vehicle",
                                                   "building", "river", "village", "animal", "plant", "album", "film",
                                                   "book"]),
    ],
}
CANDIDATES["yelpp"] = [(t.replace("movie", "place"), v) for t, v in CANDIDATES["sst2"]]


def score(backend, model: str, task, examples, labels) -> float:
    correct = 0
    for start in range(0, len(examples), 500):
        req = EvaluateRequest(model=model, task=task, inputs=examples[start:start + 500], return_logits=True)
        logits = backend.evaluate(req).logits.to_numpy()[0]
        correct += int((logits.argmax(1) == np.asarray(labels[start:start + 500])).sum())
    return correct / len(examples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", nargs="+", default=list(CANDIDATES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[13, 42, 87])
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--results", type=Path, default=REPO / "experiments" / "results" / "templates.jsonl")
    args = ap.parse_args(argv)
    done = {}
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["task"], r["template"], tuple(r["verbalizer"]), tuple(r["seeds"]))] = r["accuracy"]
    backend = LocalBackend()
    for name in args.tasks:
        base = BUILTIN_TASKS[name]
        examples, labels = [], []
        for seed in args.seeds:
            data = load_task_folder(args.data_root / name, base, seed=seed)
            for split in (data.train, data.dev):
                examples += split.examples
                labels += split.labels
        rows = []
        for template, verbalizer in CANDIDATES[name]:
            key = (args.model, name, template, tuple(verbalizer), tuple(args.seeds))
            if key not in done:
                task = base.model_copy(update={"template": template, "verbalizer": verbalizer})
                done[key] = score(backend, args.model, task, examples, labels)
                with args.results.open("a") as f:
                    f.write(json.dumps({"model": args.model, "task": name, "template": template, "verbalizer": verbalizer,
                                        "seeds": args.seeds, "examples": len(examples), "accuracy": done[key]}) + "\n")
            rows.append((done[key], template, verbalizer))
        chosen = CAUSAL_TEMPLATES.get(name)
        print(f"\n{name} ({len(examples)} train+dev examples, seeds {' '.join(map(str, args.seeds))}, no prompt)")
        for acc, template, verbalizer in sorted(rows, key=lambda r: -r[0]):
            mark = "*" if chosen == (template, verbalizer) else " "
            print(f" {mark} {100 * acc:5.1f}  {template!r}  {'/'.join(verbalizer)}")
        sys.stdout.flush()
    print("\n* the template bbt.tasks.CAUSAL_TEMPLATES uses")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
