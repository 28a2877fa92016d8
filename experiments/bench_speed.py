"""Benchmark: queries/s and useful-FLOP fraction of bbt's tuning loop, against a loop like the original BBT code's.

    cd /work/main && . .venv/bin/activate
    python experiments/bench_speed.py                       # MiniLM, SST-2 seed 42 train (32), L = 50, K = 20
    python experiments/bench_speed.py --generations 5 --prompt-length 50
    python experiments/bench_speed.py --device cuda         # everything, the baseline too, on a GPU
    python experiments/bench_speed.py --compile             # adds bbt BBT with torch.compile'd layer blocks
    python experiments/bench_speed.py --model smollm2 --generations 2 --no-ablation --no-bbtv2   # the causal LM
    python experiments/bench_speed.py --model smollm2 --dtype float32 bfloat16 --no-ablation --prompt-length 10
                                                            # issue 40: bbt's modes in both precisions

Measured in one run, on this machine, back to back in alternating order so that both see the same
load:

- peak: the best GFLOP/s of a 2048 x 2048 matmul in torch (8192 x 8192 on a GPU; same thread
  settings as the model), in each precision timed, measured before and after every pass; the
  median is used, and each mode's useful fraction is of the peak of its own precision.
- baseline: a loop like the original BBT code's: pycma ask, p = A z in numpy, then for each
  candidate one forward pass of the whole padded batch (all 32 training examples padded to the
  longest), fp32, under `torch.no_grad`, cross-entropy, pycma tell.
- bbt BBT: `bbt.tuner.tune` for one generation (in process, no cache): CMA-ES, the request, the
  ledger and the dev query when the generation improves, timed as `queries_used / tuning_seconds`,
  what `bbt tune` reports in metrics.json.
- bbt BBTv2: `tune` with `--method bbtv2` for one round (one generation per layer), with bbt's
  reuse of the layers below the tuned one.
- ablations (skip with `--no-ablation`): bbt BBT with forward passes of 16,384 padded tokens (the
  size before issue 6) instead of 2,048, and with the top layer run at every position.
- with `--dtype float32 bfloat16`: bbt BBT and BBTv2 once per precision, the bfloat16 modes on the
  model loaded with `--dtype bfloat16` (`servers/precision.py`); the baseline stays float32. Also
  printed: the largest class-logit difference between the precisions on one population, and
  whether its candidates rank alike.
- with `--compile`: bbt BBT with the layers' dense blocks run through `torch.compile`
  (`PromptModel.compile`, what `bbt serve --compile` does). The compile time is printed apart;
  recompiles for new shapes during the timed passes count, as a user would pay them.

Useful FLOPs per query = 2 x non-embedding parameters x non-padding tokens (the texts with their
template, plus L prompt tokens each); the useful fraction is useful FLOP/s over the peak (BBTv2's
can pass 1: its reuse skips layers a plain forward pass would run). Prints a
table, the ratios against the baseline, and the largest logit difference between bbt's scoring and
the baseline's forward on the same prompts (they compute the same function).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sst2"


def matmul_peak(device, repeats: int = 5, n: int = 2048, dtype: str = "float32") -> float:
    """Best GFLOP/s of an n x n matmul on `device` in `dtype` (float32 or bfloat16)."""
    import torch

    if device.type != "cpu":
        n *= 4  # 2048^2 is over before a GPU is busy
    kind = getattr(torch, dtype)
    a, b = torch.randn(n, n, device=device, dtype=kind), torch.randn(n, n, device=device, dtype=kind)
    torch.matmul(a, b)  # warm-up
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SST-2 task folder (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--model", default="minilm", help="minilm, smollm2 or a model folder (default: %(default)s)")
    ap.add_argument("--no-bbtv2", dest="bbtv2", action="store_false", help="skip the BBTv2 round (30 generations on SmolLM2)")
    ap.add_argument("--prompt-length", type=int, default=50)
    ap.add_argument("--popsize", type=int, default=20)
    ap.add_argument("--no-ablation", dest="ablation", action="store_false",
                    help="skip the two extra modes: bbt BBT with 16,384-token passes, and with the top layer run whole")
    ap.add_argument("--compile", action="store_true",
                    help="add bbt BBT with torch.compile'd layer blocks (compiling takes up to a minute)")
    ap.add_argument("--device", default="auto", help="where the model runs: auto, cpu, cuda, ... (default: %(default)s)")
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="the precisions bbt's modes run in (the baseline is float32)")
    ap.add_argument("--generations", type=int, default=3, help="timed passes per mode: one generation (BBTv2: one round, a generation per layer)")
    args = ap.parse_args()
    if not (args.data / "task.json").is_file():
        ap.error(f"no SST-2 task folder at {args.data}: pass --data DIR")

    import torch

    from bbt.backends import LocalBackend
    from bbt.budget import Budget, Ledger
    from bbt.config import TuneConfig
    from bbt.data import load_task_folder
    from bbt.metrics import loss as ce_loss
    from bbt.optimizer import CMAES
    from bbt.projection import normal_spec, project
    from bbt.protocol import EvaluateRequest, IntrinsicPrompts, Tensor
    from bbt.tasks import for_family, resolve_task
    from bbt.tuner import tune

    backend = LocalBackend([args.model], device=args.device)  # float32: the baseline's model and bbt's
    backends = {dt: backend if dt == "float32" else LocalBackend([args.model], device=args.device, dtype=dt)
                for dt in args.dtype}
    service = backend.service
    model = service.get(args.model)
    task = for_family(resolve_task("sst2", args.data), model.family.name)
    data = load_task_folder(args.data, task, seed=args.seed)
    train = data.train
    device = model.device
    info = model.info()
    k, length, d, h = args.popsize, args.prompt_length, 500, info.hidden_size

    # the baseline's fixed pieces: one padded batch of all examples, and A
    enc = model.encode(task, train.examples)
    head = model.family.head(task)
    ids, mask = model.batch(enc, list(range(len(train))), length)
    readout = torch.tensor(enc.readout, device=device)
    shift = torch.where(readout >= model.prompt_at, readout + length, readout)
    spec = normal_spec(seed=100, d=d, D=length * h, target_std=info.embedding_std)
    labels = np.asarray(train.labels)

    def forward_each(prompts: torch.Tensor) -> np.ndarray:  # prompts (K, 1, L, H) -> logits (K, N, C)
        with torch.no_grad():
            out = [head(model._run(ids, mask, prompts[c : c + 1].expand(len(train), -1, -1, -1), []), mask, shift,
                        model.prompt_at, length) for c in range(prompts.shape[0])]
        return torch.stack(out).cpu().numpy()

    def baseline() -> int:
        es = CMAES(d, popsize=k, seed=0)
        z = es.ask()
        p = project(z, spec).reshape(k, 1, length, h)
        logits = forward_each(torch.from_numpy(p).to(device))
        es.tell(z, ce_loss("ce", logits, labels))
        return k

    def run_tune(method: str, name: str, dtype: str = "float32") -> int:
        cfg = TuneConfig(model=args.model, method=method, seed=args.seed, prompt_length=length, popsize=k, rounds=1,
                         budget=Budget(queries=10**6))
        ledger = Ledger(cfg.budget)
        result = tune(backends.get(dtype, backend), cfg, task, train, data.dev, ledger)
        times[name].append(result.seconds)
        return ledger.tuning.queries

    def without(name: str, what: str) -> int:  # bbt BBT with one of its optimisations undone
        try:
            if what == "chunks":
                model.chunk_tokens = lambda: 16384  # bbt's pass size before issue 6
            else:
                model.top_rows_only = False
            return run_tune("bbt", name)
        finally:
            model.__dict__.pop("chunk_tokens", None)
            model.top_rows_only = True

    modes = {"baseline": baseline}
    precision = {"baseline": "float32"}
    for dt in args.dtype:
        tag = "" if dt == "float32" else " bf16"
        for method in ("bbt", "bbtv2") if args.bbtv2 else ("bbt",):
            name = f"bbt {method.upper().replace('V2', 'v2')}{tag}"
            modes[name] = lambda method=method, name=name, dt=dt: run_tune(method, name, dt)
            precision[name] = dt
    if args.ablation:
        modes["BBT 16k passes"] = lambda: without("BBT 16k passes", "chunks")
        modes["BBT whole top"] = lambda: without("BBT whole top", "top")
    if args.compile:
        def compiled(name: str) -> int:
            model.compile()
            try:
                return run_tune("bbt", name)
            finally:
                model.compile(False)

        modes["BBT compiled"] = lambda: compiled("BBT compiled")
    for name in modes:
        precision.setdefault(name, "float32")
    times: dict[str, list[float]] = {m: [] for m in modes}
    queries: dict[str, list[int]] = {m: [] for m in modes}

    # the same function both ways: bbt's scoring and the baseline's forward on the same prompts
    z = np.random.default_rng(0).standard_normal((k, 1, d))
    req = EvaluateRequest(model=args.model, task=task, inputs=train.examples, labels=train.labels, return_logits=True,
                          candidates=IntrinsicPrompts(z=Tensor.from_numpy(z), projections=[spec], prompt_length=length))
    got = service.evaluate(req).logits.to_numpy()
    want = forward_each(torch.from_numpy(service._prompts(model, req)).to(device))
    if args.compile:  # compiles now, apart from the timed passes, and checks the compiled scores
        start = time.perf_counter()
        model.compile()
        compile_seconds = time.perf_counter() - start
        compiled_diff = np.abs(service.evaluate(req).logits.to_numpy() - got).max()
        model.compile(False)
    half_diff = None
    if "bfloat16" in backends:  # the same population in both precisions
        half = backends["bfloat16"].service.evaluate(req)
        half_diff = np.abs(half.logits.to_numpy() - got).max()
        full = service.evaluate(req)
        ranks = [np.argsort(np.argsort(r.losses)) for r in (full, half)]
        same_best = int(np.argmin(full.losses)) == int(np.argmin(half.losses))
        rank_corr = float(np.corrcoef(*ranks)[0, 1])
    warm = [m for m in modes if m.startswith("bbt BBT") and not m.startswith("bbt BBTv2")]
    baseline()
    for name in warm:  # warm-up: label embeddings, projections, CMA-ES, in each precision
        modes[name]()
        times[name].clear()
    peaks = {dt: [matmul_peak(device, dtype=dt)] for dt in sorted(set(precision.values()), reverse=True)}  # float32 first
    for g in range(args.generations):
        order = list(modes) if g % 2 == 0 else list(reversed(modes))
        for name in order:
            start = time.perf_counter()
            queries[name].append(modes[name]())
            if name == "baseline":
                times[name].append(time.perf_counter() - start)
        for dt in peaks:
            peaks[dt].append(matmul_peak(device, dtype=dt))
    peak = {dt: statistics.median(p) for dt, p in peaks.items()}

    params = sum(p.numel() for name, p in model.model.base_model.named_parameters()
                 if "embeddings" not in name and "embed_tokens" not in name)
    tokens_per_query = sum(len(s) for s in enc.ids) + len(train) * length
    padded_per_query = ids.shape[0] * ids.shape[1]
    flop_per_query = 2 * params * tokens_per_query

    print(f"{args.model} ({params / 1e6:.1f} M non-embedding parameters), SST-2 seed {args.seed}: {len(train)} training "
          f"examples, prompt length {length}, population {k}; device {device}, torch threads {torch.get_num_threads()}")
    for dt, p in peaks.items():
        print(f"matmul peak ({dt}, {2048 if device.type == 'cpu' else 8192}^2): {peak[dt]:.1f} GFLOP/s (median of "
              f"{len(p)}: {min(p):.1f} .. {max(p):.1f})")
    print(f"tokens per query: {tokens_per_query} useful, {padded_per_query} in the baseline's padded batch")
    print(f"\n{'mode':<15}{'dtype':>9}{'s/generation':>13}{'queries/s':>11}{'useful GFLOP/s':>16}{'of peak':>9}"
          f"{'vs baseline':>13}")
    qps = {}
    for name in modes:
        qps[name] = sum(queries[name]) / sum(times[name])  # queries_used / tuning_seconds over all passes
        useful = flop_per_query * qps[name] / 1e9
        per_gen = k * sum(times[name]) / sum(queries[name])
        print(f"{name:<15}{precision[name]:>9}{per_gen:>13.2f}{qps[name]:>11.2f}{useful:>16.1f}"
              f"{useful / peak[precision[name]]:>9.2f}"
              f"{qps[name] / qps['baseline']:>12.2f}x")
    if args.compile:
        print(f"\ntorch.compile: compiling took {compile_seconds:.1f} s; "
              f"largest logit difference, compiled vs eager: {compiled_diff:.2e}")
    print(f"\nlargest logit difference, bbt vs baseline: {np.abs(want - got).max():.2e}")
    if "bbt BBT" in qps:
        print(f"ratio bbt BBT / baseline (queries/s): {qps['bbt BBT'] / qps['baseline']:.2f}x (issue 6 asked 1.4x on "
              "MiniLM, issue 15 1.5x on SmolLM2)")
    if half_diff is not None:
        for name in [m for m in qps if m.endswith(" bf16")]:
            full_name = name.removesuffix(" bf16")
            if full_name in qps:
                print(f"ratio {name} / {full_name} (queries/s): {qps[name] / qps[full_name]:.2f}x (issue 40 asked 2x on "
                      "SmolLM2)")
        print(f"bfloat16 against float32 on one population: largest class-logit difference {half_diff:.3f}; same best "
              f"candidate: {same_best}; rank correlation of the candidates' losses {rank_corr:.3f}")
    for b in backends.values():
        b.close()
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
