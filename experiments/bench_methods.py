"""Black-box tuning against the gradient methods it replaces, on the same frozen model and data.

    cd /work/main && . .venv/bin/activate
    python experiments/bench_methods.py                                    # the whole grid (hours on 2 cores)
    python experiments/bench_methods.py --models minilm --tasks sst2 --seeds 42 --methods bbt prompt-tuning
    python experiments/bench_methods.py --report                           # the table from what has run

For each model, task and split seed: the manual prompt (the frozen model with its template, no
soft prompt: `no_prompt_test_acc`), BBT and BBTv2 at `--budget` queries, and Prompt Tuning,
P-Tuning, Prefix-Tuning and P-Tuning v2 through PEFT with the papers' optimizers. Test metric on a
seeded sample of `--test-limit` examples (all of RTE), mean ± standard error over seeds, beside
wall time, model passes (BBT: queries; gradient methods: forward + backward batches) and tunable
parameters. Each cell is a run folder under `--work`; finished cells are rows of `--results`
(JSONL), so a rerun does only what is missing and a cut BBT run resumes. A method a model cannot
run is reported as such. A BBT or BBTv2 cell that `bench_budget.py` already ran with the same
resolved settings, budget and test sample (its `bbt` and `bbtv2` presets, in `--reuse`), or that a
`bbt sweep` with the defaults ran on a device (`--device-rows`: SmolLM2 on an H200), is taken from
there instead of paid for again; its row says so (`"from"`), and a device row's seconds are the
device's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from bbt.backends import LocalBackend
from bbt.budget import Budget
from bbt.config import GRADIENT_METHODS, TuneConfig
from bbt.data import TaskData, load_task_folder
from bbt.errors import ConfigError
from bbt.runs import run_gradient, run_tune
from bbt.sweeps import mean_se
from bbt.tasks import BUILTIN_TASKS

import bench_budget  # beside this file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
METHODS = ["bbt", "bbtv2", *GRADIENT_METHODS]
# prompt length per model: the defaults this project uses for each (MiniLM: the paper's 50; SmolLM2: 10)
LENGTHS = {"minilm": 50, "smollm2": 10}


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    return out


def run_cell(backend, model: str, task_name: str, seed: int, method: str, args, extra: dict) -> dict:
    task = BUILTIN_TASKS[task_name]
    data = load_task_folder(args.data_root / task_name, task, seed=seed)
    data = TaskData(data.train, data.dev, data.test.sample(args.test_limit), data.test_name, data.notes)
    # every method reads the task's own words, as the gradient methods must
    settings = dict(model=model, method=method, seed=seed, prompt_length=LENGTHS.get(model, 50), verbalizer="manual",
                    **extra)
    out = args.work / f"{model}-{task_name}-{seed}-{method}"
    start = time.perf_counter()
    if method in GRADIENT_METHODS:
        cfg = TuneConfig(**settings)
        if out.exists() and not (out / "metrics.json").exists():
            shutil.rmtree(out)  # a gradient run cut short starts over (it is not resumable)
        m = json.loads((out / "metrics.json").read_text()) if out.exists() else run_gradient(
            cfg, task, data, backend, out, log=lambda *a: None)
        passes, params = m["forward_passes"] + m["backward_passes"], m["trainable_parameters"]
    else:
        cfg = TuneConfig(**settings, budget=Budget(queries=args.budget))
        m = run_tune(cfg, task, data, backend, out, progress=False, log=lambda *a: None,
                     resume=(out / "config.json").exists())
        layers = 1 if method == "bbt" else backend.model_info(model).num_layers
        passes, params = m["queries_used"], cfg.intrinsic_dim * layers
    key = "test_acc" if task.metric == "acc" else "test_f1"
    plain = "no_prompt_test_acc" if task.metric == "acc" else "no_prompt_test_f1"
    return {"model": model, "task": task_name, "seed": seed, "method": method, "settings": extra,
            "metric": task.metric, "test": 100 * m[key], "no_prompt": 100 * m[plain], "test_examples": len(data.test),
            "passes": passes, "parameters": params, "seconds": round(m.get("wall_seconds", time.perf_counter() - start), 1)}


def _n_test(args, task_name: str, seed: int) -> int:
    """Test examples a cell of this task scores (the seeded sample, or all of a smaller test set)."""
    task = BUILTIN_TASKS[task_name]
    return len(load_task_folder(args.data_root / task_name, task, seed=seed).test.sample(args.test_limit))


def reused_cell(budget_rows: list[dict], backend, model: str, task_name: str, seed: int, method: str, args,
                extra: dict) -> dict | None:
    """The BBT or BBTv2 cell as `bench_budget.py` already ran it (same resolved settings, budget,
    task, seed and test sample), as a row of this table; None if it has not."""
    if method not in ("bbt", "bbtv2") or extra:
        return None
    settings = dict(model=model, prompt_length=LENGTHS.get(model, 50), verbalizer="manual",
                    **({"method": method} if method == "bbtv2" else {}))
    got = bench_budget.find_row(budget_rows, method, settings, args.budget, task_name, seed)
    if got is None or str(args.budget) not in got["curve"]:
        return None
    n_test = _n_test(args, task_name, seed)
    if got["test_examples"] != n_test:
        return None
    layers = 1 if method == "bbt" else backend.model_info(model).num_layers
    return {"model": model, "task": task_name, "seed": seed, "method": method, "settings": extra,
            "metric": got["metric"], "test": got["curve"][str(args.budget)], "no_prompt": got["no_prompt"],
            "test_examples": n_test, "passes": got["queries_used"],
            "parameters": got["config"]["intrinsic_dim"] * layers, "seconds": got["tuning_seconds"],
            "from": f"{args.reuse.name} ({got['preset']} preset)"}


def device_cell(device_rows: list[dict], backend, model: str, task_name: str, seed: int, method: str, args,
                extra: dict) -> dict | None:
    """The BBT or BBTv2 cell from a `bbt sweep` run on a device (`--device-rows`: the same defaults,
    budget and test sample; only its timings are not comparable with this machine's); None if absent."""
    if method not in ("bbt", "bbtv2") or extra:
        return None
    got = next((r for r in device_rows if (r["model"], r["task"], r["seed"], r["method"]) == (model, task_name, seed, method)
                and not r.get("settings") and str(args.budget) in r.get("curve", {})), None)
    if got is None or got["test_examples"] != _n_test(args, task_name, seed):
        return None
    layers = 1 if method == "bbt" else backend.model_info(model).num_layers
    return {"model": model, "task": task_name, "seed": seed, "method": method, "settings": extra,
            "metric": got["metric"], "test": got["curve"][str(args.budget)], "no_prompt": got["no_prompt"],
            "test_examples": got["test_examples"], "passes": got["queries_used"],
            "parameters": TuneConfig().intrinsic_dim * layers, "seconds": got["tuning_seconds"],
            "from": f"{args.device_rows.name} ({got['device']})"}


def _mean_se(xs) -> str:
    mean, se = mean_se(list(xs))
    return f"{mean:5.1f} ± {se:3.1f}"


def report(rows: list[dict], models, tasks, seeds, methods, plot: Path | None) -> None:
    print(f"test metric, mean ± standard error over seeds {seeds}; 'manual' = the model with its template, no soft prompt")
    print(f"{'model':8s} {'task':7s} {'method':14s} {'test':>12s} {'gap to manual':>14s} {'seconds':>8s} "
          f"{'passes':>8s} {'params':>9s} seeds")
    bars = {}
    for model in models:
        for task in tasks:
            cells = {m: {r["seed"]: r for r in rows if (r["model"], r["task"], r["method"]) == (model, task, m)}
                     for m in methods}
            manual = {s: r["no_prompt"] for m in methods for s, r in cells[m].items() if "no_prompt" in r}
            if manual:
                print(f"{model:8s} {task:7s} {'manual':14s} {_mean_se([manual[s] for s in sorted(manual)]):>12s}")
                bars[(model, task, "manual")] = np.mean(list(manual.values()))
            for m in methods:
                got = [cells[m][s] for s in seeds if s in cells[m]]
                if not got:
                    continue
                if "error" in got[0]:
                    print(f"{model:8s} {task:7s} {m:14s} {'cannot run':>12s}   ({got[0]['error'][:70]})")
                    continue
                gaps = [r["test"] - r["no_prompt"] for r in got]
                print(f"{model:8s} {task:7s} {m:14s} {_mean_se([r['test'] for r in got]):>12s} {_mean_se(gaps):>14s} "
                      f"{np.mean([r['seconds'] for r in got]):8.0f} {np.mean([r['passes'] for r in got]):8.0f} "
                      f"{got[0]['parameters']:9d} {len(got)}")
                bars[(model, task, m)] = np.mean([r["test"] for r in got])
    if plot and bars:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = sorted({(k[0], k[1]) for k in bars})
        names = ["manual", *methods]
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar([g + i * width for g in range(len(groups))], [bars.get((*grp, name), 0) for grp in groups],
                   width, label=name)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], [f"{m}\n{t}" for m, t in groups])
        ax.set_ylabel("test metric (%)")
        low = min(bars.values())
        ax.set_ylim(max(0, 10 * (low // 10) - 10), 100)  # from below the lowest bar: the gaps are what it shows
        fig.legend(fontsize=7, ncol=4, loc="upper center", frameon=False)  # above the bars, not over them
        fig.tight_layout(rect=(0, 0, 1, 0.88))
        fig.savefig(plot, dpi=120)
        print(f"plot: {plot}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    ap.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "rte"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[13, 42, 87])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--budget", type=int, default=500, help="queries of a BBT or BBTv2 run")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TuneConfig settings for every cell")
    ap.add_argument("--test-limit", type=int, default=500)
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-methods")
    ap.add_argument("--results", type=Path, default=REPO / "experiments" / "results" / "methods.jsonl")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "results" / "methods.png")
    ap.add_argument("--reuse", type=Path, default=REPO / "experiments" / "results" / "budget.jsonl",
                    help="bench_budget.py's results: BBT and BBTv2 cells found there are not run again")
    ap.add_argument("--device-rows", type=Path, default=REPO / "experiments" / "results" / "smollm2_gpu.jsonl",
                    help="BBT and BBTv2 cells a `bbt sweep` ran on a device, taken as they are (their seconds are the device's)")
    ap.add_argument("--report", action="store_true", help="print the table of what has run; run nothing")
    args = ap.parse_args()

    extra = _parse_set(args.set)
    rows = [json.loads(x) for x in args.results.read_text().splitlines()] if args.results.exists() else []
    done = {(r["model"], r["task"], r["seed"], r["method"], json.dumps(r.get("settings", {}), sort_keys=True))
            for r in rows}
    if not args.report:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        budget_rows = bench_budget.load_rows(args.reuse)
        device_rows = bench_budget.load_rows(args.device_rows)
        for model in args.models:
            backend = LocalBackend([model])
            for task in args.tasks:
                for seed in args.seeds:
                    for method in args.methods:
                        if (model, task, seed, method, json.dumps(extra, sort_keys=True)) in done:
                            continue
                        try:
                            row = (reused_cell(budget_rows, backend, model, task, seed, method, args, extra)
                                   or device_cell(device_rows, backend, model, task, seed, method, args, extra)
                                   or run_cell(backend, model, task, seed, method, args, extra))
                        except ConfigError as exc:  # a method this model cannot run: say so, once per cell
                            row = {"model": model, "task": task, "seed": seed, "method": method, "settings": extra,
                                   "error": str(exc)}
                        rows.append(row)
                        with args.results.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(json.dumps(row), flush=True)
    report(rows, args.models, args.tasks, args.seeds, args.methods, args.plot)


if __name__ == "__main__":
    main()
