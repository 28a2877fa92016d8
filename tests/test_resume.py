"""Durable runs: kill -9 at any point, `bbt tune --resume RUN`, and the run ends as if never stopped.

A killed run is a real `bbt tune` child process. Some are killed by a patch at an exact point
(before a request, after an answer, after the answer was cached but before its ledger line, after
the ledger line, between a checkpoint's parts and state.json, between state.json's write and
its rename), one at whatever moment it has reached
after a few requests. Each is resumed with the real CLI and compared with an uninterrupted run
of the same command: the same metrics, prompt and log, and with a cache, not one query paid twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bbt.cli import main
from serverproc import REPO

# Patches a killed child applies before running `bbt tune`: SIGKILL itself at call N of a point.
KILLER = r"""
import os, signal, sys
point, n = sys.argv[1], int(sys.argv[2])
calls = [0]

def due():
    calls[0] += 1
    return calls[0] == n

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def kill_at(owner, name, before):  # owner.name's call N dies before (or after) doing its work
    inner = getattr(owner, name)
    def wrapped(*args, **kwargs):
        if before and due():
            die()
        result = inner(*args, **kwargs)
        if not before and due():
            die()
        return result
    setattr(owner, name, wrapped)

from bbt import budget, cache
from bbt.backends import local
owner, name, before = {
    "before-request": (local.LocalBackend, "evaluate", True),
    "after-answer": (local.LocalBackend, "evaluate", False),
    "after-cache": (cache.EvaluationCache, "put", False),
    "after-ledger": (budget.Ledger, "record", False),
    "mid-checkpoint": (os, "replace", True),
}[point]
kill_at(owner, name, before)
from bbt.cli import main
sys.exit(main(sys.argv[3:]))
"""

TIMING = {"tuning_seconds", "queries_per_second", "wall_seconds", "queries_paid", "spending"}


def tune_args(model: Path, data: Path, out: Path, *extra: str, budget: int = 48) -> list[str]:
    return ["tune", "--data", str(data), "--model", str(model), "--seed", "42", "--budget", str(budget),
            "--popsize", "6", "--intrinsic-dim", "8", "--prompt-length", "4", "--quiet", "--out", str(out), *extra]


def run_killed(point: str, n: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", KILLER, point, str(n), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)


def outcome(run: Path) -> dict:
    """What must not depend on interruptions: metrics (less timings and payments), prompt, log."""
    metrics = json.loads((run / "metrics.json").read_text())
    spending = metrics["spending"]
    log = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (run / "log.jsonl").read_text().splitlines()]
    return {
        "metrics": {k: v for k, v in metrics.items() if k not in TIMING},
        "budget_spent": (spending["tuning"], spending["evaluation"]),
        "prompt": json.loads((run / "prompt.json").read_text()),
        "log": log,
    }


def paid(run: Path) -> int:
    """Queries billed over the whole life of a run, as its ledger journal says."""
    lines = [json.loads(x) for x in (run / "ledger.jsonl").read_text().splitlines()]
    return sum(x["queries"] for x in lines if x["source"] == "server")


def sigkill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (polled every 5 ms); fails if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL, "the process ended before it could be killed"


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory, tiny_encoder, data_dir):
    """Uninterrupted runs (BBT and BBTv2), without a cache: what every resumed run must match."""
    root = tmp_path_factory.mktemp("clean")
    runs = {}
    for method in ("bbt", "bbtv2"):
        runs[method] = root / method
        assert main(tune_args(tiny_encoder, data_dir, runs[method], "--method", method, "--no-cache")) == 0
    return runs


@pytest.mark.slow
@pytest.mark.parametrize(("point", "n", "method"), [
    ("before-request", 1, "bbt"),  # during the no-prompt baseline, before any checkpoint
    ("before-request", 5, "bbt"),
    ("after-answer", 4, "bbtv2"),  # scored, but neither cached nor in the ledger
    ("after-ledger", 6, "bbt"),  # paid and recorded; the checkpoint of its generation not yet written
    ("after-cache", 6, "bbt"),  # paid and cached, not yet in the ledger: the resumed run books it as paid
    ("after-cache", 9, "bbtv2"),
    # os.replace calls of the run: 1 and 2 state.json (baseline, words), then per generation the
    # CMA-ES parts that moved, the arrays, state.json
    ("mid-checkpoint", 3, "bbtv2"),  # the first generation's CMA-ES parts half written
    ("mid-checkpoint", 6, "bbtv2"),  # its parts and arrays written, state.json.tmp not renamed over state.json
    ("mid-checkpoint", 8, "bbtv2"),  # the next generation's part written, state.json still naming the one it replaces
    ("after-ledger", 13, "bbt"),  # during the final test evaluation, after the last generation
])
def test_kill_then_resume_matches_an_uninterrupted_run(point, n, method, clean_runs, tiny_encoder, data_dir, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache.sqlite"
    args = tune_args(tiny_encoder, data_dir, run, "--method", method, "--cache", str(cache))
    killed = run_killed(point, n, args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / "metrics.json").exists()
    paid_before = paid(run) if (run / "ledger.jsonl").exists() else 0

    assert main(["tune", "--resume", str(run), "--cache", str(cache), "--quiet"]) == 0
    clean = clean_runs[method]
    assert outcome(run) == outcome(clean)
    # what the killed process paid for is still in the ledger, and nothing was paid for twice
    assert paid(run) >= paid_before
    assert paid(run) == paid(clean) == json.loads((run / "metrics.json").read_text())["queries_paid"]


@pytest.mark.slow
def test_resume_without_cache_redoes_one_generation_at_most(clean_runs, tiny_encoder, data_dir, tmp_path):
    run = tmp_path / "run"
    killed = run_killed("after-ledger", 6, tune_args(tiny_encoder, data_dir, run, "--no-cache"))
    assert killed.returncode == -signal.SIGKILL
    assert main(["tune", "--resume", str(run), "--no-cache", "--quiet"]) == 0
    assert outcome(run) == outcome(clean_runs["bbt"])
    extra = paid(run) - paid(clean_runs["bbt"])
    assert 0 < extra <= 6 + 1  # the train request of the unfinished generation and its dev query, paid again


@pytest.mark.slow
def test_kill_9_at_an_arbitrary_moment(tiny_encoder, data_dir, tmp_path):
    """The issue's check: a real `bbt tune` killed by SIGKILL mid-run, resumed, equals a clean run."""
    budget = 600
    clean, run, cache = tmp_path / "clean", tmp_path / "run", tmp_path / "cache.sqlite"
    assert main(tune_args(tiny_encoder, data_dir, clean, "--no-cache", budget=budget)) == 0

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = tune_args(tiny_encoder, data_dir, run, "--cache", str(cache), budget=budget)
    proc = subprocess.Popen([sys.executable, "-m", "bbt.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = run / "ledger.jsonl"
    sigkill_when(proc, lambda: ledger.exists() and ledger.read_text().count("\n") >= 12)
    assert not (run / "metrics.json").exists()

    assert main(["tune", "--resume", str(run), "--cache", str(cache), "--quiet"]) == 0
    assert outcome(run) == outcome(clean)
    assert paid(run) == paid(clean)
    # a second resume of a finished run spends nothing and changes nothing
    before = (run / "ledger.jsonl").read_bytes()
    assert main(["tune", "--resume", str(run), "--cache", str(cache), "--quiet"]) == 0
    assert (run / "ledger.jsonl").read_bytes() == before


def test_resume_refuses_settings_and_unknown_folders(tmp_path, capsys):
    assert main(["tune", "--resume", str(tmp_path), "--quiet"]) == 1
    assert "not a run folder" in capsys.readouterr().err
    assert main(["tune", "--resume", str(tmp_path), "--budget", "10", "--seed", "3"]) == 1
    err = capsys.readouterr().err
    assert "drop --budget, --seed" in err


def test_a_finished_run_folder_is_not_overwritten(tiny_encoder, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tune_args(tiny_encoder, data_dir, run, "--no-cache", budget=12)) == 0
    before = (run / "ledger.jsonl").read_bytes()
    assert main(tune_args(tiny_encoder, data_dir, run, "--no-cache", budget=12)) == 1
    assert f"bbt tune --resume {run}" in capsys.readouterr().err
    assert (run / "ledger.jsonl").read_bytes() == before


def test_bbt_resume_goes_back_to_the_server_the_run_was_tuned_through(clean_runs, tiny_encoder, data_dir, tmp_path,
                                                                       monkeypatch):
    """`bbt.resume(RUN)` continues a run stopped midway (Ctrl-C) against the endpoint its
    config.json names, with no backend given and no model loaded here, and ends as the
    uninterrupted run did."""
    import bbt
    from appserver import serving
    from bbt.backends import http, local
    from servers.app import create_app
    from servers.service import ModelService

    run = tmp_path / "run"
    with serving(create_app(ModelService([str(tiny_encoder)], lazy=False))) as url:
        calls, answer = [0], http.HTTPBackend.evaluate

        def interrupted_at_the_fifth(self, request):
            calls[0] += 1
            if calls[0] == 5:
                raise KeyboardInterrupt
            return answer(self, request)

        monkeypatch.setattr(http.HTTPBackend, "evaluate", interrupted_at_the_fifth)
        assert main(tune_args(tiny_encoder, data_dir, run, "--no-cache", "--endpoint", url)) == 130
        monkeypatch.undo()
        assert (run / "ledger.jsonl").exists() and not (run / "metrics.json").exists()

        def loaded_here(*args, **kwargs):
            raise AssertionError("the run was resumed in process, not through its server")

        monkeypatch.setattr(local.LocalBackend, "__init__", loaded_here)
        m = bbt.resume(run)
    assert m == json.loads((run / "metrics.json").read_text())
    assert outcome(run) == outcome(clean_runs["bbt"])
