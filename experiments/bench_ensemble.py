"""Prompt ensembles against their members, and what scoring an ensemble costs.

    cd /work/main && . .venv/bin/activate
    python experiments/bench_ensemble.py                                  # MiniLM, sst2 agnews rte x 13 42 87
    python experiments/bench_ensemble.py --tasks sst2 --seeds 13 --members 3 --budget 100 --prompt-length 10

Each cell (task, split seed) is `bbt tune --ensemble M` with `--budget` queries per member (so M
times that in all) into `--work/TASK-SEED`: resumable, a finished cell is read back and a cut one
continues. The table: test metric (a seeded sample of `--test-limit` examples; all of RTE) of the
no-prompt model, the mean member, the member best on dev, and the ensemble by majority and by mean
vote; mean ± standard error over seeds. Then the cost of scoring the last cell's M members on its
test sample: one request of M candidates against M requests of one (requests and seconds, same
process, nothing else should run meanwhile). Finished cells are appended to `--results`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


from bbt import ensemble
from bbt.backends import LocalBackend
from bbt.budget import Budget, Ledger
from bbt.config import TuneConfig
from bbt.data import TaskData, load_task_folder
from bbt.rundir import INDEX_FILE, load_artifact, member_runs
from bbt.runs import run_ensemble
from bbt.scoring import evaluate_split
from bbt.sweeps import mean_se
from bbt.tasks import BUILTIN_TASKS, for_family
from bbt.session import Session

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def _mean_se(xs) -> str:
    mean, se = mean_se(list(xs))
    return f"{mean:5.1f} ± {se:3.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "rte"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[13, 42, 87])
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--budget", type=int, default=500, help="queries per member")
    ap.add_argument("--prompt-length", type=int, default=50)
    ap.add_argument("--init", default="zero", choices=["zero", "vocab", "instruction", "demos"])
    ap.add_argument("--method", default="bbt", choices=["bbt", "bbtv2"])
    ap.add_argument("--test-limit", type=int, default=500)
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-ensemble")
    ap.add_argument("--results", type=Path, default=REPO / "experiments" / "results" / "ensemble.jsonl")
    args = ap.parse_args()

    settings = dict(model=args.model, method=args.method, prompt_length=args.prompt_length, init=args.init,
                    verbalizer="manual")  # as the rows were measured
    name = f"{args.model}-{args.method}-L{args.prompt_length}-{args.init}-m{args.members}-q{args.budget}"
    rows = {}
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            r = json.loads(line)
            rows[(r["name"], r["task"], r["seed"])] = r
    args.results.parent.mkdir(parents=True, exist_ok=True)

    backend = LocalBackend([args.model])
    last = None
    for task_name in args.tasks:
        task = for_family(BUILTIN_TASKS[task_name], backend.model_info(args.model).family)
        for seed in args.seeds:
            data = load_task_folder(args.data_root / task_name, task, seed=seed)
            data = TaskData(data.train, data.dev, data.test.sample(args.test_limit), data.test_name, data.notes)
            last = (task, data, args.work / f"{name}-{task_name}-{seed}")
            if (name, task_name, seed) in rows:
                continue
            cfg = TuneConfig(**settings, seed=seed, budget=Budget(queries=args.budget * args.members))
            out = last[2]
            m = run_ensemble(cfg, args.members, task, data, backend, out, progress=False, log=lambda *a: None,
                             resume=(out / INDEX_FILE).exists())
            key = "acc" if task.metric == "acc" else "f1"
            row = {"name": name, "task": task_name, "seed": seed, "metric": task.metric, "test_examples": len(data.test),
                   "no_prompt": 100 * m["no_prompt_test_acc"], "members": [100 * x for x in m["member_test"]],
                   "mean_member": 100 * m["mean_member_test"], "best_dev_member": 100 * m["best_dev_member_test"],
                   "majority": 100 * m[f"test_{key}_majority_vote"], "mean_vote": 100 * m[f"test_{key}_mean_vote"],
                   "queries_used": m["queries_used"], "tuning_seconds": m["tuning_seconds"]}
            rows[(name, task_name, seed)] = row
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)

    print(f"\n{name}: test metric, mean ± standard error over seeds {args.seeds} "
          f"({args.members} members x {args.budget} queries)")
    print(f"{'task':8s} {'no prompt':>12s} {'mean member':>12s} {'best on dev':>12s} {'majority':>12s} {'mean vote':>12s}")
    for task_name in args.tasks:
        cells = [rows[(name, task_name, s)] for s in args.seeds if (name, task_name, s) in rows]
        if cells:
            print(f"{task_name:8s} " + " ".join(f"{_mean_se([c[k] for c in cells]):>12s}"
                                                for k in ("no_prompt", "mean_member", "best_dev_member", "majority", "mean_vote")))

    task, data, out = last
    prompts = [load_artifact(r).prompt() for r in member_runs([out])]
    together, apart = Ledger(Budget()), Ledger(Budget())
    t0 = time.perf_counter()
    ensemble.score_prompts(Session(backend, args.model, together), task, data.test, prompts)
    t1 = time.perf_counter()
    for p in prompts:
        evaluate_split(Session(backend, args.model, apart), task, data.test, p)
    t2 = time.perf_counter()
    print(f"\nscoring {len(prompts)} members on {len(data.test)} test examples: one population "
          f"{together.evaluation.requests} requests, {t1 - t0:.1f} s; one by one {apart.evaluation.requests} requests, "
          f"{t2 - t1:.1f} s ({apart.evaluation.requests / together.evaluation.requests:.0f}x the requests, "
          f"{(t2 - t1) / (t1 - t0):.2f}x the seconds)")


if __name__ == "__main__":
    main()
