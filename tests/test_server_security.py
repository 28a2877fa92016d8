"""API keys kept as digests, per-key quotas and rate limits, idempotent replays (servers.auth, .quotas, .idempotency).

Most tests run the app on a real uvicorn in a thread (tests/appserver.py) with the tiny encoder,
each with its own settings and a fake clock where time matters; one starts a real `bbt serve`
to check the flags, the environment keys and its log end to end.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest

from appserver import serving
from bbt.cli import main as bbt_main
from bbt.errors import ConfigError
from bbt.projection import normal_spec
from bbt.protocol import ErrorBody, EvaluateRequest, EvaluateResponse, Example, IntrinsicPrompts, StatsRequest, Tensor
from bbt.tasks import resolve_task
from serverproc import running_server
from servers import auth
from servers.app import create_app, serve
from servers.idempotency import IdempotencyStore, KeyReused
from servers.quotas import QuotaExhausted, Quotas, RateLimited
from servers.service import ModelService

KEY, OTHER = "first-key-0123456789", "second-key-9876543210"
H, L, D = 32, 2, 4  # the tiny encoder's hidden size; a short prompt and a small z
TASK = resolve_task("sst2")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def auth_header(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def body(k: int = 2, seed: int = 0, model: str = "tiny") -> dict:
    """A valid evaluate body for the tiny encoder: K intrinsic candidates on two inputs."""
    z = np.random.default_rng(seed).normal(size=(k, 1, D))
    req = EvaluateRequest(
        model=model, task=TASK, labels=[1, 0],
        inputs=[Example(text="a warm and funny film"), Example(text="dull and far too long")],
        candidates=IntrinsicPrompts(z=Tensor.from_numpy(z), prompt_length=L,
                                    projections=[normal_spec(seed=1, d=D, D=L * H, target_std=0.05)]))
    return json.loads(req.model_dump_json())


def assert_error(resp: httpx.Response, status: int, kind: str, *words: str) -> ErrorBody:
    assert resp.status_code == status, resp.text
    err = ErrorBody.model_validate_json(resp.content)
    assert err.error == kind, err
    for word in words:
        assert word.lower() in err.detail.lower(), f"{word!r} not in {err.detail!r}"
    return err


@pytest.fixture(scope="module")
def service(tiny_encoder):
    return ModelService([f"tiny={tiny_encoder}"], lazy=False)


@pytest.fixture
def make_server(service):
    """make_server(quotas=..., ...) -> (url, app): a fresh app (fresh quota and replay state) on a real port."""
    stack = []

    def make(**kwargs):
        kwargs.setdefault("api_keys", [KEY, "sha256:" + auth.digest(OTHER)])
        kwargs.setdefault("test_faults", True)
        app = create_app(service, **kwargs)
        ctx = serving(app)
        stack.append(ctx)
        return ctx.__enter__(), app

    yield make
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


def counters(url: str) -> dict:
    return httpx.get(url + "/v1/_faults", headers=auth_header(KEY)).json()


# ---- API keys ------------------------------------------------------------------------------------

def test_keys_file_keeps_only_digests(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(f"# plaintext and hashed keys\n{KEY}\n\n  sha256:{auth.digest(OTHER).upper()}  \n")
    digests = auth.load_api_keys(path)
    assert digests == {auth.digest(KEY), auth.digest(OTHER)}
    assert KEY not in digests and OTHER not in str(digests)


@pytest.mark.parametrize("entry, words", [
    ("short", ["line 2", "at least 8 characters"]),
    ("has a-space-inside", ["line 2", "no spaces"]),
    ("sha256:abc123", ["line 2", "64 hex"]),
    ("sha256:" + "g" * 64, ["line 2", "64 hex"]),
])
def test_bad_key_lines_are_refused_without_repeating_them(tmp_path, entry, words):
    path = tmp_path / "keys.txt"
    path.write_text(f"{KEY}\n{entry}\n")
    with pytest.raises(ConfigError) as err:
        auth.load_api_keys(path)
    for word in words:
        assert word in str(err.value)
    assert entry not in str(err.value)


def test_keys_from_the_environment():
    assert auth.keys_from_env(f" {KEY},sha256:{auth.digest(OTHER)}\n third-key-555555 ") == {
        auth.digest(KEY), auth.digest(OTHER), auth.digest("third-key-555555")}
    with pytest.raises(ConfigError, match="holds no keys"):
        auth.keys_from_env(" , ")
    with pytest.raises(ConfigError, match="entry 2") as err:
        auth.keys_from_env(f"{KEY},tiny")
    assert "tiny" not in str(err.value)


def test_plain_and_hashed_keys_work_and_wrong_ones_are_401(make_server):
    url, app = make_server()
    assert KEY not in str(vars(app.state)) and OTHER not in str(vars(app.state))  # only digests are kept
    for key in (KEY, OTHER):
        assert httpx.post(url + "/v1/evaluate", json=body(), headers=auth_header(key)).status_code == 200
    wrong = "wrong-key-but-long-enough"
    for headers in ({}, auth_header(wrong), {"Authorization": f"Token {KEY}"}, auth_header(auth.digest(KEY))):
        resp = httpx.post(url + "/v1/evaluate", json=body(), headers=headers)
        assert_error(resp, 401, "unauthorized")
        assert wrong not in resp.text and KEY not in resp.text
    assert httpx.get(url + "/v1/health").status_code == 200


def test_serve_checks_quota_flags_before_loading(monkeypatch, capsys):
    """Bad values fail before the model (which does not exist) is looked at, with the flag named."""
    monkeypatch.delenv(auth.ENV_VAR, raising=False)
    for kwargs, flag in (({"quota": 0}, "--quota"), ({"quota_window": 0}, "--quota-window"),
                         ({"rate_limit": -1.0}, "--rate-limit"), ({"rate_limit": float("nan")}, "--rate-limit")):
        with pytest.raises(ConfigError, match=flag):
            serve(["no-such-model"], **kwargs)
    assert bbt_main(["serve", "--model", "no-such-model", "--quota-window", "-5"]) == 1
    assert "--quota-window" in capsys.readouterr().err
    monkeypatch.setenv(auth.ENV_VAR, "  ")
    with pytest.raises(ConfigError, match=auth.ENV_VAR):
        serve(["no-such-model"])
    monkeypatch.delenv(auth.ENV_VAR)
    with pytest.raises(ConfigError, match="--state /proc/no/such.sqlite: cannot open it"):
        serve(["no-such-model"], state="/proc/no/such.sqlite")


def test_quota_windows_and_answers_outlive_the_process_in_the_state_file(tmp_path):
    """What one server process wrote to --state, the next reads: charges, window starts and stored
    answers; a transaction that fails leaves neither its charge nor its answer."""
    from servers.state import ServerState

    clock = FakeClock()
    path = tmp_path / "state.sqlite"
    first = ServerState(path)
    quotas = Quotas(quota=10, window=3600, state=first, clock=clock)
    store = IdempotencyStore(state=first, clock=clock)
    quotas.reserve("acc", 4)
    assert store.begin("acc", "k1", "h1") is None
    with first.transaction():
        quotas.settle("acc", 4, 4)
        store.finish("acc", "k1", b"answer one")
    quotas.reserve("acc", 3)
    assert store.begin("acc", "k2", "h2") is None
    with pytest.raises(RuntimeError), first.transaction():  # the charge is written, then the process fails
        quotas.settle("acc", 3, 3)
        raise RuntimeError("crash before the answer is stored")
    store.finish("acc", "k2", None)
    first.close()

    second = ServerState(path)  # a restarted server
    clock.now += 600
    quotas = Quotas(quota=10, window=3600, state=second, clock=clock)
    store = IdempotencyStore(state=second, clock=clock)
    assert quotas.used("acc") == 4  # the rolled-back charge is not there
    assert store.begin("acc", "k1", "h1") == b"answer one"
    assert store.begin("acc", "k2", "h2") is None  # not stored: scored afresh
    with pytest.raises(QuotaExhausted, match="used 4 of its 10"):
        quotas.reserve("acc", 7)
    clock.now += 3000  # past the window that opened before the restart
    quotas.reserve("acc", 10)


@pytest.mark.slow
def test_bbt_serve_with_environment_keys_and_a_quota_logs_no_key(tiny_encoder):
    """A real `bbt serve`: keys from BBT_SERVER_API_KEYS, --quota enforced, keys nowhere in bodies or the log."""
    wrong = "a-wrong-key-00000000"
    with running_server("--model", f"tiny={tiny_encoder}", "--quota", "5", "--rate-limit", "50",
                        env={auth.ENV_VAR: f"{KEY}, {OTHER}"}) as server:
        seen = []
        with httpx.Client(base_url=server.url, timeout=60) as c:
            seen.append(c.post("/v1/evaluate", json=body(k=4), headers=auth_header(KEY)))
            assert seen[-1].status_code == 200
            seen.append(c.post("/v1/evaluate", json=body(k=2), headers=auth_header(KEY)))
            assert_error(seen[-1], 429, "quota_exhausted", "used 4 of its 5")
            seen.append(c.post("/v1/evaluate", json=body(k=4), headers=auth_header(OTHER)))
            assert seen[-1].status_code == 200  # another key, another quota
            seen.append(c.post("/v1/evaluate", json=body(), headers=auth_header(wrong)))
            assert_error(seen[-1], 401, "unauthorized")
        log = server.log()
    assert f"2 API key(s) from {auth.ENV_VAR}" in log
    assert f"quota_exhausted: account {auth.account_of(auth.digest(KEY))}" in log
    for secret in (KEY, OTHER, wrong):
        assert secret not in log
        assert all(secret not in r.text and secret not in str(r.headers) for r in seen)


# ---- quotas --------------------------------------------------------------------------------------

def test_quota_refuses_a_request_whole_and_charges_only_answers(make_server):
    clock = FakeClock()
    quotas = Quotas(quota=10, window=3600, clock=clock)
    url, _ = make_server(quotas=quotas)
    account = auth.account_of(auth.digest(KEY))
    with httpx.Client(base_url=url, headers=auth_header(KEY), timeout=60) as c:
        for _ in range(2):
            assert c.post("/v1/evaluate", json=body(k=4)).status_code == 200
        assert quotas.used(account) == 8
        resp = c.post("/v1/evaluate", json=body(k=4))
        assert_error(resp, 429, "quota_exhausted", "used 8", "of its 10", "asks for 4", "resets in 3600 s")
        assert resp.headers["retry-after"] == "3600"
        assert quotas.used(account) == 8  # the refused request cost nothing
        # requests that fail cost nothing either: an invalid one and one failed by the fault switch
        bad = body(k=2)
        bad["candidates"]["prompt_length"] = 500
        assert_error(c.post("/v1/evaluate", json=bad), 422, "invalid_request")
        c.post("/v1/_faults", json={"fail_next": 1, "status": 503})
        assert c.post("/v1/evaluate", json=body(k=2)).status_code == 503
        assert c.post("/v1/stats", json=stats_body()).status_code == 200  # no queries
        assert quotas.used(account) == 8
        assert c.post("/v1/evaluate", json=body(k=2)).status_code == 200  # what still fits is served
        assert_error(c.post("/v1/evaluate", json=body(k=1)), 429, "quota_exhausted", "used 10")
        clock.now += 1800
        assert c.post("/v1/evaluate", json=body(k=1)).headers["retry-after"] == "1800"
        clock.now += 1800  # the window is over: a fresh quota
        assert c.post("/v1/evaluate", json=body(k=4)).status_code == 200
        assert quotas.used(account) == 4
    assert counters(url)["served"] == 4 and counters(url)["queries_served"] == 4 + 4 + 2 + 4
    # another key has its own quota
    assert httpx.post(url + "/v1/evaluate", json=body(k=10), headers=auth_header(OTHER)).status_code == 200


def test_concurrent_reservations_cannot_overshoot_the_quota():
    quotas = Quotas(quota=10)
    quotas.reserve("a", 6)  # in flight
    with pytest.raises(QuotaExhausted, match="in requests being scored"):
        quotas.reserve("a", 6)
    quotas.reserve("b", 6)  # another account
    quotas.settle("a", 6, 0)  # the first one failed: released, not charged
    quotas.reserve("a", 6)
    quotas.settle("a", 6, 6)
    assert quotas.used("a") == 6 and quotas.used("b") == 0
    with pytest.raises(QuotaExhausted, match="more than the whole quota"):
        quotas.reserve("c", 11)


# ---- rate limits ---------------------------------------------------------------------------------

def test_rate_limit_is_a_token_bucket_per_key(make_server):
    clock = FakeClock()
    url, _ = make_server(quotas=Quotas(rate=2, clock=clock))  # bursts of 2, one token every 0.5 s
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/v1/models", headers=auth_header(KEY)).status_code == 200
        assert c.post("/v1/stats", json=stats_body(), headers=auth_header(KEY)).status_code == 200  # stats count
        resp = c.post("/v1/evaluate", json=body(), headers=auth_header(KEY))
        assert_error(resp, 429, "rate_limited", "2 requests a second", "0.50 s")
        assert resp.headers["retry-after"] == "1"
        assert all(c.get("/v1/health").status_code == 200 for _ in range(5))  # public and unlimited
        assert c.get("/v1/models", headers=auth_header(OTHER)).status_code == 200  # its own bucket
        clock.now += 0.5
        assert c.post("/v1/evaluate", json=body(), headers=auth_header(KEY)).status_code == 200
        assert c.get("/v1/models", headers=auth_header(KEY)).status_code == 429


def test_rate_retry_after_is_whole_seconds_until_a_token():
    clock = FakeClock()
    quotas = Quotas(rate=0.1, clock=clock)
    quotas.take_token("a")
    clock.now += 2.5
    with pytest.raises(RateLimited) as err:
        quotas.take_token("a")
    assert err.value.retry_after == 8  # 7.5 s to the next token, rounded up


# ---- idempotency ---------------------------------------------------------------------------------

def stats_body() -> dict:
    return json.loads(StatsRequest(model="tiny", task=TASK, inputs=[Example(text="fine")]).model_dump_json())


def test_same_key_twice_is_served_and_charged_once(make_server):
    quotas = Quotas(quota=100)
    url, _ = make_server(quotas=quotas)
    account = auth.account_of(auth.digest(KEY))
    with httpx.Client(base_url=url, headers=auth_header(KEY), timeout=60) as c:
        first = c.post("/v1/evaluate", json=body(k=3), headers={"Idempotency-Key": "req-1"})
        again = c.post("/v1/evaluate", json=body(k=3), headers={"Idempotency-Key": "req-1"})
        assert first.status_code == again.status_code == 200
        assert "idempotent-replayed" not in first.headers and again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content
        assert quotas.used(account) == 3
        assert {k: counters(url)[k] for k in ("served", "replayed", "queries_served")} == \
            {"served": 1, "replayed": 1, "queries_served": 3}
        # the key belongs to one body
        assert_error(c.post("/v1/evaluate", json=body(k=3, seed=1), headers={"Idempotency-Key": "req-1"}),
                     422, "idempotency_key_reused", "req-1")
        # and to one route
        assert_error(c.post("/v1/stats", json=stats_body(), headers={"Idempotency-Key": "req-1"}),
                     422, "idempotency_key_reused")
        # stats replay too
        s1 = c.post("/v1/stats", json=stats_body(), headers={"Idempotency-Key": "stats-1"})
        s2 = c.post("/v1/stats", json=stats_body(), headers={"Idempotency-Key": "stats-1"})
        assert s1.status_code == 200 and s2.headers["idempotent-replayed"] == "true" and s2.content == s1.content
        for bad in ("", "has space", "x" * 129, "semi;colon"):
            assert_error(c.post("/v1/evaluate", json=body(), headers={"Idempotency-Key": bad}),
                         422, "invalid_request", "idempotency-key")
    # keys are per account: another key's request with the same Idempotency-Key is its own
    resp = httpx.post(url + "/v1/evaluate", json=body(k=3, seed=1), headers={**auth_header(OTHER), "Idempotency-Key": "req-1"})
    assert resp.status_code == 200 and "idempotent-replayed" not in resp.headers
    assert quotas.used(account) == 3


def test_a_twin_in_flight_waits_for_the_first(make_server, service, monkeypatch):
    """The same key arriving while the first is scored waits and replays; if the first fails, it is processed."""
    url, _ = make_server(quotas=Quotas(quota=100))
    real = service.evaluate
    calls, fail_first = [], []

    def slow(req):
        calls.append(req)
        time.sleep(0.5)
        if fail_first and len(calls) == 1:
            raise ConfigError("the first one fails")
        return real(req)

    monkeypatch.setattr(service, "evaluate", slow)
    for fail in (False, True):
        calls.clear()
        fail_first[:] = [True] if fail else []
        key = f"twin-{fail}"
        answers: list[httpx.Response] = []

        def send():
            answers.append(httpx.post(url + "/v1/evaluate", json=body(), timeout=60,
                                      headers={**auth_header(KEY), "Idempotency-Key": key}))

        threads = [threading.Thread(target=send) for _ in range(2)]
        threads[0].start()
        time.sleep(0.2)  # the first is being scored
        threads[1].start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in answers)
        if fail:
            assert codes == [200, 422] and len(calls) == 2  # the twin was processed itself
        else:
            assert codes == [200, 200] and len(calls) == 1  # scored once
            assert sorted(r.headers.get("idempotent-replayed", "no") for r in answers) == ["no", "true"]


def test_timeout_then_retry_is_answered_from_memory_and_charged_once(make_server):
    """The server scores and charges, then answers too late; the client's retry with the same key is replayed."""
    quotas = Quotas(quota=100)
    url, _ = make_server(quotas=quotas)
    account = auth.account_of(auth.digest(KEY))
    payload = json.dumps(body(k=3)).encode()
    headers = {**auth_header(KEY), "Content-Type": "application/json", "Idempotency-Key": "sha-of-the-body"}
    httpx.post(url + "/v1/_faults", json={"fail_next": 1, "delay_after": 1.5}, headers=auth_header(KEY))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/evaluate", content=payload, headers=headers, timeout=0.5)
    retry = httpx.post(url + "/v1/evaluate", content=payload, headers=headers, timeout=30)
    assert retry.status_code == 200 and retry.headers["idempotent-replayed"] == "true"
    assert quotas.used(account) == 3
    assert {k: counters(url)[k] for k in ("served", "replayed", "injected")} == {"served": 1, "replayed": 1, "injected": 1}
    # the replayed answer is the answer: the same as scoring the body afresh (under another key)
    fresh = httpx.post(url + "/v1/evaluate", content=payload, timeout=30,
                       headers={**auth_header(OTHER), "Content-Type": "application/json"})
    assert EvaluateResponse.model_validate_json(retry.content) == EvaluateResponse.model_validate_json(fresh.content)


def test_store_is_bounded_and_forgets_old_answers():
    clock = FakeClock()
    store = IdempotencyStore(max_entries=2, ttl=60, clock=clock)
    for key in ("a", "b", "c"):
        assert store.begin("acc", key, "h-" + key) is None
        store.finish("acc", key, key.encode())
    assert len(store) == 2 and store.begin("acc", "c", "h-c") == b"c"
    assert store.begin("acc", "a", "h-a") is None  # evicted (least recently used): served afresh
    store.finish("acc", "a", None)  # failed: forgotten
    assert store.begin("acc", "a", "h-a") is None
    store.finish("acc", "a", b"a")
    with pytest.raises(KeyReused):
        store.begin("acc", "a", "other body")
    clock.now += 61
    assert store.begin("acc", "a", "other body") is None  # expired: the key is free again
