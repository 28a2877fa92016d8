"""`bbt sweep`'s executors on this machine: wall time with --workers 1, --workers 2 and --ray, and
the queries one sweep pays against separate runs per budget.

    cd /work/main && . .venv/bin/activate
    python experiments/bench_sweep.py                  # 2 tasks x 3 seeds x 2 methods at 3 budgets, MiniLM
    python experiments/bench_sweep.py --executors 1 2  # skip Ray

Each executor runs the same `bbt sweep` command (a fresh process, the evaluation cache off so no
executor reuses another's answers) into its own folder under `--work`; the wall time covers the
whole command, model loads and process starts included. Then: the ratio of each executor's time
to `--workers 1`'s, whether every executor's results table equals the first one's, and the
queries paid (tuning and evaluation, from the cells' ledgers) against what one run per cell and
budget would pay (each budget's tuning queries plus the same evaluation queries again). An
executor already timed (its row in `--results`) is not run again; nothing else should use the
cores while this runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bbt import sweeps  # noqa: E402


def _command(args, executor: str, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "bbt.cli", "sweep", "--model", "minilm", "--tasks", *args.tasks,
           "--data-root", str(args.data_root),
           "--seeds", *map(str, args.seeds), "--methods", *args.methods, "--budgets", *map(str, args.budgets),
           "--prompt-length", str(args.prompt_length), "--test-limit", str(args.test_limit), "--out", str(out)]
    return cmd + (["--ray"] if executor == "ray" else ["--workers", executor])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["sst2", "rte"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[13, 42, 87])
    ap.add_argument("--methods", nargs="+", default=["bbt", "bbtv2"])
    ap.add_argument("--budgets", nargs="+", type=int, default=[20, 40, 60])
    ap.add_argument("--prompt-length", type=int, default=10)
    ap.add_argument("--test-limit", type=int, default=200)
    ap.add_argument("--executors", nargs="+", default=["1", "2", "ray"])
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-sweep")
    ap.add_argument("--results", type=Path, default=REPO / "experiments" / "results" / "sweep_timing.jsonl")
    args = ap.parse_args()

    grid = dict(tasks=args.tasks, seeds=args.seeds, methods=args.methods, budgets=args.budgets,
                prompt_length=args.prompt_length, test_limit=args.test_limit)
    done = {}
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            r = json.loads(line)
            if r["grid"] == grid:
                done[r["executor"]] = r
    env = {**os.environ, "BBT_CACHE": "off"}
    for executor in args.executors:
        if executor in done:
            continue
        out = args.work / f"workers-{executor}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        proc = subprocess.run(_command(args, executor, out), env=env, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        name = "--ray" if executor == "ray" else f"--workers {executor}"
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        rows = sweeps.rows(out)
        paid = {r["cell"]: r["queries_paid"] for r in rows}
        used = {r["cell"]: r["queries_used"] for r in rows if r["budget"] == max(args.budgets)}
        # what one run per budget would pay: each budget's tuning plus the same evaluation queries
        separate = sum(sum(min(b, used[c]) for b in args.budgets) + len(args.budgets) * (paid[c] - used[c])
                       for c in paid)
        row = {"grid": grid, "executor": executor, "seconds": round(seconds, 1), "cells": len(paid),
               "queries_paid": sum(paid.values()), "separate_runs": separate, "failed": len(sweeps.failures(out)),
               "table": sorted((r["cell"], r["budget"], round(r["test"], 6)) for r in rows)}
        with args.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[executor] = row
        print(f"{name}: {seconds:.0f} s", flush=True)

    first = done.get("1") or next(iter(done.values()))
    print(f"\n{len(args.tasks)} tasks x {len(args.seeds)} seeds x {len(args.methods)} methods = {first['cells']} cells, "
          f"budgets {args.budgets}, L = {args.prompt_length}, MiniLM, {os.cpu_count()} cores")
    print(f"{'executor':>10} {'seconds':>8} {'vs 1':>6} {'failed':>6} {'paid':>6} {'separate':>8}  same table")
    for executor in args.executors:
        r = done[executor]
        same = "yes" if r["table"] == first["table"] else "NO"
        name = "ray" if executor == "ray" else f"workers {executor}"
        print(f"{name:>10} {r['seconds']:8.0f} {first['seconds'] / r['seconds']:5.2f}x {r['failed']:6d} "
              f"{r['queries_paid']:6d} {r['separate_runs']:8d}  {same}")


if __name__ == "__main__":
    main()
