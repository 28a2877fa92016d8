"""Benchmark: queries/s and useful-FLOP fraction of bbt's scoring, against a loop like the original BBT code's.

    cd /work/main && . .venv/bin/activate
    python experiments/bench_speed.py                       # MiniLM, SST-2 seed 42 train (32), L = 50, K = 20
    python experiments/bench_speed.py --generations 3 --prompt-length 50

Measured in one run, on this machine, back to back in alternating order so that both see the same
load:

- peak: the best fp32 GFLOP/s of a 2048 x 2048 matmul in torch (same thread settings as the model).
- baseline: what the original BBT loop did: for each candidate, one forward pass of the whole
  padded batch (all 32 training examples padded to the longest), fp32, under `torch.no_grad`.
- bbt BBT: `ModelService.evaluate` on the same population (what `bbt tune` sends per generation).
- bbt BBTv2: a round of one generation per layer, every other layer at a fixed nonzero prompt, with
  bbt's reuse of the layers below the tuned one.

Useful FLOPs per query = 2 x non-embedding parameters x non-padding tokens (the texts with their
template, plus L prompt tokens each); the useful fraction is useful FLOP/s over the peak. Prints a
table, the ratios against the baseline, and the largest logit difference between bbt and the
baseline (they compute the same function).
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


def matmul_peak(repeats: int = 5, n: int = 2048) -> float:
    """Best fp32 GFLOP/s of an n x n matmul."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SST-2 task folder (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--prompt-length", type=int, default=50)
    ap.add_argument("--popsize", type=int, default=20)
    ap.add_argument("--generations", type=int, default=3, help="timed generations per mode (medians are printed)")
    args = ap.parse_args()
    if not (args.data / "task.json").is_file():
        ap.error(f"no SST-2 task folder at {args.data}: pass --data DIR")

    import torch

    from bbt.data import load_task_folder
    from bbt.projection import normal_spec
    from bbt.protocol import EvaluateRequest, IntrinsicPrompts, Tensor
    from bbt.tasks import resolve_task
    from servers.service import ModelService

    task = resolve_task("sst2", args.data)
    train = load_task_folder(args.data, task, seed=args.seed).train
    service = ModelService(["minilm"])
    model = service.get("minilm")
    info = model.info()
    k, length, d, h = args.popsize, args.prompt_length, 500, info.hidden_size
    rng = np.random.default_rng(0)

    def request(layers: int, z: np.ndarray) -> EvaluateRequest:
        specs = [normal_spec(seed=100 + i, d=d, D=length * h, target_std=info.embedding_std) for i in range(layers)]
        return EvaluateRequest(model="minilm", task=task, inputs=train.examples, labels=train.labels, return_logits=True,
                               candidates=IntrinsicPrompts(z=Tensor.from_numpy(z), projections=specs, prompt_length=length))

    bbt_req = request(1, rng.standard_normal((k, 1, d)))
    enc = model.encode(task, train.examples)
    prompts = torch.from_numpy(service._prompts(model, bbt_req))  # (K, 1, L, H): the same prompts both ways
    head = model._head(task)
    everyone = list(range(len(train)))
    ids, mask = model._batch(enc, everyone, length)  # one padded batch of all examples
    readout = torch.tensor(enc.readout)
    shift = torch.where(readout >= model.prompt_at, readout + length, readout)

    def baseline() -> np.ndarray:
        with torch.no_grad():
            out = [head(model._run(ids, mask, prompts[c : c + 1].expand(len(train), -1, -1, -1), []), mask, shift,
                        model.prompt_at, length) for c in range(k)]
        return torch.stack(out).numpy()

    def bbt_bbt() -> np.ndarray:
        return service.evaluate(bbt_req).logits.to_numpy()

    layers = info.num_layers
    base_z = rng.standard_normal((layers, d)) * 0.5
    v2_reqs = []
    for layer in range(layers):
        z = np.repeat(base_z[None], k, axis=0)
        z[:, layer] = rng.standard_normal((k, d))
        v2_reqs.append(request(layers, z))

    def bbt_bbtv2() -> None:
        for req in v2_reqs:
            service.evaluate(req)

    # useful FLOPs: 2 x non-embedding parameters x non-padding tokens
    params = sum(p.numel() for name, p in model.model.base_model.named_parameters() if "embeddings" not in name)
    tokens_per_query = sum(len(s) for s in enc.ids) + len(train) * length
    padded_per_query = ids.shape[0] * ids.shape[1]
    flop_per_query = 2 * params * tokens_per_query

    modes = {"baseline": (baseline, k), "bbt BBT": (bbt_bbt, k), "bbt BBTv2": (bbt_bbtv2, k * layers)}
    times: dict[str, list[float]] = {m: [] for m in modes}
    peaks = [matmul_peak()]
    want, got = baseline(), bbt_bbt()  # warm-up, and the check that both compute the same logits
    for g in range(args.generations):
        order = list(modes) if g % 2 == 0 else list(reversed(modes))
        for name in order:
            fn, _ = modes[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        peaks.append(matmul_peak())
    peak = statistics.median(peaks)

    print(f"MiniLM ({params / 1e6:.1f} M non-embedding parameters), SST-2 seed {args.seed}: {len(train)} training "
          f"examples, prompt length {length}, population {k}; torch threads {torch.get_num_threads()}")
    print(f"matmul peak (fp32, 2048^2): {peak:.1f} GFLOP/s (median of {len(peaks)}: "
          f"{min(peaks):.1f} .. {max(peaks):.1f})")
    print(f"tokens per query: {tokens_per_query} useful, {padded_per_query} in the baseline's padded batch")
    print(f"\n{'mode':<12}{'s/generation':>13}{'queries/s':>11}{'useful GFLOP/s':>16}{'of peak':>9}{'vs baseline':>13}")
    qps = {}
    for name, (_, queries) in modes.items():
        t = statistics.median(times[name])
        qps[name] = queries / t
        useful = flop_per_query * qps[name] / 1e9
        print(f"{name:<12}{t * k / queries:>13.2f}{qps[name]:>11.2f}{useful:>16.1f}{useful / peak:>9.2f}"
              f"{qps[name] / qps['baseline']:>12.2f}x")
    print(f"\nlargest logit difference, bbt vs baseline: {np.abs(want - got).max():.2e}")
    print(f"ratio bbt BBT / baseline (queries/s): {qps['bbt BBT'] / qps['baseline']:.2f}x (issue 6 asks for 1.4x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
