"""Benchmark: one SmolLM2 population scored by bbt's own engine and by vLLM, on every path a run can take.

    cd /work/main && . .venv/bin/activate
    python experiments/bench_vllm.py                                   # starts vLLM itself (servers.vllm_launch)
    python experiments/bench_vllm.py --vllm http://127.0.0.1:8001 --repeats 5

The population is what a BBT generation sends with the causal-LM defaults: K = 20 candidates, L = 10,
d = 500, alpha 0.5, p0 the task's instruction, z ~ N(0, 1), on the 32 training inputs of SST-2
split 42. It is scored, with the clock around each request, by:

    in-process   bbt's engine in this process (LocalBackend)                       the baseline
    bbt-serve    bbt's engine behind `bbt serve` on a loopback port (z sent)       the peer of vllm
    vllm         vLLM directly: embeddings built here, sent as prompt_embeds
    upstream     `bbt serve --upstream` in front of vLLM (z sent; the gateway builds the embeddings)

With --batching, only the vllm path runs, once per request shape (inputs per request x requests in
flight, `servers.upstream.VLLMEngine`): how a population is best cut for the engine.

Printed per path: queries/s (median over --repeats populations after a warm-up one; ratio to in-process),
bytes the client sends per query, and the largest gap of class log-softmax from in-process. Every
path runs in float32 on the same cores: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.serverproc: the server fixture the tests use

from bbt import starts  # noqa: E402
from bbt.backends import HTTPBackend, LocalBackend, open_endpoint  # noqa: E402
from bbt.config import TuneConfig, with_family_defaults  # noqa: E402
from bbt.data import load_task_folder  # noqa: E402
from bbt.protocol import EvaluateRequest, StatsRequest  # noqa: E402
from bbt.tasks import for_family, resolve_task  # noqa: E402
from bbt.tuner import _INIT, derive_seed, start_state  # noqa: E402
from tests.serverproc import running_server  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "sst2"


def populations(backend, data: Path, seed: int, k: int, n: int) -> list[EvaluateRequest]:
    """`n` BBT generations' requests, built by the tuner's own pieces, each with its own z (a
    repeated body would be answered from the server's idempotency store)."""
    info = backend.model_info("smollm2")
    cfg = with_family_defaults(TuneConfig(model="smollm2", method="bbt", seed=seed), info.family)
    task = for_family(resolve_task("sst2", data), info.family)
    train = load_task_folder(data, task, seed=seed, k=cfg.k_shot).train
    tokens = backend.stats(StatsRequest(model="smollm2", task=task, inputs=train.examples)).tokens
    text = starts.init_text(cfg.init, task, cfg.init_text, train, tokens, cfg.prompt_length, derive_seed(seed, _INIT))
    prompt = start_state(cfg, info, [info.embedding_std], text).prompt
    rng = np.random.default_rng(seed)
    return [EvaluateRequest(model="smollm2", task=task, inputs=train.examples, labels=train.labels, return_logits=True,
                            candidates=prompt.candidates(rng.normal(size=(k, 1, cfg.intrinsic_dim))))
            for _ in range(n)]


def sent(backend) -> int:
    http = backend if isinstance(backend, HTTPBackend) else getattr(getattr(backend, "engine", None), "http", None)
    return 0 if http is None else http.bytes_sent


def measure(name: str, backend, reqs: list[EvaluateRequest]) -> dict:
    """reqs[0] warms up (first-use costs: encodings, projections, connections) and is the one
    compared across paths; the others are timed."""
    logits = backend.evaluate(reqs[0]).logits.to_numpy()
    before, times, repeats = sent(backend), [], len(reqs) - 1
    for req in reqs[1:]:
        start = time.perf_counter()
        answer = backend.evaluate(req)
        times.append(time.perf_counter() - start)
    k = answer.usage.queries
    return {"path": name, "seconds": statistics.median(times), "qps": k / statistics.median(times),
            "bytes_per_query": (sent(backend) - before) / (repeats * k),
            "log_softmax": logits - np.log(np.exp(logits).sum(-1, keepdims=True))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm", metavar="URL", help="a running vLLM serving smollm2 (default: start one)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--population", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batching", action="store_true", help="compare request shapes on the vllm path only")
    ap.add_argument("--threads", type=int, help="torch threads of bbt's engine, in process and in bbt serve (vLLM's "
                    "CPU worker takes one core of two: 1 compares the engines on the same cores)")
    args = ap.parse_args()
    env = None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        env = {"OMP_NUM_THREADS": str(args.threads)}
    if args.batching:
        return batching(args)
    proc = None
    if args.vllm is None:
        from servers import vllm_launch
        from servers.process import free_port

        proc, args.vllm = vllm_launch.start("smollm2", free_port())
    rows = []
    try:
        local = LocalBackend()
        reqs = populations(local, args.data, args.seed, args.population, args.repeats + 1)
        rows.append(measure("in-process", local, reqs))
        with running_server("--model", "smollm2", env=env) as server, HTTPBackend(server.url) as http:
            rows.append(measure("bbt-serve", http, reqs))
        with open_endpoint(args.vllm, engine="vllm") as direct:
            rows.append(measure("vllm", direct, reqs))
        with running_server("--upstream", args.vllm, "--model", "smollm2", timeout=300) as server, \
                HTTPBackend(server.url) as http:
            rows.append(measure("upstream", http, reqs))
    finally:
        if proc is not None:
            vllm_launch.stop(proc)
    base = rows[0]
    print(f"SmolLM2, SST-2 split {args.seed}: K = {args.population} candidates x {len(reqs[0].inputs)} inputs, "
          f"L = 10, float32, median of {args.repeats}; bbt's engine on {args.threads or 'all'} thread(s)")
    print(f"{'path':<12}{'s/population':>14}{'queries/s':>11}{'x in-process':>14}{'bytes/query':>13}{'max gap':>10}")
    for r in rows:
        gap = np.abs(r["log_softmax"] - base["log_softmax"]).max()
        print(f"{r['path']:<12}{r['seconds']:>14.2f}{r['qps']:>11.2f}{r['qps'] / base['qps']:>14.2f}"
              f"{r['bytes_per_query']:>13,.0f}{gap:>10.1e}")
    by = {r["path"]: r for r in rows}
    print(f"bbt serve's engine against vLLM's, both behind HTTP: {by['bbt-serve']['qps'] / by['vllm']['qps']:.2f}x "
          "the queries/s")
    return 0


SHAPES = [(640, 1), (128, 1), (32, 1), (32, 4), (8, 4)]  # (inputs per request, requests in flight)


def batching(args) -> int:
    from bbt.backends.vllm import VLLMBackend

    local = LocalBackend()
    reqs = populations(local, args.data, args.seed, args.population, args.repeats + 1)
    print(f"vLLM at {args.vllm}: K = {args.population} x {len(reqs[0].inputs)} inputs per population, median of "
          f"{args.repeats}")
    print(f"{'inputs/request':>15}{'in flight':>10}{'s/population':>14}{'queries/s':>11}{'MB/request':>12}")
    for rows, flight in SHAPES:
        with VLLMBackend(args.vllm, rows_per_request=rows, in_flight=flight) as backend:
            r = measure("vllm", backend, reqs)
            requests = -(-len(reqs[0].inputs) * args.population // rows)
            mb = r["bytes_per_query"] * args.population / requests / 2**20
        print(f"{rows:>15}{flight:>10}{r['seconds']:>14.2f}{r['qps']:>11.2f}{mb:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
