"""Do bbt's defaults generalise past the built-in tasks? User task folders, labels only.

    cd /work/main && . .venv/bin/activate
    python experiments/user_tasks.py                     # writes the folders under runs/user-tasks/
    bbt sweep --model minilm --tasks film-reviews news-topics inference --data-root runs/user-tasks \
        --seeds 13 42 87 --budgets 200 500 --out runs/user-sweep
    bbt sweep report runs/user-sweep

Each folder is what a user with their own data would write: a `task.json` with a name and label
names only (no template, verbalizer or label texts, so bbt's generic defaults apply), a pool
`train.jsonl` from which `--seed` draws the k-shot train and dev splits, and a `test.jsonl`. The
examples come from `../shared/data` (written under `runs/`, which git ignores, never into the
repository), under names that are not built-in tasks, with labels renamed, so nothing that bbt
keeps for the built-in tasks (templates, verbalizers, label texts, instructions) is used:

- film-reviews: SST-2 sentences, labels "negative", "positive"
- news-topics:  AG News articles, labels "world", "sports", "business", "technology"
- inference:    SNLI sentence pairs, labels "entailment", "neutral", "contradiction" (a task whose
                defaults were never looked at while bbt's defaults were chosen)

The pool of a folder is every example of the task's 16-shot train and dev splits (all five seeds)
and, for pair tasks, its labelled pool; the test file holds the task's test set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

USER_TASKS = {
    # folder name -> (source task, label names, pair)
    "film-reviews": ("sst2", ["negative", "positive"], False),
    "news-topics": ("agnews", ["world", "sports", "business", "technology"], False),
    "inference": ("snli", ["entailment", "neutral", "contradiction"], True),
}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build(name: str, source: Path, labels: list[str], pair: bool, out: Path) -> dict:
    """Write one user task folder from a shared-data task folder; returns counts per file."""
    seen, pool = set(), []
    files = sorted(source.glob("16shot/seed*/train.jsonl")) + sorted(source.glob("16shot/seed*/dev.jsonl"))
    if (source / "pool.jsonl").is_file():
        files.append(source / "pool.jsonl")
    for f in files:
        for ex in _read(f):
            key = (ex["text"], ex.get("text_pair"))
            if key not in seen:
                seen.add(key)
                pool.append(ex)
    test = [ex for ex in _read(source / "test.jsonl") if (ex["text"], ex.get("text_pair")) not in seen]
    out.mkdir(parents=True, exist_ok=True)
    task = {"name": name, "labels": labels, **({"pair": True} if pair else {})}
    (out / "task.json").write_text(json.dumps(task, indent=2) + "\n")
    for fname, rows in (("train.jsonl", pool), ("test.jsonl", test)):
        with (out / fname).open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"pool": len(pool), "test": len(test)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "user-tasks")
    args = ap.parse_args()
    for name, (src, labels, pair) in USER_TASKS.items():
        counts = build(name, args.data_root / src, labels, pair, args.out / name)
        print(f"{args.out / name}: {counts['pool']} pool examples, {counts['test']} test examples")


if __name__ == "__main__":
    main()
