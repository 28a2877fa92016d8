"""HTTPBackend against a real `bbt serve` process: same results as in process, retries, refusals.

The shared test server (tests/serverproc.py) runs MiniLM with API keys and the test fault switch;
the in-process reference is a LocalBackend in this test process. Tuning runs are kept tiny
(8 train / 8 dev / 8 test examples, 40 queries, L=10, d=50) so the module runs in about a minute.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from bbt.backends import HTTPBackend, LocalBackend
from bbt.backends.http import _merge, _split
from bbt.budget import Budget, Ledger
from bbt.config import TuneConfig
from bbt.data import Split, TaskData
from bbt.errors import AuthError, ConfigError, RequestRejected, ServerUnavailable
from bbt.projection import normal_spec
from bbt.protocol import EvaluateRequest, EvaluateResponse, Example, IntrinsicPrompts, PromptTensor, Tensor, Usage
from bbt.runs import run_tune
from bbt.tasks import resolve_task
from bbt.tuner import tune
from serverproc import API_KEY, REPO, free_port, running_server, shared_server

pytestmark = pytest.mark.slow

TASK = resolve_task("sst2")
# Our own short movie-review lines (label 1 = positive), enough for tiny train/dev/test splits.
POSITIVE = [
    "a warm and funny film", "the cast is superb", "beautifully shot and moving", "i loved every minute",
    "a clever, joyful ride", "smart writing and great acting", "the best film this year", "tender and wise",
    "a delight from start to finish", "gripping and heartfelt", "fresh, bright and charming", "a small gem",
]
NEGATIVE = [
    "a dull and lifeless film", "the plot makes no sense", "badly acted and far too long", "i was bored stiff",
    "a tired, joyless mess", "clumsy writing and flat acting", "the worst film this year", "cold and empty",
    "a chore from start to finish", "shallow and predictable", "stale, murky and grim", "a total waste",
]


def _split_of(lo: int, hi: int) -> Split:
    examples, labels = [], []
    for pos, neg in zip(POSITIVE[lo:hi], NEGATIVE[lo:hi]):
        examples += [Example(text=pos), Example(text=neg)]
        labels += [1, 0]
    return Split(examples, labels)


DATA = TaskData(train=_split_of(0, 4), dev=_split_of(4, 8), test=_split_of(8, 12))
TIMING = {"tuning_seconds", "wall_seconds", "queries_per_second", "seconds"}  # may differ between runs


def small_config(encoding: str = "intrinsic", queries: int = 40, method: str = "bbt", seed: int = 7,
                 init: str = "zero") -> TuneConfig:
    return TuneConfig(model="minilm", seed=seed, prompt_length=10, intrinsic_dim=50, popsize=10, encoding=encoding,
                      method=method, init=init, budget=Budget(queries=queries))  # the shared server's model


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def local():
    backend = LocalBackend(["minilm"])
    yield backend
    backend.close()


@pytest.fixture
def http(server):
    with HTTPBackend([server.url], api_key=API_KEY, timeout=30, retries=5, backoff=0.01, max_backoff=0.05) as backend:
        yield backend


@pytest.fixture
def faults(server):
    """Arm the server's fault switch; read its counters. Disarmed after the test."""
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)

    class Faults:
        def arm(self, **plan) -> None:
            client.post("/v1/_faults", json=plan).raise_for_status()

        def counters(self) -> dict:
            return client.get("/v1/_faults").json()

    yield Faults()
    client.post("/v1/_faults", json={"fail_next": 0})
    client.close()


def tiny_request(k: int = 3, encoding: str = "intrinsic", seed: int = 11) -> EvaluateRequest:
    """K distinct candidates on 4 inputs: cheap enough to send many times.

    The server replays a body it has answered before (the client's Idempotency-Key is the body's
    sha256) without scoring it again: a test that counts what the server scores sends bodies of its
    own `seed`.
    """
    z = np.random.default_rng(seed).normal(size=(k, 1, 16))
    spec = normal_spec(seed=5, d=16, D=4 * 384, target_std=0.05)
    if encoding == "intrinsic":
        cand = IntrinsicPrompts(z=Tensor.from_numpy(z), projections=[spec], prompt_length=4)
    else:
        from bbt.projection import project

        p = project(z[:, 0], spec).reshape(k, 1, 4, 384)
        cand = PromptTensor(prompts=Tensor.from_numpy(p, dtype=encoding))
    return EvaluateRequest(model="minilm", task=TASK, inputs=DATA.train.examples[:4], labels=DATA.train.labels[:4],
                           return_logits=True, candidates=cand)


def quiet(*_args) -> None:
    pass


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


# ---- the client imports no torch ----------------------------------------------------------------

def test_http_client_imports_no_torch():
    code = "import bbt, bbt.backends.http, bbt.tuner, bbt.runs, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


# ---- the same run in process and over HTTP -------------------------------------------------------

@pytest.mark.parametrize("encoding,method,init", [("intrinsic", "bbt", "zero"), ("float32", "bbt", "zero"),
                                                  ("intrinsic", "bbtv2", "zero"), ("intrinsic", "bbt", "demos")])
def test_tuning_over_http_equals_in_process(encoding, method, init, local, http, tmp_path):
    """The same run either way; with demonstrations as p0 the server embeds the client's text."""
    cfg = small_config(encoding, method=method, init=init)
    want = run_tune(cfg, TASK, DATA, local, tmp_path / "local", progress=False, log=quiet)
    got = run_tune(cfg, TASK, DATA, http, tmp_path / "http", progress=False, log=quiet)
    assert without_timing(got) == without_timing(want)  # accuracies, losses, spending: exactly
    assert got["queries_used"] == 40 and want["spending"]["usage_mismatches"] == []
    z_local = json.loads((tmp_path / "local" / "prompt.json").read_text())["z"]
    z_http = json.loads((tmp_path / "http" / "prompt.json").read_text())["z"]
    assert z_http == z_local and np.abs(np.asarray(z_http)).sum() > 0  # a real search moved z, identically
    log_local = [without_timing(json.loads(x)) for x in (tmp_path / "local" / "log.jsonl").read_text().splitlines()]
    log_http = [without_timing(json.loads(x)) for x in (tmp_path / "http" / "log.jsonl").read_text().splitlines()]
    assert log_http == log_local and len(log_http) == 4
    assert [r["layer"] for r in log_http] == ([0] * 4 if method == "bbt" else [0, 1, 2, 3])


def test_verbalizer_search_and_second_stage_over_http_equal_in_process(local, http, tmp_path):
    """--verbalizer auto (label texts scored as labels) and --local cobyla: the same run either way."""
    cfg = small_config(queries=50).model_copy(update={"verbalizer": "auto", "label_words": 2, "local": "cobyla",
                                                      "local_share": 0.4, "local_dim": 4})
    want = run_tune(cfg, TASK, DATA, local, tmp_path / "local", progress=False, log=quiet)
    got = run_tune(cfg, TASK, DATA, http, tmp_path / "http", progress=False, log=quiet)
    assert without_timing(got) == without_timing(want) and got["verbalizer"]["label_words"] == 2
    log_http = [without_timing(json.loads(x)) for x in (tmp_path / "http" / "log.jsonl").read_text().splitlines()]
    log_local = [without_timing(json.loads(x)) for x in (tmp_path / "local" / "log.jsonl").read_text().splitlines()]
    assert log_http == log_local and any(r.get("stage") == "local" for r in log_http)
    assert got["queries_used"] <= 50


def test_two_folds_over_http_equal_in_process(local, http, tmp_path):
    """--folds 2 is the client's own bookkeeping: the server sees only train and dev requests."""
    cfg = small_config(queries=50).model_copy(update={"folds": 2})
    want = run_tune(cfg, TASK, DATA, local, tmp_path / "local", progress=False, log=quiet)
    got = run_tune(cfg, TASK, DATA, http, tmp_path / "http", progress=False, log=quiet)
    assert without_timing(got) == without_timing(want) and got["fold"] in (0, 1) and got["queries_used"] <= 50


# ---- retries ------------------------------------------------------------------------------------

def test_tuning_through_faults_equals_in_process_and_counts_once(local, server, faults):
    """Failures injected mid-run (5xx, 429 with Retry-After, a timeout) are retried: same result, no double counting."""
    cfg = small_config(queries=40, seed=8)  # requests no other test sends: the server scores each (no replays)
    ledger_local = Ledger(cfg.budget)
    want = tune(local, cfg, TASK, DATA.train, DATA.dev, ledger_local)

    plans = iter([
        {"fail_next": 2, "status": 503},
        {"fail_next": 1, "status": 429, "retry_after": 0.3},
        {"fail_next": 1, "status": 500, "delay": 6.0},  # longer than the client's timeout: seen as a timeout
    ])

    def arm_next(_record: dict) -> None:
        plan = next(plans, None)
        if plan is not None:
            faults.arm(**plan)

    before = faults.counters()
    with HTTPBackend([server.url], api_key=API_KEY, timeout=4.0, retries=4, backoff=0.01) as backend:
        ledger = Ledger(cfg.budget)
        got = tune(backend, cfg, TASK, DATA.train, DATA.dev, ledger, on_generation=arm_next)
        attempts = backend.attempts
    after = faults.counters()
    assert np.array_equal(got.prompt.z, want.prompt.z)
    assert [without_timing(r) for r in got.history] == [without_timing(r) for r in want.history]
    assert len(got.history) == 4  # so all three faults were armed before a later generation
    served = after["served"] - before["served"]
    assert after["injected"] - before["injected"] == 4 and after["armed"] == 0
    # the server did each evaluate once, and the client booked exactly what the server did
    assert ledger.tuning.queries == ledger_local.tuning.queries == after["queries_served"] - before["queries_served"]
    assert ledger.tuning.requests == served
    assert ledger.mismatches == []
    # every injected failure cost one more HTTP request: evaluates + model info + 2 stats + 4 retries
    assert attempts == served + 1 + 2 + 4


def test_5xx_then_success(http, faults):
    want = http.evaluate(tiny_request())
    faults.arm(fail_next=3, status=502)
    before = http.attempts
    got = http.evaluate(tiny_request())
    assert http.attempts - before == 4
    assert got == want


def test_429_waits_for_retry_after(http, faults):
    faults.arm(fail_next=1, status=429, retry_after=1.0)
    start = time.perf_counter()
    http.evaluate(tiny_request())
    assert time.perf_counter() - start >= 1.0  # the backoff alone (<= 0.05 s) would be far shorter


def test_timeout_is_retried(server, faults):
    faults.arm(fail_next=1, status=503, delay=5.0)
    before = faults.counters()
    with HTTPBackend(server.url, api_key=API_KEY, timeout=2.0, retries=2, backoff=0.01) as backend:
        start = time.perf_counter()
        answer = backend.evaluate(tiny_request(seed=12))
        assert time.perf_counter() - start >= 2.0 and backend.attempts == 2
    assert answer.usage.queries == 3
    assert faults.counters()["served"] - before["served"] == 1


def test_retries_exhausted_is_server_unavailable(server, faults):
    faults.arm(fail_next=3, status=503)
    with HTTPBackend(server.url, api_key=API_KEY, retries=2, backoff=0.01) as backend:
        with pytest.raises(ServerUnavailable, match=r"3 attempts.*503") as info:
            backend.evaluate(tiny_request())
    assert server.url in str(info.value)
    assert faults.counters()["armed"] == 0  # exactly three requests went out


def test_connection_refused_is_server_unavailable():
    url = f"http://127.0.0.1:{free_port()}"
    with HTTPBackend(url, retries=2, backoff=0.01) as backend:
        with pytest.raises(ServerUnavailable, match="ConnectError") as info:
            backend.evaluate(tiny_request())
        assert backend.attempts == 3
    assert url in str(info.value)


# ---- refusals are not retried --------------------------------------------------------------------

@pytest.mark.parametrize("key", [None, "wrong-key-0123456"])
def test_missing_or_wrong_key_is_auth_error(server, key, monkeypatch):
    monkeypatch.delenv("BBT_API_KEY", raising=False)
    with HTTPBackend(server.url, api_key=key) as backend:
        with pytest.raises(AuthError) as info:
            backend.model_info("minilm")
        assert backend.attempts == 1
    assert info.value.status == 401
    assert "--api-key" in str(info.value) and "BBT_API_KEY" in str(info.value)


def test_api_key_from_environment(server, monkeypatch):
    monkeypatch.setenv("BBT_API_KEY", API_KEY)
    with HTTPBackend(server.url) as backend:
        assert backend.model_info("minilm").hidden_size == 384


def test_bad_request_is_rejected_once(http):
    req = tiny_request().model_copy(update={"model": "gpt-17"})
    with pytest.raises(RequestRejected) as info:
        http.evaluate(req)
    assert info.value.status == 404 and "gpt-17" in info.value.detail and http.attempts == 1
    too_many = tiny_request(k=65)  # the shared server takes at most 64 candidates
    with pytest.raises(RequestRejected, match="limit is 64"):
        http.evaluate(too_many)
    assert http.evaluate(tiny_request()).usage.queries == 3  # and the backend still works


def test_endpoint_urls():
    with HTTPBackend(["http://127.0.0.1:9/v1/", "https://example.org/"]) as b:
        assert b.endpoints == ["http://127.0.0.1:9", "https://example.org"]
    for bad in ([], ["localhost:8000"]):
        with pytest.raises(ConfigError):
            HTTPBackend(bad)


# ---- several endpoints ---------------------------------------------------------------------------

def _with_k(answer: EvaluateResponse, k: int, n: int = 4) -> None:
    assert len(answer.losses) == k and answer.logits.shape == [k, n, 2]
    assert answer.usage.queries == k and answer.usage.examples == k * n


@pytest.mark.parametrize("encoding", ["intrinsic", "float16"])
def test_split_and_merge_keep_order_and_bytes(encoding):
    """No server: a population cut along K and glued back is the same population, dtype kept."""
    req = tiny_request(k=5, encoding=encoding)
    parts = _split(req, 2)

    def tensor(r: EvaluateRequest) -> Tensor:
        return r.candidates.z if encoding == "intrinsic" else r.candidates.prompts

    assert [tensor(p).shape[0] for p in parts] == [3, 2]
    assert all(tensor(p).dtype == tensor(req).dtype for p in parts)
    glued = b"".join(base64.b64decode(tensor(p).data) for p in parts)
    assert glued == base64.b64decode(tensor(req).data)  # the very bytes, nothing widened or rounded
    assert len(_split(req, 9)) == 5  # never an empty part
    zero = req.model_copy(update={"candidates": None})
    assert _split(zero, 3) == [zero]
    answers = [EvaluateResponse(model="m", losses=[float(i), float(i) + 0.5],
                                logits=Tensor.from_numpy(np.full((2, 4, 2), i)), usage=Usage(queries=2, requests=1))
               for i in range(2)]
    merged = _merge(answers)
    assert merged.losses == [0.0, 0.5, 1.0, 1.5] and merged.usage == Usage(queries=4, requests=2)
    assert merged.logits.to_numpy()[:, 0, 0].tolist() == [0, 0, 1, 1]


def test_population_split_across_two_servers(server, http, tmp_path):
    """Two real servers each score a contiguous part, concurrently; the answer matches one server's."""
    keys = tmp_path / "keys.txt"
    keys.write_text(API_KEY + "\n")
    with running_server("--model", "minilm", "--api-keys", str(keys), env={"BBT_TEST_FAULTS": "1"}) as second:
        def count(url: str) -> int:
            return httpx.get(url + "/v1/_faults", headers={"Authorization": f"Bearer {API_KEY}"}).json()["queries_served"]

        before = count(server.url), count(second.url)
        with HTTPBackend([server.url, second.url], api_key=API_KEY) as both:
            for encoding in ("intrinsic", "float32"):
                req = tiny_request(k=5, encoding=encoding, seed=13)
                one, two = http.evaluate(req), both.evaluate(req)
                _with_k(two, 5)
                assert two.usage.requests == 2 and one.usage.requests == 1
                assert two.usage.tokens == one.usage.tokens
                # batches of 3 and 2 may round differently from one batch of 5, in the last bits only
                np.testing.assert_allclose(two.losses, one.losses, rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(two.logits.to_numpy(), one.logits.to_numpy(), rtol=1e-4, atol=1e-5)
                assert np.ptp(one.losses) > 1e-3  # candidates differ, so a reordering would show
            zero = both.evaluate(tiny_request(seed=13).model_copy(update={"candidates": None, "inputs": DATA.train.examples[:3],
                                                                          "labels": DATA.train.labels[:3]}))
            _with_k(zero, 1, n=3)
        after = count(server.url), count(second.url)
    # per encoding: 5 (one server alone) + 3 (first part) on the first, 2 (second part) on the second; zero prompt: 1
    assert after[0] - before[0] == 2 * (5 + 3) + 1 and after[1] - before[1] == 2 * 2


# ---- first contact: a wrong address fails fast, a known server gets the whole wait ---------------

HTML_PAGE = "<html><head><title>501 Not Implemented</title></head><body>" + "<p>nothing here</p>" * 2000 + "</body></html>"


@pytest.fixture
def fake_server():
    """A loopback HTTP server answering every request with `fake_server.answer` = (status, content type, body)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            status, kind, body = httpd.answer
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _reply

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.answer = (501, "text/html", HTML_PAGE)
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_an_html_page_is_one_short_line_per_retry_and_a_short_window(fake_server, caplog):
    with HTTPBackend(fake_server.url, wait=60, first_contact_wait=1.0, backoff=0.05, max_backoff=0.1) as backend:
        start = time.monotonic()
        with pytest.raises(ServerUnavailable) as info, caplog.at_level("WARNING", logger="bbt.backends.http"):
            backend.model_info("minilm")
        assert time.monotonic() - start < 5  # the short first-contact window, not --wait's 60 s
        assert backend.attempts >= 2
    message = str(info.value)
    assert "does not answer as a bbt server" in message and "'501 Not Implemented'" in message
    assert "nothing here" not in message and len(message) < 400
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == backend.attempts - 1  # one line per retry
    for line in lines:
        assert "nothing here" not in line and "\n" not in line and len(line) < 300, line


def test_refused_at_first_contact_fails_fast_and_quietly(caplog):
    url = f"http://127.0.0.1:{free_port()}"
    with HTTPBackend(url, wait=60, first_contact_wait=1.0, backoff=0.05, max_backoff=0.1) as backend:
        start = time.monotonic()
        with pytest.raises(ServerUnavailable, match="nothing answers at .*check the address"), \
                caplog.at_level("WARNING", logger="bbt.backends.http"):
            backend.model_info("minilm")
        assert time.monotonic() - start < 5 and backend.attempts >= 2
    assert caplog.records == []  # the retries of a refused first connection say nothing; the error says it all


def test_a_server_that_answered_before_gets_the_whole_wait(fake_server, caplog):
    fake_server.answer = (503, "application/json", json.dumps({"error": "loading", "detail": "the model is loading"}))
    with HTTPBackend(fake_server.url, wait=1.5, first_contact_wait=0.2, backoff=0.05, max_backoff=0.1) as backend:
        start = time.monotonic()
        with pytest.raises(ServerUnavailable, match="did not answer after"):
            backend.model_info("minilm")  # bbt's JSON: a bbt server, restarting; patience
        assert time.monotonic() - start > 1.0
    url = f"http://127.0.0.1:{free_port()}"  # a resumed run: the run folder says its server answered before
    with HTTPBackend(url, wait=1.5, first_contact_wait=None, backoff=0.05, max_backoff=0.1) as backend:
        start = time.monotonic()
        with pytest.raises(ServerUnavailable, match="did not answer after"):
            backend.model_info("minilm")
        assert time.monotonic() - start > 1.0
