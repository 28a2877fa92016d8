"""Benchmark: the same SST-2 tuning run in process and over HTTP, for each candidate encoding.

    cd /work/main && . .venv/bin/activate
    python experiments/bench_http.py                      # budget 200, encodings intrinsic float32 float16
    python experiments/bench_http.py --budget 100 --encodings intrinsic float32 --repeats 3

For each encoding, `run_tune` (seed 42, MiniLM, BBT) runs once in this process (LocalBackend,
model loaded before the clock starts) and once through `bbt serve` on a free loopback port (also
loaded before). Printed per encoding:

- tuning seconds (the search loop) and wall seconds (the whole run: zero-prompt and tuned test
  evaluation included), and their ratio HTTP / in-process (goal: within 1.05);
- bytes sent per query: request bodies of the tuning requests (train and dev populations) divided
  by the queries they carried, and the candidate payload alone per query;
- whether the HTTP run's metrics and prompt are identical to the in-process run's;
- a paired replay: every tuning request of the run is sent in process and over HTTP back to
  back (alternating which goes first), and the summed times give the HTTP/in-process ratio of
  the model calls. Two runs a minute apart on a shared machine can differ by 2x from other
  load alone; pairs a second apart see the same load, so this ratio is the one to trust.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.serverproc: the same server fixture the tests use

from bbt.backends import HTTPBackend, LocalBackend  # noqa: E402
from bbt.budget import Budget  # noqa: E402
from bbt.config import TuneConfig  # noqa: E402
from bbt.data import load_task_folder  # noqa: E402
from bbt.protocol import EvaluateRequest  # noqa: E402
from bbt.runs import run_tune  # noqa: E402
from bbt.tasks import resolve_task  # noqa: E402
from tests.serverproc import running_server  # noqa: E402

TIMING = ("tuning_seconds", "wall_seconds", "queries_per_second")


class Metered:
    """A Backend wrapper that records each evaluate request: inputs, K, bytes on the wire, the request."""

    def __init__(self, inner, tuning_inputs: list[list]):
        self.inner, self.tuning_inputs = inner, tuning_inputs
        self.requests: list[dict] = []

    def model_info(self, model):
        return self.inner.model_info(model)

    def stats(self, request):
        return self.inner.stats(request)

    def evaluate(self, request: EvaluateRequest):
        sent = getattr(self.inner, "bytes_sent", None)
        answer = self.inner.evaluate(request)
        c = request.candidates
        self.requests.append({
            "tuning": c is not None and any(request.inputs == split for split in self.tuning_inputs),
            "queries": answer.usage.queries,
            "body_bytes": (self.inner.bytes_sent - sent) if sent is not None else len(request.model_dump_json()),
            "candidate_bytes": 0 if c is None else len(c.model_dump_json()),
            "request": request,
        })
        return answer

    def close(self):
        self.inner.close()


def one_run(backend, cfg: TuneConfig, task, data, out: Path) -> tuple[dict, list[dict], list]:
    metered = Metered(backend, [data.train.examples, data.dev.examples])
    metrics = run_tune(cfg, task, data, metered, out, progress=False, log=lambda *a: None)
    z = json.loads((out / "prompt.json").read_text())["z"]
    return metrics, metered.requests, z


def paired_replay(local, http, requests: list[dict]) -> tuple[float, float]:
    """Seconds in process and over HTTP for the same tuning requests, each pair timed back to back."""
    t_local = t_http = 0.0
    for i, r in enumerate(x for x in requests if x["tuning"]):
        order = [(local, "l"), (http, "h")] if i % 2 == 0 else [(http, "h"), (local, "l")]
        answers = {}
        for backend, key in order:
            start = time.perf_counter()
            answers[key] = backend.evaluate(r["request"])
            elapsed = time.perf_counter() - start
            if key == "l":
                t_local += elapsed
            else:
                t_http += elapsed
        if answers["l"].losses != answers["h"].losses:
            raise AssertionError("in-process and HTTP answers differ for the same request")
    return t_local, t_http


def per_query(requests: list[dict], key: str) -> float:
    tuning = [r for r in requests if r["tuning"]]
    return sum(r[key] for r in tuning) / max(1, sum(r["queries"] for r in tuning))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/sst2",
                    help="SST-2 task folder")
    ap.add_argument("--budget", type=int, default=200, help="queries per run")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--encodings", nargs="+", default=["intrinsic", "float32", "float16"],
                    choices=["intrinsic", "float32", "float16"])
    ap.add_argument("--repeats", type=int, default=1, help="runs per encoding and path (medians are printed)")
    ap.add_argument("--prompt-length", type=int, default=50)
    ap.add_argument("--intrinsic-dim", type=int, default=500)
    ap.add_argument("--popsize", type=int, default=20)
    args = ap.parse_args()

    task = resolve_task("sst2", args.data)
    data = load_task_folder(args.data, task, seed=args.seed)
    print(f"SST-2 seed {args.seed}: {len(data.train)} train, {len(data.dev)} dev, {len(data.test)} {data.test_name}; "
          f"budget {args.budget} queries, L={args.prompt_length}, d={args.intrinsic_dim}, popsize {args.popsize}")
    local = LocalBackend(["minilm"])
    local.model_info("minilm")  # the model loads now, not inside the timed run (the server loads before it listens)
    rows = []
    with running_server("--model", "minilm") as server, tempfile.TemporaryDirectory() as tmp:
        http = HTTPBackend([server.url])
        for encoding in args.encodings:
            cfg = TuneConfig(model="minilm", seed=args.seed, prompt_length=args.prompt_length, intrinsic_dim=args.intrinsic_dim,
                             popsize=args.popsize, encoding=encoding, budget=Budget(queries=args.budget),
                             verbalizer="manual")  # the search alone, as measured
            times = {"local": [], "http": []}
            same = True
            for rep in range(args.repeats):
                # alternate which path goes first, so that drift in the machine's load favours neither
                if rep % 2 == 0:
                    m_local, _, z_local = one_run(local, cfg, task, data, Path(tmp) / f"{encoding}-local-{rep}")
                m_http, reqs, z_http = one_run(http, cfg, task, data, Path(tmp) / f"{encoding}-http-{rep}")
                if rep % 2 == 1:
                    m_local, _, z_local = one_run(local, cfg, task, data, Path(tmp) / f"{encoding}-local-{rep}")
                times["local"].append((m_local["tuning_seconds"], m_local["wall_seconds"]))
                times["http"].append((m_http["tuning_seconds"], m_http["wall_seconds"]))
                same = same and z_local == z_http and {k: v for k, v in m_local.items() if k not in TIMING} == {
                    k: v for k, v in m_http.items() if k not in TIMING}
            pair_local, pair_http = paired_replay(local, http, reqs)
            tl = statistics.median(t for t, _ in times["local"])
            wl = statistics.median(w for _, w in times["local"])
            th = statistics.median(t for t, _ in times["http"])
            wh = statistics.median(w for _, w in times["http"])
            row = {"encoding": encoding, "tune_local": tl, "tune_http": th, "wall_local": wl, "wall_http": wh,
                   "bytes_per_query": per_query(reqs, "body_bytes"), "payload_per_query": per_query(reqs, "candidate_bytes"),
                   "identical": same, "test_acc": m_http["test_acc"], "queries": m_http["queries_used"],
                   "paired": pair_http / pair_local}
            rows.append(row)
            print(f"  {encoding}: tuning {tl:.2f} s local / {th:.2f} s http (ratio {th / tl:.3f}); wall {wl:.2f} / {wh:.2f} s "
                  f"(ratio {wh / wl:.3f}); paired replay {pair_local:.2f} / {pair_http:.2f} s (ratio {row['paired']:.3f}); "
                  f"{row['bytes_per_query']:.0f} B sent per query; identical: {same}", flush=True)
        http.close()

    print()
    print("HTTP / in-process time ratios (goal: <= 1.05) and bytes sent per tuning query")
    print(f"{'encoding':<10} {'tuning':>7} {'wall':>7} {'paired':>7} {'B/query':>8} {'payload':>8} {'test acc':>8} {'identical':>9}")
    for r in rows:
        print(f"{r['encoding']:<10} {r['tune_http'] / r['tune_local']:>7.3f} {r['wall_http'] / r['wall_local']:>7.3f} "
              f"{r['paired']:>7.3f} {r['bytes_per_query']:>8.0f} {r['payload_per_query']:>8.0f} {r['test_acc']:>8.4f} "
              f"{str(r['identical']):>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
