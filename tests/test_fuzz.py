"""Fuzzing the server over real HTTP: no request may get a 5xx, every answer must match the OpenAPI page.

The app (a tiny sentence encoder and a tiny masked LM, an API key, a quota and a rate limit, so
that those paths are walked too) runs on uvicorn in a thread on a loopback port.

- Schemathesis reads /openapi.json from it and sends schema-valid and schema-violating requests
  to every /v1 operation, checking status codes, content types, bodies and headers against the page.
- Random bodies from the schema almost never get past validation (a tensor's data must fit its
  shape, the model must exist), so a hypothesis strategy also builds *well-formed* evaluate and
  stats bodies with hostile contents: templates with stray braces, odd unicode, extreme scales,
  float16 overflow, BBTv2 layer counts, seeds at their limits, repeated Idempotency-Keys.

Seeded (derandomize) and bounded, so a run is repeatable and takes well under a minute on two cores.
"""

from __future__ import annotations

import base64
import hashlib
import json

import httpx
import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (installed with schemathesis)
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from appserver import serving  # noqa: E402
from bbt.protocol import ErrorBody, EvaluateResponse, StatsResponse  # noqa: E402
from servers.app import create_app  # noqa: E402
from servers.quotas import Quotas  # noqa: E402
from servers.service import Limits, ModelService  # noqa: E402

KEY = "fuzz-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
H, LAYERS = 32, 2  # both tiny models
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
FUZZ = settings(max_examples=30, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])


@pytest.fixture(scope="module")
def server_url(tiny_encoder, tiny_bert_mlm):
    service = ModelService([f"tiny={tiny_encoder}", f"mlm={tiny_bert_mlm}"], lazy=False,
                           limits=Limits(max_candidates=16, max_examples=50, max_body_bytes=2**20))
    app = create_app(service, api_keys=[KEY], quotas=Quotas(quota=10**9, rate=10**6), test_faults=False)
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(server_url):
    return schemathesis.openapi.from_url(server_url + "/openapi.json")


# ---- schemathesis: every operation of the OpenAPI page ------------------------------------------

# Every /v1 operation; test_every_operation_is_fuzzed keeps this list in step with the app.
OPERATIONS = ["GET /v1/health", "GET /v1/models", "GET /v1/models/{name}", "GET /v1/usage", "POST /v1/evaluate",
              "POST /v1/stats"]


def test_every_operation_is_fuzzed(api_schema):
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert {label for label in labels if " /v1/" in label} == set(OPERATIONS)


@pytest.mark.parametrize("label, mode", [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE) for label in OPERATIONS if label.startswith("POST")])  # GETs: nothing to break
def test_schemathesis_finds_no_5xx_and_no_answer_off_the_page(api_schema, server_url, label, mode):
    """Drives hypothesis directly: schemathesis' lazy pytest loader (from_fixture) breaks on pytest 9."""
    operation = api_schema.find_operation_by_label(label)

    @given(case=operation.as_strategy(mode))
    @FUZZ
    def fuzz(case):
        case.call_and_validate(base_url=server_url, headers=AUTH, checks=CHECKS, timeout=30)

    fuzz()


# ---- well-formed bodies with hostile contents ---------------------------------------------------

words = st.text(max_size=12)
templates = st.one_of(
    st.sampled_from(["{text} . It was {mask} .", "{mask} News: {text}", "{text} ? {mask} , {text_pair}",
                     "{text} {mask} {mask}", "{text} {foo} {mask}", "{text} {0} {mask}",
                     "{text.__class__} {text} {mask}", "{text} {{mask}} {mask}", "{text} {mask} }{", "[MASK] {text} {mask}",
                     "{text} {text:>99999999} {mask}"]),
    st.builds("{}{{text}}{}{{mask}}{}".format, words, words, words),
)


@st.composite
def task_and_inputs(draw) -> tuple[dict, list[dict]]:
    n = draw(st.integers(2, 4))
    task = {"name": "fuzz", "labels": [f"l{i}" for i in range(n)], "template": draw(templates),
            "verbalizer": draw(st.lists(words, min_size=n, max_size=n)),
            "label_texts": draw(st.lists(words, min_size=n, max_size=n))}
    inputs = [{"text": draw(st.text(max_size=60)), "text_pair": draw(st.none() | st.text(max_size=20))}
              for _ in range(draw(st.integers(1, 3)))]
    return task, inputs


def _tensor(array: np.ndarray, dtype: str) -> dict:
    raw = np.ascontiguousarray(array, dtype="<f2" if dtype == "float16" else "<f4").tobytes()
    return {"dtype": dtype, "shape": list(array.shape), "data": base64.b64encode(raw).decode()}


@st.composite
def candidates(draw) -> dict | None:
    k, layers, length, d = draw(st.integers(1, 3)), draw(st.sampled_from([1, LAYERS, 3])), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1e-30, 1e-3, 0.05, 1.0, 1e4, 1e30]))
    values = np.random.default_rng(draw(st.integers(0, 2**16))).normal(0, scale, size=(k, layers, length * H))
    init_seed = draw(st.none() | st.sampled_from([0, 2**32 - 1]))
    kind = draw(st.sampled_from(["intrinsic", "prompts", "none"]))
    if kind == "none":
        return None
    if kind == "prompts":
        dtype = draw(st.sampled_from(["float32", "float16"]))
        return {"type": "prompts", "prompts": _tensor(values.reshape(k, layers, length, H), dtype), "init_seed": init_seed}
    spec = {"kind": draw(st.sampled_from(["uniform", "normal"])), "seed": draw(st.sampled_from([0, 7, 2**63])),
            "d": d, "D": length * H, "scale": draw(st.sampled_from([1e-30, 0.01, 1.0, 1e30]))}
    return {"type": "intrinsic", "z": _tensor(values[:, :, :d], "float32"), "projections": [spec] * layers,
            "prompt_length": length, "init_seed": init_seed}


@st.composite
def evaluate_bodies(draw) -> dict:
    task, inputs = draw(task_and_inputs())
    labels = draw(st.none() | st.lists(st.integers(0, len(task["labels"]) - 1), min_size=len(inputs), max_size=len(inputs)))
    return {"model": draw(st.sampled_from(["tiny", "mlm"])), "task": task, "inputs": inputs, "labels": labels,
            "loss": draw(st.sampled_from(["ce", "hinge", "perf"])), "return_logits": labels is None or draw(st.booleans()),
            "candidates": draw(candidates())}


@st.composite
def stats_bodies(draw) -> dict:
    task, inputs = draw(task_and_inputs())
    return {"model": draw(st.sampled_from(["tiny", "mlm"])), "task": task, "inputs": inputs}


# mostly none or the body's sha256 (what bbt sends: replays), now and then one fixed key (reuse: 422)
idempotency_keys = st.sampled_from([None, None, "sha256", "sha256", "fixed"])


@pytest.mark.parametrize("route, bodies, answer", [("/v1/evaluate", evaluate_bodies(), EvaluateResponse),
                                                   ("/v1/stats", stats_bodies(), StatsResponse)])
def test_well_formed_hostile_bodies_get_an_answer_or_a_4xx(server_url, route, bodies, answer):
    seen = set()
    with httpx.Client(base_url=server_url, headers={**AUTH, "Content-Type": "application/json"}, timeout=30) as client:

        @given(body=bodies, key=idempotency_keys)
        @settings(FUZZ, max_examples=80)
        def fuzz(body, key):
            content = json.dumps(body).encode()
            key = {"sha256": hashlib.sha256(content).hexdigest(), "fixed": "fixed-key"}.get(key)
            resp = client.post(route, content=content, headers={"Idempotency-Key": key} if key else {})
            seen.add(resp.status_code)
            assert resp.status_code < 500, resp.text
            if resp.status_code != 200:
                ErrorBody.model_validate_json(resp.content)
                return
            parsed = answer.model_validate_json(resp.content)
            if route == "/v1/evaluate":
                k = 1 if body["candidates"] is None else (body["candidates"].get("z") or body["candidates"].get("prompts"))["shape"][0]
                assert parsed.usage.queries == k
                if body["labels"] is not None:
                    assert len(parsed.losses) == k
            else:
                assert len(parsed.tokens) == len(body["inputs"])

        fuzz()
    assert 200 in seen and 422 in seen, seen  # the strategy reaches the models and the refusals


@pytest.mark.parametrize("template", ["{text} {foo} {mask}", "{text} {0} {mask}", "{text} {text:>999999999} {mask}",
                                      "{text.__class__} {text} {mask}", "{text} {mask} }{", "{text} {{mask}} {mask}"])
@pytest.mark.parametrize("route", ["/v1/evaluate", "/v1/stats"])
def test_templates_with_other_braces_are_422_not_500(server_url, template, route):
    """Found by the fuzz: str.format on such templates raised KeyError/ValueError/IndexError (a 500)."""
    task = {"name": "t", "labels": ["a", "b"], "template": template, "verbalizer": ["bad", "great"],
            "label_texts": ["bad", "great"]}
    body = {"model": "mlm", "task": task, "inputs": [{"text": "fine"}]}
    if route == "/v1/evaluate":
        body["return_logits"] = True
    resp = httpx.post(server_url + route, json=body, headers=AUTH, timeout=30)
    assert resp.status_code == 422, resp.text
    assert "braces are only allowed" in ErrorBody.model_validate_json(resp.content).detail
