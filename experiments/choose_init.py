"""Starting points p0 (z = 0) scored on the 16-shot train + dev splits, beside the plain model.

    cd /work/main && . .venv/bin/activate
    python experiments/choose_init.py --model smollm2 --tasks sst2 agnews rte --lengths 10 20 50
    python experiments/choose_init.py --model minilm

A starting point costs no queries, so the search should start from the best one a user could
pick without looking at test data. For each task, seed and prompt length L, it scores the plain
model (no soft prompt) and the untuned prompt of each `--init` (zero, vocab, instruction,
demos) on train + dev, and prints mean accuracy over seeds. Rows are appended to `--results`;
a rerun scores only what is new.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bbt import starts
from bbt.backends import LocalBackend
from bbt.config import TuneConfig
from bbt.data import Split, load_task_folder
from bbt.scoring import evaluate_split
from bbt.protocol import StatsRequest
from bbt.tasks import BUILTIN_TASKS, for_family
from bbt.tuner import _INIT, derive_seed, start_state
from bbt.session import Session

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
INITS = ["zero", "vocab", "instruction", "demos"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "rte"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[13, 42, 87])
    ap.add_argument("--lengths", nargs="+", type=int, default=[10, 50])
    ap.add_argument("--inits", nargs="+", default=INITS, choices=INITS)
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--results", type=Path, default=REPO / "experiments" / "results" / "init.jsonl")
    args = ap.parse_args()

    done = {}
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["task"], r["seed"], r["length"], r["init"])] = r
    args.results.parent.mkdir(parents=True, exist_ok=True)

    with LocalBackend([args.model]) as backend:
        info = backend.model_info(args.model)
        for task_name in args.tasks:
            task = for_family(BUILTIN_TASKS[task_name], info.family)
            for seed in args.seeds:
                data = load_task_folder(args.data_root / task_name, task, seed=seed)
                both = Split(data.train.examples + data.dev.examples, data.train.labels + data.dev.labels)
                for length in args.lengths:
                    for init in ["plain", *args.inits]:
                        key = (args.model, task_name, seed, length, init)
                        if key in done or (init == "plain" and length != args.lengths[0]):
                            continue
                        cfg = TuneConfig(model=args.model, seed=seed, prompt_length=length, init=init if init != "plain" else "zero")
                        prompt = None
                        if init != "plain":
                            stats = backend.stats(StatsRequest(model=args.model, task=task, inputs=data.train.examples))
                            text = starts.init_text(cfg.init, task, None, data.train, stats.tokens, length,
                                                    derive_seed(seed, _INIT))
                            prompt = start_state(cfg, info, stats.hidden_std, text).prompt
                        ev, _ = evaluate_split(Session(backend, args.model), task, both, prompt)
                        row = dict(zip(("model", "task", "seed", "length", "init"), key), acc=ev.accuracy, loss=ev.loss)
                        done[key] = row
                        with args.results.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(json.dumps(row), flush=True)

    print(f"\n{args.model}: train+dev accuracy at z = 0, mean over seeds {args.seeds}")
    for task_name in args.tasks:
        plain = [done[(args.model, task_name, s, args.lengths[0], "plain")]["acc"] for s in args.seeds]
        print(f"{task_name:8s} plain {100 * np.mean(plain):5.1f}")
        for length in args.lengths:
            cells = [f"{init} {100 * np.mean([done[(args.model, task_name, s, length, init)]['acc'] for s in args.seeds]):5.1f}"
                     for init in args.inits]
            print(f"{'':8s} L={length:<3d} " + "  ".join(cells))


if __name__ == "__main__":
    main()
