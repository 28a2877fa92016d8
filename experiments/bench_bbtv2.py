"""Benchmark: BBTv2's layer reuse (queries/s with and without), and BBTv2 vs BBT at equal budgets.

    cd /work/main && . .venv/bin/activate
    python experiments/bench_bbtv2.py reuse                       # MiniLM, SST-2 seed 42: speed only
    python experiments/bench_bbtv2.py reuse --layers 12           # the same shape with 12 layers (random weights)
    python experiments/bench_bbtv2.py reuse --model smollm2 --repeats 1   # 30 Llama layers (about 20 minutes)
    python experiments/bench_bbtv2.py reuse --model smollm2 --repeats 1 --dtype float32 bfloat16   # issue 40
    python experiments/bench_bbtv2.py compare                     # sst2 agnews rte x seeds 13 42 87, 500 queries
    python experiments/bench_bbtv2.py compare --tasks sst2 --seeds 42 --budget 600
    python experiments/bench_bbtv2.py                             # both

reuse: `--repeats` BBTv2 rounds, one generation per layer bottom to top (population 20, L = 50,
d = 500, every other layer at a nonzero z, as in the middle of a run), scored in process on the 32
training examples with the model's layer reuse on and off, back to back in alternating order, so
both modes see the same machine load. Before each generation the layer below gets a new best z,
as when every generation improves: the worst case for the states the model keeps between
requests (each lower pass then runs one layer). Prints queries/s per layer and for a whole round
(what a BBTv2 run does over and over), the speedup, the ideal speedup in matmul work (only the
layers from the tuned one up per candidate, the tuned one without its query/key/value matmuls on
BERT-style layers, and one lower layer once per generation), and the largest logit difference
between the two modes. With `--layers N` the model is MiniLM's architecture with N layers and
random weights (timings only: the ideal speedup grows with depth). With `--dtype float32 bfloat16`
the whole measurement runs once per precision (`servers/precision.py`), and the end compares a
round's queries/s with layer reuse in each, beside each precision's matmul peak (2048 x 2048, best
GFLOP/s) measured in the same run.

compare: BBT and BBTv2 with bbt's default settings for each task and seed at the same query
budget, in process: the runs of `bench_budget.py`'s bbt and bbtv2 presets, so runs already in its
results file are not run again (and an interrupted comparison goes on where it stopped). Prints
zero-prompt (z = 0), no-prompt and tuned test scores per run, then the mean per task and method, on
a seeded sample of at most `--test-limit` test examples (AG News has 7,600).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bbt.backends import LocalBackend
from bbt.config import TuneConfig
from bbt.data import load_task_folder
from bbt.protocol import EvaluateRequest, StatsRequest
from bbt.tasks import for_family, resolve_task
from bbt.prompt import Prompt
from bbt.tuner import make_projections

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _deeper_minilm(layers: int, folder: Path) -> str:
    """A copy of MiniLM with `layers` layers and random weights (seeded), for timings only."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from servers.loading import resolve_model_path

    src = resolve_model_path("minilm")
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = BertConfig.from_pretrained(src)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return str(folder)


def bench_reuse(args, dtype: str = "float32") -> float:
    """Prints the reuse table in `dtype`; returns a round's queries/s with layer reuse."""
    from servers.fastpaths import BertLayer as _BertLayer

    tmp = tempfile.TemporaryDirectory(prefix="bench-bbtv2-model-")
    model_name = args.model if args.layers is None else _deeper_minilm(args.layers, Path(tmp.name) / "model")
    backend = LocalBackend(dtype=dtype)
    cfg = TuneConfig(method="bbtv2", seed=42, model=model_name)
    info = backend.model_info(cfg.model)
    task = for_family(resolve_task("sst2", args.data / "sst2"), info.family)
    train = load_task_folder(args.data / "sst2", task, seed=42).train
    layers = info.num_layers
    stats = backend.stats(StatsRequest(model=cfg.model, task=task, inputs=train.examples))
    prompt = Prompt(z=np.zeros((layers, cfg.intrinsic_dim)), projections=make_projections(cfg, info, layers, stats.hidden_std),
                    prompt_length=cfg.prompt_length)
    model = backend.service.get(cfg.model)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(layers, cfg.intrinsic_dim))  # the other layers' current best z

    def request(layer: int) -> EvaluateRequest:
        if layer > 0:
            base[layer - 1] = rng.normal(size=cfg.intrinsic_dim)  # the layer below just found a better z
        z = np.repeat(base[None], cfg.popsize, axis=0)
        z[:, layer] = rng.normal(size=(cfg.popsize, cfg.intrinsic_dim))
        return EvaluateRequest(model=cfg.model, task=task, inputs=train.examples, labels=train.labels,
                               return_logits=True, candidates=prompt.candidates(z, layer=layer or None))

    def timed(req: EvaluateRequest, reuse: bool) -> tuple[float, np.ndarray]:
        model.reuse_lower_layers = reuse
        start = time.perf_counter()
        logits = backend.evaluate(req).logits.to_numpy()
        return time.perf_counter() - start, logits

    label = cfg.model if args.layers is None else "MiniLM's shape with random weights"
    print(f"layer reuse, {label} ({layers} layers) in {dtype}, SST-2 seed 42: {len(train)} train examples, population "
          f"{cfg.popsize}, L={cfg.prompt_length}, d={cfg.intrinsic_dim}; {args.repeats} rounds, each mode once "
          "per generation")
    timed(request(0), True)  # warm-up: label embeddings, projection matrices, allocator
    times: dict[int, dict[bool, list[float]]] = {layer: {True: [], False: []} for layer in range(layers)}
    diff = [0.0] * layers
    for r in range(args.repeats):
        for layer in range(layers):
            req = request(layer)
            order = (True, False) if (r + layer) % 2 == 0 else (False, True)
            out = {}
            for reuse in order:
                seconds, out[reuse] = timed(req, reuse)
                times[layer][reuse].append(seconds)
            diff[layer] = max(diff[layer], float(np.abs(out[True] - out[False]).max()))
    rows, total = [], {True: 0.0, False: 0.0}
    for layer in range(layers):
        med = {m: statistics.median(t) for m, t in times[layer].items()}
        total[True] += med[True]
        total[False] += med[False]
        rows.append((layer, cfg.popsize / med[False], cfg.popsize / med[True], med[False] / med[True], diff[layer]))
    model.reuse_lower_layers = True
    print(f"\n{'layer':>5} {'q/s without':>12} {'q/s with':>10} {'speedup':>8} {'max |logit diff|':>17}")
    for layer, without, with_, speedup, most in rows:
        print(f"{layer:>5} {without:>12.2f} {with_:>10.2f} {speedup:>7.2f}x {most:>17.2e}")
    # Ideal, in matmul work per candidate (a layer ~12 H^2 per row: 3 for query/key/value, 1 for the
    # attention output, 8 for the feed-forward block): only layers l.. run; layer l >= 1 skips its
    # query/key/value matmuls when they are shared (BERT-style layers: `_SharedQKV`); layer l-1
    # and those shared projections run once per generation (1/K each). With the top layer run at
    # the rows the head reads (a fraction `read` of them), it costs `top`: keys and values at every row.
    bert = _BertLayer.fits(model.layers[-1])
    read = 1.0
    if model.top_rows_only and bert:
        enc = model.encode(task, train.examples)
        read = sum(enc.tokens) / (sum(enc.tokens) + len(train) * cfg.prompt_length)
    elif model.top_rows_only and model.decoder is not None:  # one row per example: the last token
        read = len(train) / sum(model.encode(task, train.examples).tokens)
    top = (2 + 10 * read) / 12

    def cost(layer: int) -> float:  # one candidate's share of a generation tuning `layer`
        if layer == 0:
            return layers - 1 + top  # nothing to reuse
        once = (1 + (0.25 if bert else 0.0)) / cfg.popsize  # layer l-1, and the shared projections
        if layer == layers - 1:
            return (top - (2 + read) / 12 if bert else top) + once
        return (0.75 if bert else 1.0) + (layers - 2 - layer) + top + once

    ideal = layers * cost(0) / sum(cost(layer) for layer in range(layers))
    print(f"\na round (one generation per layer): {layers * cfg.popsize / total[False]:.2f} -> "
          f"{layers * cfg.popsize / total[True]:.2f} queries/s with layer reuse, {total[False] / total[True]:.2f}x "
          f"(ideal in matmul work: {ideal:.2f}x; layers l.. per candidate"
          + (", layer l without its query/key/value matmuls" if bert else "") + ", layer l-1 once)")
    if top < 1:
        print(f"(in both modes the top layer runs only at the rows the head reads: about {top:.2f} of a layer's work)")
    backend.close()
    tmp.cleanup()
    return layers * cfg.popsize / total[True]


def bench_compare(args) -> None:
    """BBT and BBTv2 at one budget: the runs of `bench_budget.py`'s bbt and bbtv2 presets."""
    import bench_budget  # beside this file

    presets = {"bbt": ({}, args.budget), "bbtv2": ({"method": "bbtv2"}, args.budget)}
    rows = bench_budget.load_rows(args.results)
    print(f"BBTv2 vs BBT: tasks {' '.join(args.tasks)}, seeds {' '.join(map(str, args.seeds))}, budget {args.budget} "
          f"queries each, default settings (MiniLM, L=50, d=500, population 20); test scored on a seeded sample of "
          f"at most {args.test_limit} examples; runs kept in {args.results}", flush=True)
    bench_budget.run_missing(rows, presets, list(presets), args.tasks, args.seeds, args.data,
                             [args.budget], args.test_limit, args.results)
    found = {(t, s_, m): bench_budget.find_row(rows, m, *presets[m], t, s_)
             for t in args.tasks for s_ in args.seeds for m in presets}
    print(f"\n{'task':<8}{'seed':>5} {'method':<7}{'zero':>7}{'no prompt':>10}{'tuned':>7}{'queries':>8}{'test n':>7}")
    for (name, seed, method), r in found.items():
        print(f"{name:<8}{seed:>5} {method:<7}{r['curve']['0']:>7.1f}{r['no_prompt']:>10.1f}"
              f"{r['curve'][str(args.budget)]:>7.1f}{r['queries_used']:>8}{r['test_examples']:>7}")
    print(f"\nmean test score over seeds {' '.join(map(str, args.seeds))} (points)")
    print(f"{'task':<8}{'zero':>7}{'no prompt':>10}{'BBT':>7}{'BBTv2':>7}{'BBTv2-BBT':>10}")
    means: dict[str, list[float]] = {"bbt": [], "bbtv2": []}
    for name in args.tasks:
        runs = {m: [found[(name, s_, m)] for s_ in args.seeds] for m in presets}
        row = {m: statistics.mean(r["curve"][str(args.budget)] for r in runs[m]) for m in presets}
        zero = statistics.mean(r["curve"]["0"] for r in runs["bbt"])
        plain = statistics.mean(r["no_prompt"] for r in runs["bbt"])
        for m in presets:
            means[m].append(row[m])
        print(f"{name:<8}{zero:>7.1f}{plain:>10.1f}{row['bbt']:>7.1f}{row['bbtv2']:>7.1f}{row['bbtv2'] - row['bbt']:>+10.1f}")
    if len(args.tasks) > 1:
        bbt, v2 = statistics.mean(means["bbt"]), statistics.mean(means["bbtv2"])
        print(f"{'mean':<8}{'':>7}{'':>10}{bbt:>7.1f}{v2:>7.1f}{v2 - bbt:>+10.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", nargs="?", choices=["reuse", "compare", "both"], default="both")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of task folders (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="reuse: rounds timed, each layer paired once per round "
                    "(medians are printed)")
    ap.add_argument("--model", default="minilm", help="reuse: the model timed (minilm, smollm2, a folder)")
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="reuse: the precisions timed, one after the other")
    ap.add_argument("--layers", type=int, default=None, help="reuse: time MiniLM's shape with this many layers instead")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "rte"], help="compare: task folders under --data")
    ap.add_argument("--seeds", nargs="+", type=int, default=[13, 42, 87], help="compare: 16-shot splits and search seeds")
    ap.add_argument("--budget", type=int, default=500, help="compare: queries per run, both methods (500: the "
                    "budget sweep's runs)")
    ap.add_argument("--test-limit", type=int, default=500, help="compare: score a seeded sample of at most N test examples")
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results" / "budget.jsonl",
                    help="compare: the budget sweep's results file, where finished runs are kept and reused")
    args = ap.parse_args()
    if not (args.data / "sst2" / "task.json").is_file():
        ap.error(f"no task folders under {args.data}: pass --data DIR")
    if args.part in ("reuse", "both"):
        from bench_speed import matmul_peak  # beside this file
        from servers.loading import resolve_device

        rounds, peaks = {}, {}
        for dtype in args.dtype:
            peaks[dtype] = [matmul_peak(resolve_device("auto"), dtype=dtype)]
            rounds[dtype] = bench_reuse(args, dtype)
            peaks[dtype].append(matmul_peak(resolve_device("auto"), dtype=dtype))
        if len(rounds) > 1:
            print("\na round with layer reuse, by precision (matmul peak in GFLOP/s, best before and after):")
            for dtype, qps in rounds.items():
                print(f"  {dtype:<9} {qps:6.2f} queries/s  {qps / rounds[args.dtype[0]]:5.2f}x   peak "
                      f"{min(peaks[dtype]):.0f} .. {max(peaks[dtype]):.0f}")
    if args.part in ("compare", "both"):
        if args.part == "both":
            print()
        bench_compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
