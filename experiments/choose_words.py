"""Which number of words per class `--verbalizer auto` chooses, and what the plain model reads through them.

    cd /work/main && . .venv/bin/activate
    python experiments/choose_words.py --model minilm --tasks sst2 agnews rte
    python experiments/choose_words.py --model smollm2 --tasks sst2 agnews
    python experiments/choose_words.py --data-root runs/user-tasks --tasks film-reviews news-topics inference

A task that is not built in is read from its folder's task.json (the user tasks of
experiments/user_tasks.py, for one).

For each task and seed, runs the choice of `bbt.verbalizers.choose` (2 queries; an LM: 3) and
scores the model without a soft prompt on the seeded test sample through the words chosen, beside
its own words. No tuning: this isolates what the rule for K does, at a few seconds per cell on
MiniLM. Prints one JSON line per cell; `--out FILE` appends them there too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bbt import verbalizers
from bbt.backends import LocalBackend
from bbt.budget import Budget, Ledger
from bbt.data import load_task_folder
from bbt.scoring import evaluate_split
from bbt.tasks import BUILTIN_TASKS, for_family, resolve_task
from bbt.session import Session

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "rte"])
    p.add_argument("--seeds", nargs="+", type=int, default=[13, 42, 87])
    p.add_argument("--test-limit", type=int, default=500, help="seeded test sample, as in the sweeps")
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    backend = LocalBackend([args.model])
    family = backend.model_info(args.model).family
    for name in args.tasks:
        task = for_family(resolve_task(name if name in BUILTIN_TASKS else None, args.data_root / name), family)
        for seed in args.seeds:
            data = load_task_folder(args.data_root / name, task, seed=seed)
            test = data.test.sample(args.test_limit)
            plain, _ = evaluate_split(Session(backend, args.model), task, test, None)
            choice = verbalizers.choose(Session(backend, args.model, Ledger(Budget(queries=10))), task, data.train,
                                        data.dev)
            words = plain if choice.label_words == 1 else evaluate_split(Session(backend, args.model), choice.task, test,
                                                                         None)[0]
            row = {"model": args.model, "task": name, "seed": seed, "label_words": choice.label_words,
                   "held_out": {str(k): round(v, 4) for k, v in choice.held_out.items()}, "queries": choice.queries,
                   "no_prompt": round(100 * plain.accuracy, 1), "no_prompt_words": round(100 * words.accuracy, 1),
                   "test_examples": len(test)}
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
