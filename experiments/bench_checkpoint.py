"""What a BBTv2 checkpoint of SmolLM2 costs per generation: MB written and seconds spent writing,
for the checkpoint code of two checkouts, measured in the same run (one after the other).

    python experiments/bench_checkpoint.py --before /tmp/base        # /tmp/base: a checkout of an earlier commit

The search state is SmolLM2's under BBTv2's defaults: 30 prompted layers, d = 500, 20 candidates
a generation, L = 10 prompt vectors of 576. Each generation moves one layer's CMA-ES (a real ask
and tell, layers in turn as BBTv2 visits them), appends a history record and, as an upper bound,
a point to the prompt's path, then checkpoints through that checkout's `bbt.checkpoint.save`
into a fresh folder. MB written: the files new or rewritten by that save. Print: per checkout,
the mean MB and milliseconds per generation (the first checkpoint apart: it writes every layer),
then after/before ratios. The timings need an idle machine; the MB do not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from bbt import checkpoint
from bbt.optimizer import CMAES
from bbt.projection import normal_spec
from bbt.tuner import Evaluation, Prompt, TuneState
try:
    from bbt.checkpoint import RunState
    path = Path(sys.argv[1]) / "state.json"
except ImportError:  # before checkpoints were JSON: RunState lived in bbt.runs, the file was state.pkl
    from bbt.runs import RunState
    path = Path(sys.argv[1]) / "state.pkl"
layers, d, popsize, length, hidden, generations = 30, 500, 20, 10, 576, int(sys.argv[2])
rng = np.random.default_rng(0)
prompt = Prompt(z=np.zeros((layers, d)), projections=[normal_spec(seed=l, d=d, D=length * hidden, target_std=0.02)
                                                      for l in range(layers)], prompt_length=length)
s = TuneState(prompt=prompt, optimizers=[CMAES(d, popsize=popsize, seed=l) for l in range(layers)],
              best_z=np.zeros((layers, d)))
state = RunState(plain=Evaluation(0.7, 0.5, 0.5), ledger_step=0, tuning=s)

def written(before):
    files = [path] + sorted(p for p in path.parent.rglob("*") if p.is_file() and p != path)
    now = {p: p.stat().st_mtime_ns for p in files if p.exists()}
    return now, sum(p.stat().st_size for p, t in now.items() if before.get(p) != t)

seen, rows = {}, []
for g in range(generations):
    es = s.optimizers[g % layers]
    x = es.ask()
    es.tell(x, rng.random(len(x)))
    s.best_z[g % layers] = es.mean
    prompt.z = s.best_z.copy()
    s.generation, s.ledger_step = g + 1, (g + 1) * popsize
    s.history.append({"generation": g + 1, "layer": g % layers, "loss_mean": 0.7, "loss_min": 0.6, "train_acc": 0.5,
                      "best_train_loss": 0.6, "queries_used": (g + 1) * popsize, "seconds": 1.0})
    s.path.append(((g + 1) * popsize, prompt.z.copy()))
    start = time.perf_counter()
    checkpoint.save(path, state)
    seconds = time.perf_counter() - start
    seen, size = written(seen)
    rows.append({"generation": g + 1, "mb": size / 1e6, "ms": 1000 * seconds})
print(json.dumps(rows))
"""


def measure(checkout: Path, generations: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        out = subprocess.run([sys.executable, "-c", WORKER, folder, str(generations)], env=env, cwd=folder,
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="a checkout of the earlier code (git worktree add DIR REV)")
    ap.add_argument("--after", default=str(Path(__file__).resolve().parent.parent), help="default: this checkout")
    ap.add_argument("--generations", type=int, default=25, help="25: a 500-query run at 20 candidates a generation")
    args = ap.parse_args()
    means = {}
    for label, checkout in (("before", args.before), ("after", args.after)):
        rows = measure(Path(checkout), args.generations)
        later = rows[1:]
        mb, ms = (sum(r[k] for r in later) / len(later) for k in ("mb", "ms"))
        means[label] = (mb, ms)
        print(f"{label:6} {checkout}: first checkpoint {rows[0]['mb']:.1f} MB in {rows[0]['ms']:.0f} ms; then "
              f"{mb:.2f} MB and {ms:.1f} ms per generation (mean of {len(later)}; the last {rows[-1]['mb']:.2f} MB)")
    (mb0, ms0), (mb1, ms1) = means["before"], means["after"]
    print(f"after / before: {mb1 / mb0:.2f}x the MB, {ms1 / ms0:.2f}x the time per generation")


if __name__ == "__main__":
    main()
