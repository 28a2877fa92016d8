"""Issue 40's accuracy check: SmolLM2 BBTv2 with the defaults at 500 queries, float32 against
bfloat16, on sst2 and agnews x seeds 13, 42, 87, each run pinned to its own core.

    python experiments/bf16_accuracy.py --out runs/bf16-accuracy [--cores 0 1] [--only bfloat16]
    python experiments/bf16_accuracy.py --out runs/bf16-accuracy --report
    python experiments/bf16_accuracy.py --out runs/bf16-accuracy --tasks sst2 --seeds 21 100 --cores 1

Each cell is one `bbt tune --model smollm2 --method bbtv2 --task T --data ../shared/data/T --seed S
--budget 500 --test-limit 500 --dtype D --no-cache --quiet` in OUT/T-S-D, run under
`taskset -c CORE` with one torch thread; `--cores` run at once, longest cells first (float32 AG News last). Resumable: a
finished cell is skipped, a cut one continues with `bbt tune --resume`. `--report` prints, per
task and precision, the test accuracy (mean ± standard error over the seeds), the plain model's,
the gap to it, and the paired bfloat16 - float32 difference. The queries/s of cells that shared
the machine are not a speed figure (`experiments/bench_speed.py --dtype` is).

A float32 cell not run here is taken from `--recorded` (default: `experiments/results/remedies.jsonl`,
the runs of the same command in float32 on this machine's CPU that made `--verbalizer auto` the
default; `bbt sweep --model smollm2 --tasks T --data-root ../shared/data --seeds 13 42 87 --methods
bbtv2 --budgets 200 500 --set verbalizer=auto`, the same seeded test sample) and marked so; a cell
run here beside its recorded row shows whether today's code reproduces it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

TASKS, SEEDS, DTYPES = ("sst2", "agnews"), (13, 42, 87), ("float32", "bfloat16")
# seconds per cell on one core, roughly (float32 AG News about 33 min): the queue starts with the longest
GUESS = {("agnews", "float32"): 2000, ("agnews", "bfloat16"): 1000, ("sst2", "float32"): 600, ("sst2", "bfloat16"): 300}


def command(out: Path, task: str, seed: int, dtype: str, data_root: str) -> list[str]:
    folder = out / f"{task}-{seed}-{dtype}"
    if (folder / "config.json").exists():
        return ["bbt", "tune", "--resume", str(folder), "--no-cache", "--quiet"]
    return ["bbt", "tune", "--model", "smollm2", "--method", "bbtv2", "--task", task, "--data", f"{data_root}/{task}",
            "--seed", str(seed), "--budget", "500", "--test-limit", "500", "--dtype", dtype, "--no-cache", "--quiet",
            "--out", str(folder)]


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = [(t, s, d) for t in args.tasks for s in args.seeds for d in args.only or DTYPES
             if not (out / f"{t}-{s}-{d}" / "metrics.json").exists()]
    # longest first, but float32 AG News last: its GPU rows exist, the bfloat16 ones are what is new
    cells.sort(key=lambda c: ((c[0], c[2]) == ("agnews", "float32"), -GUESS[(c[0], c[2])]))
    print(f"{len(cells)} cells to run on cores {args.cores}", flush=True)
    lock = threading.Lock()

    def worker(core: int) -> None:
        while True:
            with lock:
                if not cells:
                    return
                task, seed, dtype = cells.pop(0)
            cmd = ["taskset", "-c", str(core), *command(out, task, seed, dtype, args.data_root)]
            start = time.time()
            with open(out / f"{task}-{seed}-{dtype}.log", "a") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
            print(f"core {core}: {task} seed {seed} {dtype}: rc {rc} in {time.time() - start:.0f} s", flush=True)

    threads = [threading.Thread(target=worker, args=(c,)) for c in args.cores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def recorded(path: Path) -> dict:
    """(task, seed) -> the float32 metrics of the recorded runs (test_acc, no_prompt_test_acc)."""
    rows = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        if r.get("model") == "smollm2" and r.get("remedy") == "verbalizer=auto" and r.get("budget") == 500:
            rows[(r["task"], r["seed"])] = {"test_acc": r["test"], "no_prompt_test_acc": r["no_prompt"], "recorded": True}
    return rows


def report(args) -> None:
    out = Path(args.out)
    rows, old = {}, {} if args.no_recorded else recorded(Path(args.recorded))
    for task in args.tasks:
        for seed in args.seeds:
            for dtype in DTYPES:
                path = out / f"{task}-{seed}-{dtype}" / "metrics.json"
                if path.exists():
                    rows[(task, seed, dtype)] = json.loads(path.read_text())
                elif dtype == "float32" and (task, seed) in old:
                    rows[(task, seed, dtype)] = old[(task, seed)]
    for (task, seed), r in old.items():
        ran = rows.get((task, seed, "float32"))
        if ran is not None and not ran.get("recorded"):
            same = round(ran["test_acc"], 4) == round(r["test_acc"], 4)
            print(f"{task} seed {seed} float32 run again: {100 * ran['test_acc']:.1f} against the recorded "
                  f"{100 * r['test_acc']:.1f} ({'reproduced' if same else 'NOT reproduced'})")

    def mean_se(values: list[float]) -> str:
        if not values:
            return "-"
        se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
        return f"{statistics.mean(values):.1f} ± {se:.1f}"

    print("| task | dtype | seeds | test acc | plain model | gap to plain | queries/s (shared machine) |")
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks:
        for dtype in DTYPES:
            got = [(s, rows[(task, s, dtype)]) for s in args.seeds if (task, s, dtype) in rows]
            acc = [100 * m["test_acc"] for _, m in got]
            gap = [100 * (m["test_acc"] - m["no_prompt_test_acc"]) for _, m in got]
            plain = sorted({round(100 * m["no_prompt_test_acc"], 1) for _, m in got})
            qps = [m["queries_per_second"] for _, m in got if "queries_per_second" in m]
            seeds = ", ".join(f"{s}{' (recorded)' if m.get('recorded') else ''}" for s, m in got)
            print(f"| {task} | {dtype} | {seeds or '-'} | {mean_se(acc)} | "
                  f"{'/'.join(f'{p:.1f}' for p in plain) or '-'} | {mean_se(gap)} | "
                  f"{f'{statistics.mean(qps):.2f}' if qps else '-'} |")
    print()
    print("| task | seed | float32 | bfloat16 | bfloat16 - float32 | words per class (float32, bfloat16) |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks:
        diffs = []
        for seed in args.seeds:
            a, b = rows.get((task, seed, "float32")), rows.get((task, seed, "bfloat16"))
            fa = f"{100 * a['test_acc']:.1f}" if a else "-"
            fb = f"{100 * b['test_acc']:.1f}" if b else "-"
            d = 100 * (b["test_acc"] - a["test_acc"]) if a and b else None
            if d is not None:
                diffs.append(d)
            words = ", ".join(str((m.get("verbalizer") or {}).get("label_words", "?")) if m else "-" for m in (a, b))
            print(f"| {task} | {seed} | {fa} | {fb} | {'-' if d is None else f'{d:+.1f}'} | {words} |")
        if diffs:
            print(f"| {task} | mean | | | {mean_se(diffs)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--cores", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--only", nargs="+", choices=DTYPES, help="run only these precisions")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="split seeds (the shared data has 13, 42, "
                    "87, 21 and 100)")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--recorded", default=str(Path(__file__).resolve().parent / "results" / "remedies.jsonl"),
                    help="float32 rows recorded earlier (--report)")
    ap.add_argument("--no-recorded", action="store_true",
                    help="--report only the cells run in OUT (recorded rows made by older code are left out)")
    args = ap.parse_args()
    if args.report:
        report(args)
    else:
        run(args)


if __name__ == "__main__":
    sys.exit(main())
