"""Which prompt should a run return? Selection rules compared on the same runs.

    cd /work/main && . .venv/bin/activate
    python experiments/selection.py --model smollm2 --tasks sst2 --seeds 42 13 87
    python experiments/selection.py --model minilm --tasks sst2 agnews rte
    python experiments/selection.py --report

The search does not depend on the rule that picks the prompt to return: CMA-ES is told train
losses only, and every new best on train is scored on dev (one query). So one run per cell, with
each dev-scored z kept, shows what every rule would have returned at every budget. This script
runs each cell once with bbt's defaults (`bbt.runs.run_tune`, into `runs/selection/`), keeps the
z of each dev check, then scores on the test sample (500, all of RTE) each z that some rule picks
at some budget, and the plain model (no soft prompt) on train + dev for the fallback rules.

Rules, among the dev-checked candidates within the budget (all of them bests on train when found):
- dev-metric: best dev accuracy, ties to lower dev loss (bbt's default `--select dev-metric`)
- dev-loss: lowest dev loss (`--select dev-loss`)
- pooled: best accuracy on train + dev together (64 inputs instead of 32), ties to lower loss
  (`--select train-dev`)
- pooled-loss: lowest loss on train + dev
- last: the last best on train (no selection on dev)
- RULE+plain: RULE, but the plain model when the plain model is at least as accurate on train + dev

Answers go through the evaluation cache (`runs/selection/cache.sqlite`), so a cell cut short
costs nothing already paid when run again. One JSON row per cell and budget in `--results`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from bbt import tuner
from bbt.backends import LocalBackend
from bbt.cache import CachedBackend, EvaluationCache
from bbt.config import TuneConfig
from bbt.data import TaskData, load_task_folder
from bbt.protocol import IntrinsicPrompts, Tensor
from bbt.rundir import load_artifact
from bbt.runs import run_tune
from bbt.scoring import evaluate_split, score_candidates
from bbt.tasks import for_family, resolve_task
from bbt.session import Session

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "selection"
RESULTS = REPO / "experiments" / "results" / "selection.jsonl"
RULES = ("dev-metric", "dev-loss", "pooled", "pooled-loss", "last")
BUDGETS = (100, 200, 300, 500)


SELECT = {"dev-metric": "dev-metric", "dev-loss": "dev-loss", "pooled": "train-dev"}  # rule -> --select value


def pick(cands: list[dict], rule: str) -> int:
    """Index of the candidate `rule` returns (the earliest on ties, as the tuner keeps the first).

    The rules `--select` offers rank through the tuner's own key, so this measures what a run returns.
    """
    def key(c: dict) -> tuple:
        if rule in SELECT:  # a candidate's train metric is its train accuracy: sst2, agnews and rte score accuracy
            dev = tuner.Evaluation(c["dev_loss"], c["dev_acc"], c["dev_acc"])
            train = tuner.Evaluation(c["train_loss"], c["train_acc"], c["train_acc"])
            return tuner._selection_key(dev, train, SELECT[rule])
        return (c["train_loss"] + c["dev_loss"],) if rule == "pooled-loss" else (-c["i"],)  # "last"

    return min(range(len(cands)), key=lambda i: (key(cands[i]), i))


def run_cell(backend, model: str, task_name: str, seed: int, data_root: Path, budget: int, test_limit: int) -> list[dict]:
    folder = WORK / f"{model}-{task_name}-{seed}"
    task = for_family(resolve_task(task_name, data_root / task_name), backend.model_info(model).family)
    data = load_task_folder(data_root / task_name, task, seed=seed)
    data = TaskData(data.train, data.dev, data.test.sample(test_limit), data.test_name, data.notes)
    cfg = TuneConfig(model=model, seed=seed, budget={"queries": budget}, verbalizer="manual")  # as the rows ran

    dev_z: list[np.ndarray] = []
    score = tuner.Scorer.score

    def recording(self, prompt, z, layer=None):  # keeps the z of each dev check (K = 1 on the dev split)
        if self.split is data.dev:
            dev_z.append(z[0].copy())
        return score(self, prompt, z, layer)

    tuner.Scorer.score = recording
    try:  # from scratch each time: the cache answers whatever an earlier try paid for
        metrics = run_tune(cfg, task, data, backend, folder, progress=False, log=lambda *a: None, replace=True)
    finally:
        tuner.Scorer.score = score
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    checked = [r for r in records if "dev_loss" in r]
    assert len(checked) == len(dev_z), (len(checked), len(dev_z))
    cands = [{"i": i, "queries": r["queries_used"], "train_loss": r["loss_min"], "train_acc": r["train_acc"],
              "dev_loss": r["dev_loss"], "dev_acc": r["dev_metric"]} for i, r in enumerate(checked)]

    art = load_artifact(folder)
    task = art.task
    plain_train, _ = evaluate_split(Session(backend, model), task, data.train, None)
    plain_dev, _ = evaluate_split(Session(backend, model), task, data.dev, None)
    plain_pooled = (plain_train.accuracy + plain_dev.accuracy) / 2

    budgets = [b for b in BUDGETS if b <= budget]
    picks = {(rule, b): pick([c for c in cands if c["queries"] <= b], rule)
             for rule in RULES for b in budgets if any(c["queries"] <= b for c in cands)}
    chosen = sorted(set(picks.values()))
    z = np.stack([dev_z[i] for i in chosen])  # (K, layers, d)
    prompts = IntrinsicPrompts(z=Tensor.from_numpy(z), projections=art.projections, prompt_length=art.prompt_length,
                               init_seed=art.init_seed, init_text=art.init_text)
    logits, _ = score_candidates(Session(backend, model), task, data.test, prompts, len(chosen))
    labels = np.asarray(data.test.labels)
    test = {i: float((logits[j].argmax(-1) == labels).mean()) for j, i in enumerate(chosen)}

    rows = []
    for b in budgets:
        row = {"model": model, "task": task_name, "seed": seed, "budget": b, "test_examples": len(data.test),
               "plain": metrics["no_prompt_test_acc"], "plain_train_dev": plain_pooled,
               "tuned_default": metrics["test_acc"] if b == budget else None, "candidates": len(cands)}
        for rule in RULES:
            if (rule, b) not in picks:
                continue
            c = cands[picks[rule, b]]
            row[rule] = test[c["i"]]
            keep_plain = (c["train_acc"] + c["dev_acc"]) / 2 <= plain_pooled
            row[f"{rule}+plain"] = row["plain"] if keep_plain else test[c["i"]]
            row[f"{rule}_queries"] = c["queries"]
        rows.append(row)
    return rows


def report(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    names = [r for rule in RULES for r in (rule, f"{rule}+plain")]
    for model in sorted({r["model"] for r in rows}):
        for b in BUDGETS:
            sel = [r for r in rows if r["model"] == model and r["budget"] == b]
            if not sel:
                continue
            print(f"\n{model}, {b} queries: mean test accuracy (points), gap to the plain model; seeds per task")
            print(f"{'task':8} {'n':>2} {'plain':>6} " + " ".join(f"{n:>16}" for n in names))
            tasks = sorted({r["task"] for r in sel})
            gaps = {n: [] for n in names}
            for t in tasks:
                rs = [r for r in sel if r["task"] == t]
                plain = statistics.mean(r["plain"] for r in rs) * 100
                cells = []
                for n in names:
                    vals = [r[n] * 100 for r in rs if r.get(n) is not None]
                    m = statistics.mean(vals) if vals else float("nan")
                    gaps[n].append(m - plain)
                    cells.append(f"{m:6.1f} ({m - plain:+5.1f})")
                print(f"{t:8} {len(rs):>2} {plain:6.1f} " + " ".join(f"{c:>16}" for c in cells))
            print(f"{'mean gap':17} " + " ".join(f"{statistics.mean(gaps[n]):>+16.1f}" for n in names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "rte"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[13, 42, 87])
    ap.add_argument("--budget", type=int, default=500, help="queries per run")
    ap.add_argument("--test-limit", type=int, default=500, help="test sample per cell")
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--report", action="store_true", help="only print the table of --results")
    args = ap.parse_args()
    if not args.report:
        done = set()
        if args.results.exists():
            done = {(r["model"], r["task"], r["seed"]) for r in map(json.loads, args.results.read_text().splitlines())}
        WORK.mkdir(parents=True, exist_ok=True)
        backend = CachedBackend(LocalBackend(), EvaluationCache(WORK / "cache.sqlite"))
        for task in args.tasks:
            for seed in args.seeds:
                if (args.model, task, seed) in done:
                    continue
                rows = run_cell(backend, args.model, task, seed, args.data_root, args.budget, args.test_limit)
                with args.results.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
                print(f"{args.model} {task} seed {seed}: plain {rows[-1]['plain']:.3f}, "
                      + ", ".join(f"{k} {rows[-1][k]:.3f}" for k in RULES), flush=True)
    report(args.results)


if __name__ == "__main__":
    main()
