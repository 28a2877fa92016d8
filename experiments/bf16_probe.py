"""Issue 40: how far bfloat16 moves SmolLM2's answers, population by population.

    python experiments/bf16_probe.py [--task sst2] [--populations 5] [--method bbt|bbtv2]

Loads SmolLM2 twice through bbt's engine, with `--dtype float32` and `--dtype bfloat16`
(`servers/precision.py`: norms, softmax and read-out in float32), and scores the same
populations of 20 candidates on the task's 16-shot train split (seed 42) in both: candidates as
the first generation of a run makes them (z ~ N(0, 1), projected by the run's A, around its p0;
BBTv2: the bottom layer's generation). Prints per population the seconds in each precision, the
largest class-logit difference, whether the best candidate (lowest training loss) is the same,
the rank correlation of the candidates' losses and the share of candidate pairs whose order
flips; then the totals. The task's own label words are read (no `--verbalizer auto` step).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--method", default="bbt", choices=["bbt", "bbtv2"])
    ap.add_argument("--populations", type=int, default=5)
    args = ap.parse_args()

    from bbt.backends import LocalBackend
    from bbt.config import TuneConfig, with_family_defaults
    from bbt.data import load_task_folder
    from bbt.protocol import EvaluateRequest, StatsRequest
    from bbt.tasks import for_family, resolve_task
    from bbt.prompt import Prompt
    from bbt.tuner import make_projections

    backends = {dt: LocalBackend(dtype=dt) for dt in ("float32", "bfloat16")}
    full = backends["float32"]
    info = full.model_info("smollm2")
    cfg = with_family_defaults(TuneConfig(model="smollm2", method=args.method, seed=42), info.family, info.modes)
    task = for_family(resolve_task(args.task, args.data / args.task), info.family)
    train = load_task_folder(args.data / args.task, task, seed=42).train
    layers = info.num_layers if cfg.method == "bbtv2" else 1
    stats = full.stats(StatsRequest(model=cfg.model, task=task, inputs=train.examples))
    prompt = Prompt(z=np.zeros((layers, cfg.intrinsic_dim)), projections=make_projections(cfg, info, layers, stats.hidden_std),
                    prompt_length=cfg.prompt_length)
    rng = np.random.default_rng(0)
    print(f"SmolLM2 {cfg.method}, {args.task} seed 42 train ({len(train)} inputs), populations of {cfg.popsize}, "
          f"L = {cfg.prompt_length}")
    print(f"{'pop':>4}{'s float32':>10}{'s bf16':>8}{'max |logit diff|':>18}{'same best':>10}{'rank corr':>10}{'pairs flipped':>14}")
    warm = EvaluateRequest(model=cfg.model, task=task, inputs=train.examples[:2], labels=train.labels[:2],
                           candidates=prompt.candidates(np.zeros((2, layers, cfg.intrinsic_dim))))
    for backend in backends.values():  # projection matrices, verbalizer rows: not timed
        backend.evaluate(warm)
    totals = {"gap": 0.0, "same": 0, "flips": [], "corr": [], "t32": 0.0, "t16": 0.0}
    for p in range(args.populations):
        z = np.zeros((cfg.popsize, layers, cfg.intrinsic_dim))
        z[:, 0] = rng.standard_normal((cfg.popsize, cfg.intrinsic_dim)) * cfg.sigma
        req = EvaluateRequest(model=cfg.model, task=task, inputs=train.examples, labels=train.labels, return_logits=True,
                              candidates=prompt.candidates(z))
        out, seconds = {}, {}
        for dt, backend in backends.items():
            start = time.perf_counter()
            out[dt] = backend.evaluate(req)
            seconds[dt] = time.perf_counter() - start
        totals["t32"] += seconds["float32"]
        totals["t16"] += seconds["bfloat16"]
        a, b = out["float32"], out["bfloat16"]
        gap = float(np.abs(a.logits.to_numpy() - b.logits.to_numpy()).max())
        la, lb = np.asarray(a.losses), np.asarray(b.losses)
        same = int(la.argmin() == lb.argmin())
        i, j = np.triu_indices(len(la), 1)
        flips = float(np.mean(np.sign(la[i] - la[j]) != np.sign(lb[i] - lb[j])))
        corr = float(np.corrcoef(np.argsort(np.argsort(la)), np.argsort(np.argsort(lb)))[0, 1])
        totals["gap"] = max(totals["gap"], gap)
        totals["same"] += same
        totals["flips"].append(flips)
        totals["corr"].append(corr)
        print(f"{p:>4}{seconds['float32']:>10.2f}{seconds['bfloat16']:>8.2f}{gap:>18.3f}"
              f"{'yes' if same else 'no':>10}{corr:>10.3f}{flips:>14.3f}", flush=True)
    n = args.populations
    print(f"\nover {n} populations: float32 {totals['t32'] / n:.2f} s, bfloat16 {totals['t16'] / n:.2f} s per population "
          f"({totals['t32'] / totals['t16']:.2f}x); largest class-logit difference {totals['gap']:.3f}; the same best "
          f"candidate in {totals['same']} of {n}; rank correlation {np.mean(totals['corr']):.3f} on average; "
          f"{100 * np.mean(totals['flips']):.1f}% of candidate pairs in the other order")


if __name__ == "__main__":
    main()
