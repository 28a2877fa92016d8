"""A test-only fault switch: make the next evaluate requests fail, so clients' retries can be tested.

Installed only when the environment variable ``BBT_TEST_FAULTS=1`` is set as the server starts (or
a test asks `create_app` for it): an ASGI middleware in front of the app, so the routes carry no
test code, and the routes below to arm it and read its counters:

    POST /v1/_faults  {"fail_next": 2, "status": 503, "retry_after": 0.5, "delay": 0}
    POST /v1/_faults  {"fail_next": 1, "delay_after": 3}
    GET  /v1/_faults  the counters below, and what is still armed

Each of the next ``fail_next`` evaluate requests first sleeps ``delay`` seconds (longer than the
client's timeout: the client sees a timeout) and then answers ``status`` (with a Retry-After
header when ``retry_after`` is given), *before* any model work is done or counted; ``crash``
raises an unexpected exception instead, to exercise the 500 path.

With ``delay_after`` the armed requests are *served* instead (scored, charged to the quota, their
answer stored for idempotent replay) and then sleep ``delay_after`` seconds before answering: a
client with a shorter timeout gives up although the work was done, the case that idempotency
keys exist for. The counters let a test check that retried requests were served exactly once.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servers.handlers import error_response
from servers.idempotency import REPLAYED_HEADER

ENV_VAR = "BBT_TEST_FAULTS"


class FaultPlan(BaseModel):
    """What the next `fail_next` evaluate requests do instead of being served."""

    model_config = ConfigDict(extra="forbid")

    fail_next: int = Field(ge=0, le=1000, description="how many evaluate requests fail (0: disarm)")
    status: Literal[429, 500, 502, 503, 504] = Field(default=503, description="HTTP status they get")
    retry_after: float | None = Field(default=None, ge=0, le=60, description="Retry-After header, seconds")
    delay: float = Field(default=0.0, ge=0, le=60, description="seconds to sleep before answering")
    crash: bool = Field(default=False, description="raise an unexpected exception (a 500) instead")
    delay_after: float = Field(default=0.0, ge=0, le=60, description="serve the request, then sleep this many "
                               "seconds before answering (status, retry_after, delay and crash are then unused)")


class FaultCounters(BaseModel):
    """Evaluate requests seen by the server since it started."""

    received: int = Field(description="evaluate requests that reached the server")
    injected: int = Field(description="of those, failed on purpose by this switch")
    served: int = Field(description="answered 200 with model work done")
    replayed: int = Field(description="answered 200 from an earlier answer to the same Idempotency-Key (no work)")
    queries_served: int = Field(description="candidates scored in the served requests")
    armed: int = Field(description="failures still to come")


class FaultSwitch:
    """Armed failures and counters; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plan = FaultPlan(fail_next=0)
        self._received = self._injected = self._served = self._queries = self._replayed = 0

    def arm(self, plan: FaultPlan) -> None:
        with self._lock:
            self._plan = plan

    def take(self) -> FaultPlan | None:
        """Called first thing for an evaluate request: the plan it is to follow, or None to serve it."""
        with self._lock:
            self._received += 1
            plan = self._plan
            if plan.fail_next <= 0:
                return None
            self._plan = plan.model_copy(update={"fail_next": plan.fail_next - 1})
            self._injected += 1
            return plan

    def answered(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        """Count an evaluate's answer: served (with its queries) or replayed."""
        if status != 200:
            return
        with self._lock:
            if headers.get(REPLAYED_HEADER.lower().encode()) == b"true":
                self._replayed += 1
            else:
                self._served += 1
                self._queries += json.loads(body)["usage"]["queries"]

    def counters(self) -> FaultCounters:
        with self._lock:
            return FaultCounters(received=self._received, injected=self._injected, served=self._served,
                                 replayed=self._replayed, queries_served=self._queries, armed=self._plan.fail_next)


class FaultMiddleware:
    """ASGI middleware: POST /v1/evaluate follows the switch's plan; other requests pass untouched.

    A failing request sleeps `delay`, then answers `status` (or raises, with `crash`, for the
    server's 500 path) before the app sees it. With `delay_after` it is served (scored, charged,
    its answer stored) and its answer held back `delay_after` seconds.
    """

    def __init__(self, app: ASGIApp, switch: FaultSwitch):
        self.app, self.switch = app, switch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/evaluate":
            await self.app(scope, receive, send)
            return
        plan = self.switch.take()
        if plan is not None and not plan.delay_after:
            await asyncio.sleep(plan.delay)  # other requests are served meanwhile
            if plan.crash:
                raise RuntimeError("injected crash (test fault switch)")
            headers = None if plan.retry_after is None else {"Retry-After": f"{plan.retry_after:g}"}
            kind = "rate_limited" if plan.status == 429 else "unavailable"
            await error_response(plan.status, kind, f"injected by the test fault switch ({plan.status})",
                                 headers=headers)(scope, receive, send)
            return
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        await self.app(scope, receive, hold)
        start = next((m for m in held if m["type"] == "http.response.start"), None)
        if start is not None:
            body = b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")
            self.switch.answered(start["status"], dict(start.get("headers") or []), body)
        if plan is not None:
            await asyncio.sleep(plan.delay_after)  # served and stored: the client may time out, a retry is replayed
        for message in held:
            await send(message)


router = APIRouter(prefix="/v1/_faults", tags=["test faults"])


@router.post("", response_model=FaultCounters, summary="Arm failures of the next evaluate requests")
def arm_faults(plan: FaultPlan, request: Request) -> FaultCounters:
    switch: FaultSwitch = request.app.state.faults
    switch.arm(plan)
    return switch.counters()


@router.get("", response_model=FaultCounters, summary="Counters of evaluate requests")
def fault_counters(request: Request) -> FaultCounters:
    return request.app.state.faults.counters()
