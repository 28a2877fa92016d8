"""Protocol v1 routes. Bodies and answers are the pydantic models of `bbt.protocol`.

Model work is CPU-bound and blocking, so the routes that touch a model are plain ``def``: FastAPI
runs them in its threadpool and the event loop stays free (health answers while a population is
scored). `ModelService` holds a lock, so forward passes still run one at a time.

Every keyed route first checks the API key (`servers.auth`), then takes a token of the account's
rate limit (`servers.quotas`). Evaluate and stats may carry an Idempotency-Key
(`servers.idempotency`); evaluate reserves its K queries of the account's quota before any model
work and is charged only when answered, in one transaction with storing its answer
(`servers.state`), so that a retry after a crash is replayed or scored, never paid twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Annotated, NamedTuple

from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import BaseModel

from bbt.protocol import (
    ErrorBody,
    EvaluateRequest,
    EvaluateResponse,
    Health,
    KeyUsage,
    ModelInfo,
    ModelList,
    PromptTensor,
    StatsRequest,
    StatsResponse,
)
from servers.auth import require_key
from servers.idempotency import KEY_PATTERN, REPLAYED_HEADER
from servers.service import ModelService

_ERRORS = {
    400: {"model": ErrorBody, "description": "the body is not JSON"},
    401: {"model": ErrorBody, "description": "missing or wrong API key"},
    404: {"model": ErrorBody, "description": "unknown model"},
    413: {"model": ErrorBody, "description": "body over the server's size limit"},
    422: {"model": ErrorBody, "description": "the request is invalid or over a limit (invalid_request), or its "
          "Idempotency-Key was used with another body (idempotency_key_reused); detail says which"},
    429: {"model": ErrorBody, "description": "over the API key's query quota (quota_exhausted) or request rate "
          "(rate_limited); Retry-After says when to try again",
          "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}},
    500: {"model": ErrorBody, "description": "the server failed on this request (it stays up)"},
}
_REPLAYABLE = {200: {"headers": {REPLAYED_HEADER: {
    "description": "'true' when this is the stored answer of an earlier request with the same Idempotency-Key",
    "schema": {"type": "string", "enum": ["true"]}}}}}


def get_service(request: Request) -> ModelService:
    return request.app.state.service


def limit_rate(request: Request) -> None:
    """Dependency of every keyed route (after the key check): one token of the account's rate limit."""
    request.app.state.quotas.take_token(request.state.account)


public = APIRouter(prefix="/v1", tags=["v1"])
keyed = APIRouter(prefix="/v1", tags=["v1"], dependencies=[Depends(require_key), Depends(limit_rate)],
                  responses=_ERRORS)


class Idem(NamedTuple):
    key: str
    body_hash: str


async def idempotency(
    request: Request,
    key: Annotated[str | None, Header(alias="Idempotency-Key", pattern=KEY_PATTERN, description=(
        "1 to 128 characters of A-Z a-z 0-9 _ . : - (bbt sends the sha256 of the body): a request repeated with "
        "the same key and body is answered once, later copies get the stored answer (no queries charged)"))] = None,
) -> Idem | None:
    """The request's Idempotency-Key and the sha256 of its route and raw body; None without a key.

    Async so that it can read the body FastAPI has already read (Starlette caches it).
    """
    if key is None:
        return None
    return Idem(key, hashlib.sha256(request.url.path.encode() + b"\n" + await request.body()).hexdigest())


def _json(model: BaseModel) -> Response:
    """Serialize once with pydantic (FastAPI would validate the answer a second time)."""
    return Response(content=model.model_dump_json(), media_type="application/json")


Work = Callable[[], tuple[bytes, Callable[[], None]]]  # -> the answer, and what to commit with it (the charge)


def _answer_once(request: Request, idem: Idem | None, work: Work) -> Response:
    """`work()`'s answer, or the stored answer of an earlier request with the same key. The answer
    is stored and `work`'s commit (its quota charge) is made in one transaction."""
    state = request.app.state.quotas.state
    if idem is None:
        answer, commit = work()
        with state.transaction():
            commit()
        return Response(answer, media_type="application/json")
    store, account = request.app.state.idempotency, request.state.account
    stored = store.begin(account, idem.key, idem.body_hash)  # may wait for a twin in flight
    if stored is not None:
        return Response(stored, media_type="application/json", headers={REPLAYED_HEADER: "true"})
    try:
        answer, commit = work()
    except BaseException:
        store.finish(account, idem.key, None)  # forgotten, and a waiting twin is processed
        raise
    with state.transaction():
        commit()
        store.finish(account, idem.key, answer)
    return Response(answer, media_type="application/json")


def _declared_k(body: EvaluateRequest, max_k: int) -> int:
    """The queries an evaluate asks for: K, or 1 without candidates.

    0 for a K out of 1..max_k: the service refuses such a request with a 422 that names the
    limit, which says more than a quota refusal would.
    """
    c = body.candidates
    if c is None:
        return 1
    shape = c.prompts.shape if isinstance(c, PromptTensor) else c.z.shape
    k = shape[0] if shape else 0
    return k if 1 <= k <= max_k else 0


@public.get("/health", response_model=Health, summary="Liveness and the models served (no key needed)")
async def health(request: Request) -> Health:
    return Health(models=get_service(request).names)


@keyed.get("/models", response_model=ModelList, summary="Every model served, with its sizes and scales")
def list_models(service: ModelService = Depends(get_service)) -> Response:
    return _json(ModelList(models=[service.get(name).info() for name in service.names]))


@keyed.get("/models/{name:path}", response_model=ModelInfo, summary="One model: hidden size, layers, limits, scales")
def model_info(name: str, service: ModelService = Depends(get_service)) -> Response:
    return _json(service.get(name).info())


@keyed.get("/usage", response_model=KeyUsage, summary="What this API key has spent of its query quota")
def usage(request: Request) -> Response:
    quotas, account = request.app.state.quotas, request.state.account
    return _json(KeyUsage(queries_used=quotas.used(account), quota=quotas.quota, window_seconds=quotas.window,
                          resets_in=quotas.resets_in(account)))


@keyed.post("/evaluate", response_model=EvaluateResponse, responses=_REPLAYABLE,
            summary="Score a population of K candidate prompts (K queries) on N inputs")
def evaluate(body: EvaluateRequest, request: Request, idem: Idem | None = Depends(idempotency),
             service: ModelService = Depends(get_service)) -> Response:
    quotas, account = request.app.state.quotas, request.state.account

    def work() -> tuple[bytes, Callable[[], None]]:
        k = _declared_k(body, service.limits.max_candidates)
        quotas.reserve(account, k)  # QuotaExhausted (429) before any model work
        try:
            answer = service.evaluate(body)
        except BaseException:
            quotas.settle(account, k, 0)  # a failed request costs nothing
            raise
        return answer.model_dump_json().encode(), lambda: quotas.settle(account, k, answer.usage.queries)

    return _answer_once(request, idem, work)


@keyed.post("/stats", response_model=StatsResponse, responses=_REPLAYABLE,
            summary="Tokens per input and hidden-state scales of a task's inputs (no queries)")
def stats(body: StatsRequest, request: Request, idem: Idem | None = Depends(idempotency),
          service: ModelService = Depends(get_service)) -> Response:
    return _answer_once(request, idem, lambda: (service.stats(body).model_dump_json().encode(), lambda: None))
