"""A run against a real server that goes away: restarted mid-run, or out of quota, the run ends as a clean one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bbt.cli import main
from serverproc import REPO, free_port, running_server
from test_resume import outcome, paid, tune_args


def _bbt(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "bbt.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_lines(path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach {n} requests (exit {proc.poll()})")


@pytest.mark.slow
def test_a_run_rides_out_a_server_restart(tiny_encoder, data_dir, tmp_path):
    clean, run = tmp_path / "clean", tmp_path / "run"
    assert main(tune_args(tiny_encoder, data_dir, clean, "--no-cache", budget=300)) == 0

    port = free_port()
    model = ("--model", str(tiny_encoder))  # served under its path: the name the in-process run used
    with running_server(*model, port=port) as first:
        proc = _bbt(*tune_args(tiny_encoder, data_dir, run, "--no-cache", budget=300),
                    "--endpoint", first.url, "--wait", "180")
        _wait_for_lines(run / "ledger.jsonl", 8, proc)
        first.proc.send_signal(signal.SIGKILL)  # the server dies mid-run, with whatever it was doing
        first.proc.wait(30)
    time.sleep(1.0)  # the client now finds nobody at the port, and keeps waiting
    assert proc.poll() is None
    with running_server(*model, port=port):
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"waiting for http://127.0.0.1:{port}" in err  # it said what it was waiting for
    assert outcome(run) == outcome(clean)


@pytest.mark.slow
def test_quota_exhausted_mid_run_then_resumed_elsewhere(tiny_encoder, data_dir, tmp_path):
    clean, run = tmp_path / "clean", tmp_path / "run"
    assert main(tune_args(tiny_encoder, data_dir, clean, "--no-cache")) == 0
    keys = tmp_path / "keys.txt"
    keys.write_text("quota-key-0123456789\n")
    model = ("--model", str(tiny_encoder))
    with running_server(*model, "--api-keys", str(keys), "--quota", "30", "--quota-window", "3600") as server:
        proc = _bbt(*tune_args(tiny_encoder, data_dir, run, "--no-cache"), "--endpoint", server.url,
                    "--api-key", "quota-key-0123456789", "--wait", "20")
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "quota_exhausted" in err and f"bbt tune --resume {run}" in err
    assert "quota-key-0123456789" not in err
    spent_before = paid(run)
    assert 0 < spent_before <= 30  # what the quota allowed, all of it on record

    with running_server(*model) as other:  # e.g. a key with quota left, or another server
        proc = _bbt("tune", "--resume", str(run), "--endpoint", other.url, "--no-cache", "--quiet")
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert outcome(run) == outcome(clean)
    assert json.loads((run / "metrics.json").read_text())["queries_used"] == 48
    assert paid(run) - spent_before <= paid(clean)  # paid again: at most the generation the quota cut


@pytest.mark.slow
def test_the_client_retries_with_the_same_key_and_is_billed_once(tiny_encoder, sst2_task, tiny_data):
    """The server scored the request, the client timed out: the retry is replayed, not scored again."""
    import httpx
    import numpy as np

    from bbt.backends.http import HTTPBackend
    from bbt.projection import uniform_spec
    from bbt.protocol import EvaluateRequest, IntrinsicPrompts, Tensor

    z = np.random.default_rng(0).standard_normal((4, 1, 8))
    request = EvaluateRequest(
        model=str(tiny_encoder), task=sst2_task, inputs=tiny_data.train.examples, labels=tiny_data.train.labels,
        candidates=IntrinsicPrompts(z=Tensor.from_numpy(z), projections=[uniform_spec(seed=1, d=8, D=4 * 32)], prompt_length=4))
    with running_server("--model", str(tiny_encoder), "--quota", "8", env={"BBT_TEST_FAULTS": "1"}) as server:
        with HTTPBackend(server.url, timeout=30) as backend:
            want = backend.evaluate(request)  # 4 of the 8 queries of the quota
        # a fresh server-side key: the same candidates in another order
        request = request.model_copy(update={"candidates": request.candidates.model_copy(
            update={"z": Tensor.from_numpy(z[::-1])})})
        assert httpx.post(server.url + "/v1/_faults", json={"fail_next": 1, "delay_after": 3}).status_code == 200
        with HTTPBackend(server.url, timeout=1.0, wait=60, backoff=0.05) as backend:
            got = backend.evaluate(request)  # the answer of the first, timed-out attempt, replayed
            assert backend.attempts >= 2
        counters = httpx.get(server.url + "/v1/_faults").json()
    assert got.losses == want.losses[::-1]
    assert counters["served"] == 2 and counters["replayed"] >= 1
    assert counters["queries_served"] == 8  # a second scoring of the retried request would have crossed the quota


@pytest.mark.slow
@pytest.mark.parametrize("state", [True, False], ids=["with-state", "in-memory"])
def test_kill_9_after_an_answer_was_paid_neither_resets_the_quota_nor_pays_the_retry(tiny_encoder, data_dir, tmp_path,
                                                                                      state):
    """The server scores and charges a request, then dies (kill -9) before the client reads the
    answer. Restarted on the same --state file, it replays that answer to the client's retry and
    its quota goes on where it stopped: what the key was charged equals what the run booked as
    paid, and the run equals an unbroken one. Without --state both are lost: the control case."""
    import httpx

    clean, run = tmp_path / "clean", tmp_path / "run"
    assert main(tune_args(tiny_encoder, data_dir, clean, "--no-cache", budget=60)) == 0
    keys = tmp_path / "keys.txt"
    keys.write_text("state-key-0123456789\n")
    auth = {"Authorization": "Bearer state-key-0123456789"}
    port = free_port()
    args = ("--model", str(tiny_encoder), "--api-keys", str(keys), "--quota", "100000",
            *(("--state", str(tmp_path / "state.sqlite")) if state else ()))
    with running_server(*args, port=port, env={"BBT_TEST_FAULTS": "1"}) as first:
        proc = _bbt(*tune_args(tiny_encoder, data_dir, run, "--no-cache", budget=60), "--endpoint", first.url,
                    "--api-key", "state-key-0123456789", "--wait", "180")
        _wait_for_lines(run / "ledger.jsonl", 4, proc)
        # the next evaluate is scored, charged and stored, then held back: the server dies holding it
        httpx.post(first.url + "/v1/_faults", json={"fail_next": 1, "delay_after": 60}, headers=auth)
        deadline = time.monotonic() + 60
        while httpx.get(first.url + "/v1/_faults", headers=auth).json()["served"] < 1:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        faults = httpx.get(first.url + "/v1/_faults", headers=auth).json()
        charged_before = httpx.get(first.url + "/v1/usage", headers=auth).json()["queries_used"]
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)
    assert faults["injected"] == 1 and faults["served"] >= 1
    with running_server(*args, port=port, env={"BBT_TEST_FAULTS": "1"}) as second:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        after = httpx.get(second.url + "/v1/_faults", headers=auth).json()
        charged = httpx.get(second.url + "/v1/usage", headers=auth).json()["queries_used"]
    booked = json.loads((run / "metrics.json").read_text())["queries_paid"]
    assert booked == paid(run) == paid(clean)  # the client booked each answer once
    if state:
        assert after["replayed"] == 1  # the held answer, to the client's retry: not scored again
        assert charged == booked  # what the key was charged, across the kill, is what the run paid
        assert outcome(run) == outcome(clean)
    else:  # the control: the restarted server forgot the charges and the answer
        assert after["replayed"] == 0
        # the key's count started again at 0, and over both lives the held request was paid twice
        assert charged < booked < charged_before + charged
