"""How far can an input soft prompt lift the plain model on one split? An oracle, not a method.

    cd /work/main && . .venv/bin/activate
    python experiments/prompt_ceiling.py --model minilm --task sst2 --seed 42 --test-limit 300

Trains gradient Prompt Tuning (PEFT, the same input prompt BBT searches through A, with all of
its L x H numbers free and the paper's optimizer) on the 16-shot training split, and scores the
test sample after every epoch. The best of those test scores is what the most favourable choice
of epoch would return: a selection rule that peeks at the test set, which no run may do. If even
that stays short of a target gap to the plain model, the target is out of reach of an input
prompt tuned on this split's training data. Prints the plain model and each epoch, as JSON lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bbt.backends import LocalBackend
from bbt.data import load_task_folder
from bbt.runs import evaluate_split
from bbt.tasks import BUILTIN_TASKS, for_family

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="sst2")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--prompt-length", type=int, default=50)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--test-limit", type=int, default=300, help="seeded test sample (each epoch scores it)")
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    args = p.parse_args()

    from servers import gradient  # the model side: torch, PEFT

    backend = LocalBackend([args.model])
    pm = backend.service.get(args.model)
    task = for_family(BUILTIN_TASKS[args.task], pm.family.name)
    data = load_task_folder(args.data_root / args.task, task, seed=args.seed)
    test = data.test.sample(args.test_limit)
    plain, _ = evaluate_split(backend, args.model, task, test, None)
    print(json.dumps({"plain": round(100 * plain.accuracy, 1), "test_examples": len(test)}), flush=True)
    # test in the place of dev: the "best dev epoch" is then the epoch best on test (the oracle)
    result = gradient.train(pm, task, data.train.examples, list(data.train.labels), test.examples, list(test.labels),
                            method="prompt-tuning", length=args.prompt_length, seed=args.seed, epochs=args.epochs,
                            patience=None,
                            on_epoch=lambda r: print(json.dumps({"epoch": r["epoch"], "train_loss": round(r["train_loss"], 4),
                                                                 "test": round(100 * r["dev_metric"], 1)}), flush=True))
    best = max(h["dev_metric"] for h in result.history)
    print(json.dumps({"plain": round(100 * plain.accuracy, 1), "oracle_best_epoch": result.best_epoch,
                      "oracle_test": round(100 * best, 1), "gap": round(100 * (best - plain.accuracy), 1)}), flush=True)


if __name__ == "__main__":
    main()
