"""Budget sweep: test accuracy against queries spent, for the paper's settings and bbt's defaults.

    cd /work/main && . .venv/bin/activate
    python experiments/bench_budget.py                                  # paper (2000) vs bbt (500), 3 tasks x 3 seeds
    python experiments/bench_budget.py --tasks sst2 --seeds 42 --presets paper bbt
    python experiments/bench_budget.py --set prompt_length=10 popsize=10 --name L10k10 --budget 500
    python experiments/bench_budget.py --set model=smollm2 --name smollm2 --budget 500 \
        --results experiments/results/budget-smollm2.jsonl      # another model: its own results file

One in-process run (MiniLM, `LocalBackend`) per preset, task and seed, up to the preset's budget:
a cell of `bbt sweep` (`bbt.sweeps.run_cell`), whose run folder is kept under
`runs/bench-budget/PRESET-HASH/cells/`, so a run cut short resumes from its checkpoint. The sweep
scores the prompt the run would have returned (the best on dev so far) at 0 queries and at each
of `--at` query counts, so one run gives the whole curve. The point at q queries is the prompt after
the last complete generation within q queries: a run with budget q would have spent its rest on
one cut generation, so this is a slight under-estimate of it. At 0 queries: the untuned prompt.

Presets:
- paper: the BBT paper's settings (ICML 2022): L = 50, d = 500, population 20, sigma 1,
  cross-entropy, A uniform (PyTorch's Linear init), z kept in [-5, 5], p0 = embeddings of random
  vocabulary tokens.
- bbt: `TuneConfig()`, bbt's defaults as they were when the rows were measured: the task's own
  words (`verbalizer="manual"`, pinned here since `auto` became the default, so the rows stay this
  preset's).
- bbtv2: the same with `method="bbtv2"` (`experiments/bench_bbtv2.py compare` runs bbt and
  bbtv2 through this sweep, so both benchmarks share their runs).

Each finished run is appended to `--results` (JSONL, the format this script has always written,
so rows from before the port stay readable) with every setting it ran with, and runs already
there (same preset name, settings, budget, task and seed) are skipped, so an interrupted sweep
continues where it stopped. The test sample size is not part of that match. Prints one
table per task (mean over seeds, and the spread), the queries at which the last preset first
reaches the first one's accuracy at its full budget, the gap between the two per seed with its
standard error, and writes a plot with `--plot`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path

from bbt import sweeps
from bbt.backends import LocalBackend
from bbt.config import TuneConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
WORK = REPO / "runs" / "bench-budget"  # the sweep folders of the runs (checkpoints: a cut run resumes)

PRESETS: dict[str, tuple[dict, int]] = {  # name -> (settings, budget in queries)
    "paper": (dict(prompt_length=50, intrinsic_dim=500, popsize=20, sigma=1.0, loss="ce", projection="uniform",
                   bound=5.0, init="vocab", verbalizer="manual"), 2000),
    "bbt": (dict(verbalizer="manual"), 500),
    "bbtv2": (dict(method="bbtv2", verbalizer="manual"), 500),  # bbt's defaults with a prompt per layer: BBTv2 vs BBT at one budget
}


def sweep_one(backend, preset: str, settings: dict, budget: int, task_name: str, seed: int, data_dir: Path,
              at: list[int], test_limit: int | None, work: Path) -> dict:
    """One `bbt sweep` cell up to `budget` queries (a run folder under `work`, resumed if cut);
    test accuracy (points) of the prompt it returned at 0 queries and at each of `at`."""
    given, settings, config = settings, dict(settings), _resolved(settings)
    spec = sweeps.SweepSpec(tasks=[task_name], seeds=[seed], methods=[settings.pop("method", "bbt")],
                            budgets=sorted({0, budget, *(q for q in at if q <= budget)}), data_root=str(data_dir),
                            model=settings.pop("model", "minilm"), settings=settings, test_limit=test_limit)
    # one sweep folder per preset, budget and curve points: a cell there means exactly this run
    key = json.dumps([config, spec.budgets, test_limit, str(data_dir)], sort_keys=True)
    out = work / f"{preset}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    cell = spec.cells()[0]
    rows = sweeps.run_cell(spec, cell, out, backend, log=lambda *a: None)
    if rows is None:
        raise SystemExit(f"{out / 'cells' / cell.name} is held by another process ({cell.name}.claim)")
    metrics = json.loads((out / "cells" / cell.name / "metrics.json").read_text())
    return {"preset": preset, "settings": given, "config": config, "budget": budget,
            "task": task_name, "seed": seed, "test_examples": rows[0]["test_examples"], "metric": rows[0]["metric"],
            "no_prompt": 100 * rows[0]["no_prompt"], "curve": {str(r["budget"]): 100 * r["test"] for r in rows},
            "queries_used": metrics["queries_used"], "generations": metrics["generations"],
            "tuning_seconds": metrics["tuning_seconds"], "run": str(out / "cells" / cell.name)}


def _resolved(settings: dict) -> dict:
    """Every setting a preset runs with, defaults filled in (seed and budget aside): a row stays
    tied to what ran even if bbt's defaults change later."""
    return TuneConfig(**{"model": "minilm", **settings}).model_dump(mode="json", exclude={"seed", "budget"})  # as sweep_one


def _matches(row: dict, preset: str, config: dict, budget: int, task: str, seed: int) -> bool:
    """Whether `row` ran this preset's settings. A setting the row does not name (one added to bbt
    after it ran) is taken to have had its default, so new settings do not void old rows."""
    same = (row["preset"], row["budget"], row["task"], row["seed"]) == (preset, budget, task, seed)
    return same and all(config.get(k) == v for k, v in row.get("config", {}).items())


def find_row(rows: list[dict], preset: str, settings: dict, budget: int, task: str, seed: int) -> dict | None:
    """The finished run of this preset, task and seed in `rows`, if any."""
    config = _resolved(settings)
    return next((r for r in rows if _matches(r, preset, config, budget, task, seed)), None)


def load_rows(path: Path) -> list[dict]:
    """The finished runs of a results file (none if it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_missing(rows: list[dict], presets: dict[str, tuple[dict, int]], order: list[str], tasks: list[str],
                seeds: list[int], data: Path, at: list[int], test_limit: int | None, results: Path,
                work: Path = WORK) -> None:
    """Run every (task, seed, preset) not yet in `rows`, appending each finished run to `rows` and `results`."""
    backend = None
    for task in tasks:
        for seed in seeds:
            for name in order:
                settings, budget = presets[name]
                if find_row(rows, name, settings, budget, task, seed) is not None:
                    print(f"{name} {task} seed {seed}: in {results}, skipped", flush=True)
                    continue
                backend = backend or LocalBackend()
                print(f"{name} {task} seed {seed}: running ({budget} queries)", flush=True)
                r = sweep_one(backend, name, settings, budget, task, seed, data, at, test_limit, work)
                rows.append(r)
                results.parent.mkdir(parents=True, exist_ok=True)
                with results.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                last = r["curve"][str(max(int(q) for q in r["curve"]))]
                print(f"{name} {task} seed {seed}: {r['curve']['0']:.1f} -> {last:.1f} in {r['queries_used']} "
                      f"queries, {r['tuning_seconds']:.0f} s (no prompt {r['no_prompt']:.1f})", flush=True)
    if backend is not None:
        backend.close()


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in TuneConfig.model_fields:
            raise SystemExit(f"--set {item}: no such setting (have: {', '.join(TuneConfig.model_fields)})")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def paired_gaps(rows: list[dict], task: str, ref: str, q_ref: int, new: str, q_new: int) -> list[float]:
    """Per seed run by both presets: `new`'s test accuracy at q_new minus `ref`'s at q_ref (points)."""
    at = {(r["preset"], r["seed"]): r["curve"] for r in rows if r["task"] == task}
    seeds = sorted(s for p, s in at if p == ref and (new, s) in at)
    return [at[(new, s)][str(q_new)] - at[(ref, s)][str(q_ref)] for s in seeds
            if str(q_new) in at[(new, s)] and str(q_ref) in at[(ref, s)]]


def report(rows: list[dict], presets: list[str], tasks: list[str], plot: Path | None) -> None:
    """Mean curves per task and preset; where the last preset reaches the first one's final accuracy."""
    curves: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in rows:
        if r["preset"] in presets and r["task"] in tasks:
            for q, v in r["curve"].items():
                curves.setdefault((r["task"], r["preset"]), {}).setdefault(int(q), []).append(v)
    for task in tasks:
        have = [p for p in presets if (task, p) in curves]
        if not have:
            continue
        seeds = sorted({r["seed"] for r in rows if r["task"] == task and r["preset"] in have})
        plain = statistics.mean(r["no_prompt"] for r in rows if r["task"] == task)
        metric = next(r["metric"] for r in rows if r["task"] == task)
        print(f"\n{task}: test {metric} (points), mean over seeds "
              f"{' '.join(map(str, seeds))} [min..max]; no prompt {plain:.1f}")
        qs = sorted({q for p in have for q in curves[(task, p)]})
        print(f"{'queries':>8}" + "".join(f"{p:>22}" for p in have))
        for q in qs:
            cells = []
            for p in have:
                v = curves[(task, p)].get(q)
                cells.append(f"{statistics.mean(v):>8.1f} [{min(v):5.1f}..{max(v):5.1f}] n={len(v)}" if v else f"{'':>22}")
            print(f"{q:>8}" + "".join(f"{c:>22}" for c in cells))
    if len(presets) >= 2:
        ref, new = presets[0], presets[-1]
        print(f"\n{new} vs {ref} at its full budget (means over seeds):")
        for task in tasks:
            if (task, ref) not in curves or (task, new) not in curves:
                continue
            ref_curve, new_curve = curves[(task, ref)], curves[(task, new)]
            q_ref = max(ref_curve)
            target = statistics.mean(ref_curve[q_ref])
            reach = [q for q in sorted(new_curve) if statistics.mean(new_curve[q]) >= target]
            q_new = max(new_curve)
            print(f"  {task:<8} {ref} at {q_ref}: {target:.1f}; {new} at {q_new}: {statistics.mean(new_curve[q_new]):.1f}; "
                  + (f"{new} reaches {target:.1f} at {reach[0]} queries" if reach else f"{new} does not reach it"))
            gaps = paired_gaps(rows, task, ref, q_ref, new, q_new)
            if len(gaps) >= 2:
                # Runs with one seed share the train/dev split and the test sample, so the gap per seed is the
                # fair comparison; its standard error says whether three seeds can tell the two apart at all.
                se = statistics.stdev(gaps) / len(gaps) ** 0.5
                print(f"  {'':<8} per seed {new} - {ref}: {' '.join(f'{g:+.1f}' for g in gaps)}; "
                      f"mean {statistics.mean(gaps):+.1f} +- {se:.1f} (standard error)")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for p in presets:
                c = curves.get((task, p))
                if not c:
                    continue
                qs = sorted(c)
                color = f"C{presets.index(p)}"  # one color per preset in every panel
                ax.plot(qs, [statistics.mean(c[q]) for q in qs], marker="o", label=p, color=color)
                ax.fill_between(qs, [min(c[q]) for q in qs], [max(c[q]) for q in qs], alpha=0.15, color=color)
            ax.set_title(task)
            ax.set_xlabel("queries")
            ax.set_ylabel("test accuracy (points)")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"\nplot: {plot}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of task folders (default: %(default)s)")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "rte"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[13, 42, 87])
    ap.add_argument("--presets", nargs="*", default=["paper", "bbt"], help=f"of {', '.join(PRESETS)} (the first is the reference)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="an extra preset with these settings (with --name)")
    ap.add_argument("--name", default="custom", help="name of the --set preset")
    ap.add_argument("--budget", type=int, default=None, help="budget of the --set preset (queries; default 500)")
    ap.add_argument("--at", nargs="+", type=int, default=[100, 200, 300, 500, 1000, 1500, 2000],
                    help="query counts at which test accuracy is measured")
    ap.add_argument("--test-limit", type=int, default=500, help="score a seeded sample of at most N test examples")
    ap.add_argument("--results", type=Path, default=REPO / "experiments" / "results" / "budget.jsonl")
    ap.add_argument("--plot", type=Path, default=None, help="write the curves to this PNG")
    ap.add_argument("--report-only", action="store_true", help="print the table of --results, run nothing")
    args = ap.parse_args()

    presets = {name: PRESETS[name] for name in args.presets if name in PRESETS}
    unknown = [p for p in args.presets if p not in PRESETS]
    if args.set:
        presets[args.name] = (_parse_set(args.set), args.budget or 500)
    elif unknown:
        ap.error(f"unknown preset(s) {unknown}: have {', '.join(PRESETS)}, or give --set")
    order = [p for p in args.presets if p in presets] + ([args.name] if args.set and args.name not in args.presets else [])

    rows = load_rows(args.results)
    if not args.report_only:
        run_missing(rows, presets, order, args.tasks, args.seeds, args.data, args.at, args.test_limit, args.results)
    report(rows, order, args.tasks, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
