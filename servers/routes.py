"""Protocol v1 routes. Bodies and answers are the pydantic models of `bbt.protocol`.

Model work is CPU-bound and blocking, so the routes that touch a model are plain ``def``: FastAPI
runs them in its threadpool and the event loop stays free (health answers while a population is
scored). `ModelService` holds a lock, so forward passes still run one at a time.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from bbt.protocol import (
    ErrorBody,
    EvaluateRequest,
    EvaluateResponse,
    Health,
    ModelInfo,
    ModelList,
    StatsRequest,
    StatsResponse,
)
from servers.auth import require_key
from servers.service import ModelService

_ERRORS = {
    400: {"model": ErrorBody, "description": "the body is not JSON"},
    401: {"model": ErrorBody, "description": "missing or wrong API key"},
    404: {"model": ErrorBody, "description": "unknown model"},
    413: {"model": ErrorBody, "description": "body over the server's size limit"},
    422: {"model": ErrorBody, "description": "the request is invalid or over a limit; detail says which"},
    500: {"model": ErrorBody, "description": "the server failed on this request (it stays up)"},
}

public = APIRouter(prefix="/v1", tags=["v1"])
keyed = APIRouter(prefix="/v1", tags=["v1"], dependencies=[Depends(require_key)], responses=_ERRORS)


def get_service(request: Request) -> ModelService:
    return request.app.state.service


def _json(model: BaseModel) -> Response:
    """Serialize once with pydantic (FastAPI would validate the answer a second time)."""
    return Response(content=model.model_dump_json(), media_type="application/json")


@public.get("/health", response_model=Health, summary="Liveness and the models served (no key needed)")
async def health(request: Request) -> Health:
    return Health(models=get_service(request).names)


@keyed.get("/models", response_model=ModelList, summary="Every model served, with its sizes and scales")
def list_models(service: ModelService = Depends(get_service)) -> Response:
    return _json(ModelList(models=[service.get(name).info() for name in service.names]))


@keyed.get("/models/{name:path}", response_model=ModelInfo, summary="One model: hidden size, layers, limits, scales")
def model_info(name: str, service: ModelService = Depends(get_service)) -> Response:
    return _json(service.get(name).info())


@keyed.post("/evaluate", response_model=EvaluateResponse,
            summary="Score a population of K candidate prompts (K queries) on N inputs")
def evaluate(body: EvaluateRequest, request: Request, service: ModelService = Depends(get_service)) -> Response:
    faults = request.app.state.faults
    if faults is not None:
        faults.before_evaluate()  # test servers only: may fail this request before any work
    answer = service.evaluate(body)
    if faults is not None:
        faults.served(answer.usage.queries)
    return _json(answer)


@keyed.post("/stats", response_model=StatsResponse,
            summary="Tokens per input and hidden-state scales of a task's inputs (no queries)")
def stats(body: StatsRequest, service: ModelService = Depends(get_service)) -> Response:
    return _json(service.stats(body))
