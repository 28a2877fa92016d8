"""Issue 40's speed check: `bbt tune` on SmolLM2 in float32 and in bfloat16, back to back, per task and method.

    python experiments/bench_precision.py --out runs/bench-precision
    python experiments/bench_precision.py --out runs/bench-precision --tasks sst2 --methods bbtv2 --test-limit 0

Each pair is the same `bbt tune --model smollm2 --method M --task T --data ../shared/data/T --seed 42
--budget 60 --no-cache --quiet --dtype D --out OUT/T-M-D` run in both precisions one after the
other (the order alternates between pairs), on an otherwise idle machine with torch's default
threads. Prints each run's `queries_per_second` (tuning queries over tuning time, from metrics.json),
the bfloat16 / float32 ratio, and the test accuracy beside the plain model's in each precision.
`--test-limit` scores a seeded sample of the test set (0: all of it, as the issue's command does);
it does not enter queries/s. A pair already in OUT is reported, not run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "agnews"])
    ap.add_argument("--methods", nargs="+", default=["bbtv2", "bbt"])
    ap.add_argument("--budget", type=int, default=60)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--test-limit", type=int, default=500, help="test examples scored (0: all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (task, method) in enumerate((t, m) for t in args.tasks for m in args.methods):
        order = DTYPES if i % 2 == 0 else DTYPES[::-1]
        got = {}
        for dtype in order:
            folder = out / f"{task}-{method}-{dtype}"
            if not (folder / "metrics.json").exists():
                cmd = ["bbt", "tune", "--model", "smollm2", "--method", method, "--task", task, "--data",
                       f"{args.data_root}/{task}", "--seed", str(args.seed), "--budget", str(args.budget), "--no-cache",
                       "--quiet", "--dtype", dtype, "--out", str(folder)]
                if args.test_limit:
                    cmd += ["--test-limit", str(args.test_limit)]
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            got[dtype] = json.loads((folder / "metrics.json").read_text())
        rows.append((task, method, got))
    print(f"\nSmolLM2, seed {args.seed}, {args.budget} queries, test: "
          f"{'all' if not args.test_limit else f'a seeded sample of {args.test_limit}'}")
    print(f"{'task':<8}{'method':<7}{'q/s float32':>12}{'q/s bfloat16':>13}{'ratio':>7}"
          f"{'test float32':>13}{'test bfloat16':>14}{'plain f32/bf16':>16}")
    for task, method, got in rows:
        a, b = got["float32"], got["bfloat16"]
        print(f"{task:<8}{method:<7}{a['queries_per_second']:>12.3f}{b['queries_per_second']:>13.3f}"
              f"{b['queries_per_second'] / a['queries_per_second']:>6.2f}x{100 * a['test_acc']:>13.1f}"
              f"{100 * b['test_acc']:>14.1f}{100 * a['no_prompt_test_acc']:>10.1f}/{100 * b['no_prompt_test_acc']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
