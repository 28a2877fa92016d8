"""Benchmark: BBT on SST-2 through the real `bbt tune` command; zero-prompt vs tuned test accuracy.

    cd /work/main && . .venv/bin/activate
    python experiments/bench_sst2.py                                  # seed 42, 2000 queries, MiniLM
    python experiments/bench_sst2.py --budget 400 --out runs/sst2-400
    python experiments/bench_sst2.py --budget 400 --popsize 10 --quiet   # other options go to bbt tune

Runs, as a subprocess in this interpreter (in-process backend; MiniLM unless --model is given):

    bbt tune --model minilm --task sst2 --data DATA --seed SEED --budget BUDGET --out OUT --no-cache [other options]

then reads OUT/metrics.json and prints the zero-prompt, no-prompt and tuned test accuracy, the gain
in points, queries used, tuning seconds (the search loop alone) and queries per second. OUT is a
temporary folder unless --out is given. DATA defaults to ../shared/data/sst2 beside the repo.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sst2"


def run_bbt_tune(data: Path, seed: int, budget: int, out: Path, extra: list[str]) -> dict:
    """`bbt tune` on SST-2 in a subprocess; returns its metrics.json."""
    # no evaluation cache unless asked for: answers from an earlier run would make the timings meaningless
    cache = [] if any(x.startswith("--cache") for x in extra) else ["--no-cache"]
    # MiniLM, as measured, unless the options name a model (bbt tune's default is now SmolLM2)
    model = [] if any(x == "--model" or x.startswith("--model=") for x in extra) else ["--model", "minilm"]
    cmd = [sys.executable, "-m", "bbt.cli", "tune", *model, "--task", "sst2", "--data", str(data), "--seed", str(seed),
           "--budget", str(budget), "--out", str(out), *cache, *extra]
    print("$ bbt " + " ".join(cmd[3:]), flush=True)
    done = subprocess.run(cmd, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"bbt tune failed with exit status {done.returncode}")
    return json.loads((out / "metrics.json").read_text())


def report(m: dict, wall: float) -> None:
    split = m.get("test_split", "test")
    gain = 100 * (m["test_acc"] - m["zero_prompt_test_acc"])
    qps = m.get("queries_per_second") or (m["queries_used"] / m["tuning_seconds"] if m["tuning_seconds"] else float("nan"))
    print()
    print(f"SST-2 {split} accuracy, zero prompt -> tuned: {100 * m['zero_prompt_test_acc']:.1f} -> "
          f"{100 * m['test_acc']:.1f} ({gain:+.1f} points)")
    print(f"{'zero_prompt_test_acc':<22}{m['zero_prompt_test_acc']:.4f}")
    print(f"{'test_acc':<22}{m['test_acc']:.4f}")
    if m.get("no_prompt_test_acc") is not None:  # the plain model, no soft prompt: the other baseline
        print(f"{'no_prompt_test_acc':<22}{m['no_prompt_test_acc']:.4f} "
              f"(tuned {100 * (m['test_acc'] - m['no_prompt_test_acc']):+.1f} points)")
    print(f"{'gain (points)':<22}{gain:+.2f}")
    print(f"{'dev_acc':<22}{m['dev_acc']:.4f}" if m.get("dev_acc") is not None else f"{'dev_acc':<22}-")
    print(f"{'queries_used':<22}{m['queries_used']}")
    print(f"{'tuning_seconds':<22}{m['tuning_seconds']:.2f}")
    print(f"{'queries/s':<22}{qps:.2f}")
    print(f"{'wall_seconds':<22}{m.get('wall_seconds', float('nan')):.2f} (bbt tune), {wall:.2f} (with start-up)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Options not listed here are passed on to bbt tune (see bbt tune --help).")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SST-2 task folder (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=42, help="16-shot split and search seed (default: 42)")
    ap.add_argument("--budget", type=int, default=2000, help="queries (default: 2000)")
    ap.add_argument("--out", type=Path, help="run folder to keep (default: a temporary folder)")
    args, extra = ap.parse_known_args()
    if not (args.data / "task.json").is_file():
        ap.error(f"no SST-2 task folder at {args.data}: pass --data DIR")

    start = time.perf_counter()
    if args.out is not None:
        metrics = run_bbt_tune(args.data.resolve(), args.seed, args.budget, args.out.resolve(), extra)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-sst2-") as tmp:
            metrics = run_bbt_tune(args.data.resolve(), args.seed, args.budget, Path(tmp) / "run", extra)
    report(metrics, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
