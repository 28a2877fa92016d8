"""The remedies of BBT-RGB, each alone, beside the plain model and the defaults (issue 19's grid).

Each remedy is a `bbt sweep` with one setting changed, for example on MiniLM:

    bbt sweep --model minilm --tasks sst2 agnews --data-root ../shared/data --seeds 42 13 87 --budgets 500 \\
        --set folds=2 --out runs/rem-folds-minilm
    python experiments/remedies.py collect runs/rem-folds-minilm   # adds its cells to the results file
    python experiments/remedies.py report                          # the table

`collect` names each cell by the settings its run folder's config.json holds that differ from
the defaults (so a sweep's fixed `--set` values are kept, which its scores do not record), and
replaces earlier rows of the same cell. A model's defaults are its family's (on SmolLM2, a causal
LM: BBTv2 with `--init instruction`), so a SmolLM2 sweep with `--set local=cobyla`, which implies
BBT, is named "method=bbt local=cobyla". `report` adds the defaults' own runs: MiniLM's from the
budget sweep (experiments/results/budget.jsonl, preset "bbt"), SmolLM2's from the device sweep
(smollm2_gpu.jsonl: BBTv2 as "defaults", BBT as "method=bbt"), and `--init instruction`'s from
remedy_init_minilm.jsonl, and prints, per remedy and task, mean
test accuracy ± standard error over the seeds, the paired gap to the plain model, and the mean
gap over SST-2 and AG News (the issue's goal: +5 on both models).

The grid's reference is the defaults it started from, with the task's own words; since then
`--verbalizer auto` is the default, so the table calls the reference "manual words (earlier
defaults)" and `verbalizer=auto` "verbalizer=auto (defaults)".
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from bbt.config import FAMILY_DEFAULTS

RESULTS = Path(__file__).parent / "results"
KEYS = ("method", "init", "verbalizer", "label_words", "select", "folds", "local", "local_share", "local_dim")
DEFAULTS = {"method": "bbt", "init": "zero", "verbalizer": "manual", "label_words": None, "select": "dev-metric",
            "folds": 1, "local": "none", "local_share": 0.3, "local_dim": 20}
GOAL_TASKS = ("sst2", "agnews")
LABELS = {"defaults": "manual words (earlier defaults)", "verbalizer=auto": "verbalizer=auto (defaults)"}
FAMILY = {"minilm": "encoder", "smollm2": "causal"}


def defaults_of(model: str) -> dict:
    """The settings a run of `model` gets when none is given (its family's, over bbt's general ones)."""
    return {**DEFAULTS, **{k: v for k, v in FAMILY_DEFAULTS.get(FAMILY.get(model, ""), {}).items() if k in DEFAULTS}}


def remedy_of(config: dict) -> str:
    """'defaults', or the settings that differ from the model's defaults, e.g. 'folds=2'."""
    defaults = defaults_of(config.get("model", "minilm"))
    changed = [f"{k}={config.get(k)}" for k in KEYS if k in config and config.get(k) != defaults[k]]
    if "local=cobyla" in changed:  # the stage's own settings only matter with it
        changed = [c for c in changed if not c.startswith(("local_share=", "local_dim="))] + [
            f"{k}={config[k]}" for k in ("local_share", "local_dim") if config.get(k) != defaults[k]]
    return " ".join(changed) or "defaults"


def collect(sweeps: list[Path], results: Path) -> None:
    rows = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    new = []
    for sweep in sweeps:
        for scores in sorted(sweep.glob("cells/*/scores.json")):
            config = json.loads((scores.parent / "config.json").read_text())["config"]
            model = config.get("model", "minilm")
            for r in json.loads(scores.read_text()):
                new.append({"model": model, "remedy": remedy_of(config), **{k: r[k] for k in (
                    "task", "seed", "budget", "test", "no_prompt", "test_examples", "queries_used")}})
    key = lambda r: (r["model"], r["remedy"], r["task"], r["seed"], r["budget"])  # noqa: E731
    fresh = {key(r) for r in new}
    rows = [r for r in rows if key(r) not in fresh] + new
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(new)} rows from {len(sweeps)} sweep(s); {len(rows)} in {results}")


def curve_rows(r: dict, model: str, remedy: str) -> list[dict]:
    """One row of this file per point of a run's accuracy curve (points in percent)."""
    return [{"model": model, "remedy": remedy, "task": r["task"], "seed": r["seed"], "budget": int(b),
             "test": acc / 100, "no_prompt": r["no_prompt"] / 100, "test_examples": r["test_examples"],
             "queries_used": int(b)} for b, acc in r["curve"].items()]


def default_rows(budget_file: Path) -> list[dict]:
    """The defaults' runs (MiniLM, BBT) of the budget sweep, as rows of this file."""
    out = []
    for line in budget_file.read_text().splitlines():
        r = json.loads(line)
        if r.get("preset") == "bbt":
            out += curve_rows(r, "minilm", "defaults")
    return out


def gpu_rows(gpu_file: Path) -> list[dict]:
    """SmolLM2's runs with its defaults (BBTv2) and with BBT, from the device sweep, as rows of this file."""
    out = []
    for line in gpu_file.read_text().splitlines():
        r = json.loads(line)
        if r.get("settings"):
            continue
        remedy = "defaults" if r["method"] == defaults_of(r["model"])["method"] else f"method={r['method']}"
        out += curve_rows(r, r["model"], remedy)
    return out


def init_rows(init_file: Path) -> list[dict]:
    """`--init instruction` on MiniLM, swept before this script (its rows do not name the setting)."""
    out = []
    for line in init_file.read_text().splitlines():
        r = json.loads(line)
        out.append({"model": "minilm", "remedy": "init=instruction", **{k: r[k] for k in (
            "task", "seed", "budget", "test", "no_prompt", "test_examples", "queries_used")}})
    return out


def mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0)


def report(results: Path, budget_file: Path, budget: int) -> None:
    rows = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    rows += default_rows(budget_file) if budget_file.exists() else []
    rows += init_rows(RESULTS / "remedy_init_minilm.jsonl") if (RESULTS / "remedy_init_minilm.jsonl").exists() else []
    rows += gpu_rows(RESULTS / "smollm2_gpu.jsonl") if (RESULTS / "smollm2_gpu.jsonl").exists() else []
    cells: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        if r["budget"] == budget:
            cells[(r["model"], r["remedy"], r["task"])][r["seed"]] = r
    order = (*GOAL_TASKS, "rte")
    tasks = sorted({k[2] for k in cells}, key=lambda t: (order.index(t) if t in order else len(order), t))
    print(f"test accuracy at {budget} queries, mean ± standard error over seeds; (paired gap to the plain model)")
    print("| model | remedy | " + " | ".join(tasks) + " | mean gap, " + " + ".join(GOAL_TASKS) + " |")
    print("|---|---|" + "---|" * len(tasks) + "---|")
    plain_seen: dict[tuple, float] = {}
    for model, remedy in sorted({k[:2] for k in cells}, key=lambda k: (k[0], k[1] != "defaults", k[1])):
        line, goal = [], []
        for task in tasks:
            by_seed = cells.get((model, remedy, task))
            if not by_seed:
                line.append("")
                continue
            seeds = sorted(by_seed)
            acc, se = mean_se([100 * by_seed[s]["test"] for s in seeds])
            gap, _ = mean_se([100 * (by_seed[s]["test"] - by_seed[s]["no_prompt"]) for s in seeds])
            plain_seen[(model, task)] = 100 * statistics.mean(by_seed[s]["no_prompt"] for s in seeds)
            note = "" if len(seeds) == 3 else f" (seeds {', '.join(map(str, seeds))})"
            line.append(f"{acc:.1f} ± {se:.1f} ({gap:+.1f}){note}")
            if task in GOAL_TASKS:
                goal.append(gap)
        mean_gap = f"{statistics.mean(goal):+.1f}" if len(goal) == len(GOAL_TASKS) else ""
        print(f"| {model} | {LABELS.get(remedy, remedy)} | " + " | ".join(line) + f" | {mean_gap} |")
    print("plain model: " + ", ".join(f"{m} {t} {v:.1f}" for (m, t), v in sorted(plain_seen.items())))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="add sweep folders' cells to the results file")
    c.add_argument("sweeps", nargs="+", type=Path)
    r = sub.add_parser("report", help="print the table")
    r.add_argument("--budget", type=int, default=500)
    r.add_argument("--budget-results", type=Path, default=RESULTS / "budget.jsonl")
    for s in (c, r):
        s.add_argument("--results", type=Path, default=RESULTS / "remedies.jsonl")
    args = p.parse_args()
    if args.command == "collect":
        collect(args.sweeps, args.results)
    else:
        report(args.results, args.budget_results, args.budget)


if __name__ == "__main__":
    main()
