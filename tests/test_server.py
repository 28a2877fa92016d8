"""The HTTP server (`bbt serve`) as a client meets it: a real uvicorn process with MiniLM on loopback.

Raw httpx requests, so that bodies no bbt client would send (bad JSON, wrong shapes, NaN, too
large) can be sent; every refusal must be a 4xx ErrorBody that says what was wrong, and the next
good request must still be served.
"""

from __future__ import annotations

import base64
import json
import pickle
import subprocess
import sys

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from bbt.projection import normal_spec
from bbt.protocol import (
    ErrorBody,
    EvaluateRequest,
    EvaluateResponse,
    Example,
    Health,
    IntrinsicPrompts,
    ModelInfo,
    ModelList,
    StatsRequest,
    StatsResponse,
    Tensor,
)
from bbt.tasks import resolve_task
from serverproc import API_KEY, LIMITS, OTHER_KEY, REPO, shared_server
from servers.app import create_app
from servers.service import ModelService

pytestmark = pytest.mark.slow

H, L, D_INTRINSIC = 384, 4, 8  # MiniLM's hidden size; a short prompt and a small z keep requests cheap
TASK = resolve_task("sst2")
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def _disarm(request):
    """No armed fault outlives the test that armed it (the server is shared)."""
    yield
    if "client" in request.fixturenames:
        request.getfixturevalue("client").post("/v1/_faults", json={"fail_next": 0})


def good_request(k: int = 2, seed: int = 0) -> dict:
    """A small valid evaluate body: K intrinsic candidates on two inputs, as a JSON-ready dict."""
    rng = np.random.default_rng(seed)
    req = EvaluateRequest(
        model="minilm", task=TASK, labels=[1, 0], return_logits=True,
        inputs=[Example(text="a warm, funny and moving film"), Example(text="dull, flat and far too long")],
        candidates=IntrinsicPrompts(
            z=Tensor.from_numpy(rng.normal(size=(k, 1, D_INTRINSIC))),
            projections=[normal_spec(seed=1, d=D_INTRINSIC, D=L * H, target_std=0.05)], prompt_length=L),
    )
    return json.loads(req.model_dump_json())


def b64(array: np.ndarray, dtype: str = "<f4") -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


def assert_error(resp: httpx.Response, status: int, kind: str, *words: str) -> ErrorBody:
    assert resp.status_code == status, resp.text
    body = ErrorBody.model_validate_json(resp.content)  # every refusal is an ErrorBody
    assert body.error == kind, body
    for word in words:
        assert word.lower() in body.detail.lower(), f"{word!r} not in {body.detail!r}"
    return body


def assert_still_serving(client: httpx.Client) -> None:
    resp = client.post("/v1/evaluate", json=good_request())
    assert resp.status_code == 200, resp.text
    answer = EvaluateResponse.model_validate_json(resp.content)
    assert len(answer.losses) == 2 and answer.usage.queries == 2


# ---- discovery and documentation ----------------------------------------------------------------

def test_health_needs_no_key_and_lists_models(server):
    health = Health.model_validate_json(httpx.get(server.url + "/v1/health").content)
    assert health.models == ["minilm"] and health.protocol == "1"


def test_models_and_model_info(client):
    listed = ModelList.model_validate_json(client.get("/v1/models").content)
    info = ModelInfo.model_validate_json(client.get("/v1/models/minilm").content)
    assert listed.models == [info]
    assert (info.hidden_size, info.num_layers, info.family) == (384, 6, "encoder")
    assert len(info.hidden_std) == 6 and info.embedding_std > 0


def test_openapi_page_documents_protocol_v1(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/health", "/v1/models", "/v1/models/{name}", "/v1/evaluate", "/v1/stats"):
        assert path in spec["paths"], path
    assert "EvaluateRequest" in spec["components"]["schemas"]
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]


def test_stats(client):
    body = StatsRequest(model="minilm", task=TASK, inputs=[Example(text="fine"), Example(text="a bit longer text")])
    answer = StatsResponse.model_validate_json(client.post("/v1/stats", json=body.model_dump(mode="json")).content)
    assert len(answer.tokens) == 2 and answer.tokens[1] > answer.tokens[0]
    assert len(answer.hidden_std) == 6 and answer.usage.queries == 0


def test_evaluate_float16_prompts(client):
    """Prompts sent as float16 are widened on the server and scored like any other candidates."""
    req = good_request()
    prompts = np.random.default_rng(3).normal(0, 0.05, size=(3, 1, L, H))
    req["candidates"] = {"type": "prompts", "prompts": {"dtype": "float16", "shape": [3, 1, L, H], "data": b64(prompts, "<f2")}}
    answer = EvaluateResponse.model_validate_json(client.post("/v1/evaluate", json=req).content)
    assert answer.usage.queries == 3 and answer.logits.shape == [3, 2, 2]


# ---- API keys ------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers, words", [
    ({}, ["needs an API key", "Authorization: Bearer"]),
    ({"Authorization": "Bearer wrong-key-000000"}, ["not valid"]),
    ({"Authorization": f"Token {API_KEY}"}, ["needs an API key"]),  # right key, wrong scheme
    ({"Authorization": "Bearer"}, ["needs an API key"]),  # scheme without a key
])
def test_missing_or_wrong_key_is_401(server, headers, words):
    for method, path, body in (("GET", "/v1/models", None), ("POST", "/v1/evaluate", good_request())):
        resp = httpx.request(method, server.url + path, headers=headers, json=body)
        assert_error(resp, 401, "unauthorized", *words)
        assert resp.headers["www-authenticate"] == "Bearer"


def test_every_key_in_the_file_works(server):
    for key in (API_KEY, OTHER_KEY):
        resp = httpx.post(server.url + "/v1/evaluate", json=good_request(), headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200, resp.text


# ---- bad requests: a clear 4xx, then the next good request is served -----------------------------

def _with(path: str, value):
    """A good request with one field (dotted path) replaced."""
    def make() -> dict:
        req = good_request()
        *parents, last = path.split(".")
        node = req
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
        return req
    return make


def _z(array: np.ndarray, shape=None) -> dict:
    return {"dtype": "float32", "shape": list(shape or array.shape), "data": b64(array)}


def _prompts(k: int, h: int, fill: float = 0.01, dtype: str = "float32") -> dict:
    arr = np.full((k, 1, L, h), fill)
    return {"type": "prompts", "prompts": {"dtype": dtype, "shape": [k, 1, L, h],
                                           "data": b64(arr, "<f2" if dtype == "float16" else "<f4")}}


def _many_candidates() -> dict:
    return good_request(k=LIMITS["max_candidates"] + 1)


def _nan_z() -> dict:
    z = np.zeros((2, 1, D_INTRINSIC))
    z[1, 0, 3] = np.nan
    return _with("candidates.z", _z(z))()


def _inf_z() -> dict:
    z = np.zeros((2, 1, D_INTRINSIC))
    z[0, 0, 0] = np.inf
    return _with("candidates.z", _z(z))()


BAD_BODIES = {
    # name: (body, status, error kind, words the detail must hold)
    "missing task": (lambda: {k: v for k, v in good_request().items() if k != "task"}, 422, "invalid_request", ["task", "required"]),
    "unknown field": (_with("temperature", 0.7), 422, "invalid_request", ["temperature", "not permitted"]),
    "inputs not a list": (_with("inputs", "hello"), 422, "invalid_request", ["inputs"]),
    "empty inputs": (_with("inputs", []), 422, "invalid_request", ["inputs"]),
    "label out of range": (_with("labels", [1, 5]), 422, "invalid_request", ["outside"]),
    "labels count": (_with("labels", [1]), 422, "invalid_request", ["1 labels for 2 inputs"]),
    "unknown loss": (_with("loss", "mse"), 422, "invalid_request", ["loss"]),
    "unknown candidate type": (_with("candidates.type", "pickle"), 422, "invalid_request", ["candidates"]),
    "z bytes do not fit shape": (_with("candidates.z.shape", [2, 1, D_INTRINSIC + 1]), 422, "invalid_request", ["base64 characters"]),
    "z not base64": (_with("candidates.z.data", "!" * 88), 422, "invalid_request", ["not valid base64"]),
    "z 2-d": (_with("candidates.z", _z(np.zeros((2, D_INTRINSIC)))), 422, "invalid_request", ["z has shape", "expected"]),
    "z huge declared shape": (_with("candidates.z.shape", [10**9, 10**9, 10**9]), 422, "invalid_request", ["needs"]),
    "negative shape": (_with("candidates.z.shape", [-2, 1, D_INTRINSIC]), 422, "invalid_request", ["shape"]),
    "float64 dtype": (_with("candidates.z.dtype", "float64"), 422, "invalid_request", ["dtype"]),
    "z holds NaN": (_nan_z, 422, "invalid_request", ["NaN"]),
    "z holds inf": (_inf_z, 422, "invalid_request", ["infinite"]),
    "projection D mismatch": (_with("candidates.projections.0.D", 7 * H), 422, "invalid_request", ["projections[0]"]),
    "projection count": (_with("candidates.projections", []), 422, "invalid_request", ["projections"]),
    "negative scale": (_with("candidates.projections.0.scale", -1.0), 422, "invalid_request", ["scale"]),
    "prompt too long": (_with("candidates.prompt_length", 500), 422, "invalid_request", ["prompt length 500"]),
    "intrinsic dim over limit": (lambda: _with("candidates", {
        "type": "intrinsic", "z": _z(np.zeros((1, 1, 10001))), "prompt_length": 1,
        "projections": [{"kind": "normal", "seed": 0, "d": 10001, "D": H, "scale": 0.01}]})(),
        422, "invalid_request", ["intrinsic dimension 10001", "limit"]),
    "prompts wrong hidden size": (_with("candidates", _prompts(2, 100)), 422, "invalid_request", ["prompts have shape", str(H)]),
    "prompts float16 inf": (_with("candidates", _prompts(2, H, fill=np.inf, dtype="float16")), 422, "invalid_request", ["infinite"]),
    "too many candidates": (_many_candidates, 422, "invalid_request", [str(LIMITS["max_candidates"] + 1), "limit"]),
    "too many inputs": (lambda: _with("labels", None)() | {
        "inputs": [{"text": "x"}] * (LIMITS["max_examples"] + 1), "labels": None},
        422, "invalid_request", [str(LIMITS["max_examples"] + 1), "limit"]),
    "text too long": (_with("inputs.0.text", "word " * 5000), 422, "invalid_request", ["inputs[0].text", "limit"]),
    "unknown model": (_with("model", "gpt-17"), 404, "model_not_found", ["gpt-17", "minilm"]),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_request_is_4xx_and_server_goes_on(client, name):
    make, status, kind, words = BAD_BODIES[name]
    assert_error(client.post("/v1/evaluate", json=make()), status, kind, *words)
    assert_still_serving(client)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_infinity_literal_in_json_is_refused(client, value):
    """Python's JSON reader accepts bare NaN and Infinity; the schema must still refuse them."""
    body = good_request()
    body["candidates"]["projections"][0]["scale"] = value
    text = json.dumps(body)  # writes NaN / Infinity, as a careless client would
    assert "NaN" in text or "Infinity" in text
    assert_error(client.post("/v1/evaluate", content=text, headers={"Content-Type": "application/json"}),
                 422, "invalid_request", "projections.0.scale")
    assert_still_serving(client)


@pytest.mark.parametrize("content, content_type, status, kind", [
    (b"{this is not json", "application/json", 400, "invalid_json"),
    (pickle.dumps({"model": "minilm"}), "application/json", 400, "invalid_json"),  # never unpickled
    (pickle.dumps({"model": "minilm"}), "application/octet-stream", 422, "invalid_request"),
    (b"", "application/json", 422, "invalid_request"),
    (b"[1, 2, 3]", "application/json", 422, "invalid_request"),
    (json.dumps(good_request()).encode(), "text/plain", 422, "invalid_request"),
])
def test_bodies_that_are_not_a_request(client, content, content_type, status, kind):
    resp = client.post("/v1/evaluate", content=content, headers={"Content-Type": content_type})
    body = assert_error(resp, status, kind)
    if content_type == "text/plain":
        assert "application/json" in body.detail  # says how to mend it
    assert_still_serving(client)


def test_oversized_body_is_413_before_parsing(client):
    limit = int(LIMITS["max_body_mb"] * 2**20)
    big = json.dumps(good_request()).replace('"model"', '"pad": "' + "x" * (limit + 10) + '", "model"', 1).encode()
    # declared by Content-Length
    assert_error(client.post("/v1/evaluate", content=big, headers={"Content-Type": "application/json"}),
                 413, "request_too_large", str(limit), "--max-body-mb")
    assert_still_serving(client)
    # chunked: no Content-Length, so the bytes read are counted
    chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
    resp = client.post("/v1/evaluate", content=chunks, headers={"Content-Type": "application/json"})
    assert "content-length" not in resp.request.headers
    assert_error(resp, 413, "request_too_large", str(limit))
    assert_still_serving(client)


def test_a_body_just_under_the_limit_is_parsed(client):
    """The size guard must not refuse what fits: a body under the limit reaches the schema (extra field: 422)."""
    limit = int(LIMITS["max_body_mb"] * 2**20)
    body = json.dumps(good_request())
    padded = body.replace('"model"', '"pad": "' + "x" * (limit - len(body) - 100) + '", "model"', 1).encode()
    assert len(padded) < limit
    assert_error(client.post("/v1/evaluate", content=padded, headers={"Content-Type": "application/json"}),
                 422, "invalid_request", "pad")


def test_unknown_routes_and_methods(client):
    assert_error(client.get("/v1/nothing-here"), 404, "not_found", "/v1")
    assert_error(client.get("/v1/evaluate"), 405, "method_not_allowed")
    assert_error(client.get("/v1/models/gpt-17"), 404, "model_not_found", "gpt-17")
    assert_error(client.post("/v1/stats", json={"model": "minilm"}), 422, "invalid_request", "task")


# ---- failures on the server side ----------------------------------------------------------------

def test_unexpected_exception_is_500_and_server_stays_up(client):
    client.post("/v1/_faults", json={"fail_next": 1, "crash": True})
    assert_error(client.post("/v1/evaluate", json=good_request()), 500, "internal_error", "still up")
    assert_still_serving(client)


def test_fault_switch_fails_before_any_work(client):
    before = client.get("/v1/_faults").json()
    client.post("/v1/_faults", json={"fail_next": 2, "status": 429, "retry_after": 2})
    for _ in range(2):
        resp = client.post("/v1/evaluate", json=good_request())
        assert_error(resp, 429, "rate_limited")
        assert resp.headers["retry-after"] == "2"
    assert_still_serving(client)
    after = client.get("/v1/_faults").json()
    assert after["received"] - before["received"] == 3
    assert after["injected"] - before["injected"] == 2
    assert after["served"] - before["served"] == 1  # the failed ones did no work
    assert after["queries_served"] - before["queries_served"] == 2
    assert after["armed"] == 0


def test_fault_switch_needs_the_key(server):
    assert_error(httpx.post(server.url + "/v1/_faults", json={"fail_next": 5}), 401, "unauthorized")


# ---- the app without a model process (in-process ASGI) and start-up checks ----------------------

def test_fault_switch_is_off_unless_enabled(monkeypatch):
    monkeypatch.delenv("BBT_TEST_FAULTS", raising=False)
    service = ModelService([], lazy=False)  # no model needed for these routes
    with TestClient(create_app(service)) as c:
        assert_error(c.get("/v1/_faults"), 404, "not_found")
        assert c.get("/v1/health").json()["models"] == []
    with TestClient(create_app(service, test_faults=True)) as c:
        assert c.get("/v1/_faults").json()["armed"] == 0


def _serve_fails(*args: str) -> str:
    """Run `bbt serve ARGS` and return its stderr; it must exit 1 at once, never serve."""
    proc = subprocess.run([sys.executable, "-m", "bbt.cli", "serve", "--port", "0", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc.stderr


def test_serve_refuses_an_empty_keys_file(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# nobody yet\n\n")
    assert "holds no keys" in _serve_fails("--api-keys", str(keys))
    keys.write_text("short\n")
    assert "at least 8 characters" in _serve_fails("--api-keys", str(keys))


def test_serve_refuses_an_unknown_model(tmp_path):
    err = _serve_fails("--model", str(tmp_path / "no-such-model"))
    assert "unknown model" in err and "never downloaded" in err
